"""A tiny sans-IO NBD *client* for tests: builds client messages, parses server bytes.

Written from the spec independently of tmem.nbd.protocol's internals (only the public
constants are shared), so tests check bytes on the wire, not the implementation's view.
Imported by the other test_nbd_protocol*/test_nbd_fuzz* files; the tests at the bottom
check the helper itself against hand-written byte strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tmem.nbd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportSelected,
    NeedData,
    ProtocolError,
    ServerConnection,
)

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = ERR + 1, ERR + 3, ERR + 6
REP_ERR_SHUTDOWN, REP_ERR_TOO_BIG = ERR + 7, ERR + 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_ERROR = 0, 1, 2, 32769


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def request(
    cmd: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


@dataclass
class Client:
    """Drives a ServerConnection: feeds bytes, collects events and the server's output."""

    conn: ServerConnection
    rx: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rx += self.conn.initial_bytes()

    def pump(self) -> list[Event]:
        """Run next_event() to NEED_DATA or a terminal event, collecting output."""
        got: list[Event] = []
        while True:
            ev = self.conn.next_event()
            self.rx += self.conn.data_to_send()
            if isinstance(ev, NeedData):
                assert ev is NEED_DATA
                break
            got.append(ev)
            if isinstance(ev, Disconnect | ConnectionClosed | ProtocolError):
                break
        self.events += got
        return got

    def send(self, data: bytes) -> list[Event]:
        self.conn.receive_data(data)
        return self.pump()

    # ------------------------------------------------------------ parsing server output
    def take(self, n: int) -> bytes:
        assert len(self.rx) >= n, f"want {n} bytes, server sent {len(self.rx)}"
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.take(18))
        assert magic == 0x4E42444D41474943 and opt == IHAVEOPT
        return int(hflags)

    def opt_reply(self) -> OptReply:
        magic, opt, rtype, length = struct.unpack(">QIII", self.take(20))
        assert magic == OPT_REPLY_MAGIC
        return OptReply(opt, rtype, self.take(length))

    def opt_replies(self) -> list[OptReply]:
        """All replies to one option, up to and including the final (ACK or error)."""
        out = []
        while True:
            r = self.opt_reply()
            out.append(r)
            if r.type == REP_ACK or r.type & ERR:
                return out

    def simple(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.take(16))
        assert magic == SIMPLE_MAGIC
        return error, cookie, self.take(data_len) if error == 0 else b""

    def chunk(self) -> Chunk:
        magic, flags, ctype, cookie, length = struct.unpack(">IHHQI", self.take(20))
        assert magic == STRUCTURED_MAGIC
        return Chunk(flags, ctype, cookie, self.take(length))

    def handshake(
        self,
        name: str = "",
        structured: bool = False,
        infos: tuple[int, ...] = (INFO_BLOCK_SIZE,),
        no_zeroes: bool = True,
    ) -> ExportSelected:
        self.greeting()
        out = self.send(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        assert out == []
        if structured:
            assert self.send(option(OPT_SR)) == []
            assert self.opt_reply().type == REP_ACK
        evs = self.send(option(OPT_GO, go_data(name, infos)))
        assert len(evs) == 1 and isinstance(evs[0], ExportSelected), evs
        replies = self.opt_replies()
        assert replies[-1].type == REP_ACK
        return evs[0]


def info_map(replies: list[OptReply]) -> dict[int, bytes]:
    """NBD_REP_INFO replies keyed by info type (payload after the type field)."""
    out = {}
    for r in replies:
        if r.type == REP_INFO:
            (itype,) = struct.unpack_from(">H", r.data)
            out[itype] = r.data[2:]
    return out


# ---------------------------------------------------------------- tests of the helper


def test_builders_match_spec_layout() -> None:
    assert option(OPT_GO, b"ab") == bytes.fromhex("49484156454f50540000000700000002") + b"ab"
    assert go_data("x", (3,)) == bytes.fromhex("00000001") + b"x" + bytes.fromhex("00010003")
    assert (
        request(WRITE, 0x0102, 0x10, 2, FUA, b"hi")
        == bytes.fromhex("25609513000100010000000000000102000000000000001000000002") + b"hi"
    )
