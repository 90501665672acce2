"""Unit tests of the sans-IO NBD server protocol: feed client bytes, check server bytes."""

from __future__ import annotations

import errno
import struct

import pytest

from test_nbd_protocol_client import (
    CACHE,
    CHUNK_DATA,
    CHUNK_ERROR,
    CHUNK_HOLE,
    CHUNK_NONE,
    DF,
    DISC,
    FAST_ZERO,
    FLUSH,
    FUA,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    NO_HOLE,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SR,
    OPT_STARTTLS,
    READ,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_SHUTDOWN,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_SERVER,
    REQ_ONE,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    Client,
    go_data,
    info_map,
    option,
    request,
)
from tmem.errors import ConfigError, TmemError
from tmem.nbd.protocol import (
    EINVAL,
    EIO,
    ENOSPC,
    ENOTSUP,
    EOVERFLOW,
    EPERM,
    ESHUTDOWN,
    MAX_PAYLOAD,
    NEED_DATA,
    Command,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ExportSelected,
    LocalProtocolError,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
    State,
    TransmissionFlag,
    nbd_errno,
)

SIZE = 1 << 20
MiB = 1 << 20

# HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN|SEND_CACHE|FAST_ZERO
RW_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800


def make(
    *,
    read_only: bool = False,
    default: str | None = "disk",
    max_payload: int = MAX_PAYLOAD,
    **kw: int,
) -> Client:
    exports = {
        "disk": ExportInfo("disk", SIZE, read_only=read_only, description="tmem test disk"),
        "other": ExportInfo("other", 8 * 4096, multi_conn=False),
    }
    return Client(ServerConnection(exports, default, max_payload=max_payload, **kw))


def connected(structured: bool = False, **kw: object) -> Client:
    c = make(**kw)  # type: ignore[arg-type]
    c.handshake(structured=structured)
    return c


# ------------------------------------------------------------------------ handshake


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    c = make()
    assert bytes(c.rx) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert c.conn.state is State.AWAIT_CLIENT_FLAGS
    assert c.conn.data_to_send() == b""  # the greeting is handed out once


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF, 3 | 8])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    c = make()
    c.greeting()
    evs = c.send(struct.pack(">I", flags))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert c.conn.state is State.ERROR
    assert c.rx == b""
    # terminal: the same event again, later data ignored, buffer released
    c.conn.receive_data(option(OPT_LIST))
    assert c.conn.next_event() is evs[0]
    assert c.conn.buffered == 0


def test_export_name_pads_124_zeroes_for_a_client_without_no_zeroes() -> None:
    c = make()
    c.greeting()
    assert c.send(struct.pack(">I", 1)) == []  # fixed newstyle, no NO_ZEROES
    evs = c.send(option(OPT_EXPORT_NAME, b"disk"))
    assert isinstance(evs[0], ExportSelected)
    assert bytes(c.rx) == struct.pack(">QH", SIZE, RW_FLAGS) + bytes(124)
    assert c.conn.state is State.TRANSMISSION
    assert evs[0].block_size_acked is False and evs[0].structured is False


def test_export_name_with_no_zeroes_and_non_fixed_client() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 2))  # NO_ZEROES only (non-fixed newstyle client)
    evs = c.send(option(OPT_EXPORT_NAME, b""))  # default export
    assert isinstance(evs[0], ExportSelected) and evs[0].name == "disk"
    assert bytes(c.rx) == struct.pack(">QH", SIZE, RW_FLAGS)


def test_export_name_unknown_export_is_a_hard_disconnect() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(option(OPT_EXPORT_NAME, b"nope"))
    assert isinstance(evs[0], ProtocolError)
    assert c.rx == b""


def test_export_name_invalid_utf8_drops() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    assert isinstance(c.send(option(OPT_EXPORT_NAME, b"\xff\xfe"))[0], ProtocolError)


def test_go_replies_export_name_description_block_size_then_ack() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(option(OPT_GO, go_data("", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999))))
    replies = c.opt_replies()
    assert all(r.option == OPT_GO for r in replies)
    assert replies[-1].type == REP_ACK and replies[-1].data == b""
    info = info_map(replies)
    assert info[INFO_EXPORT] == struct.pack(">QH", SIZE, RW_FLAGS)
    assert info[INFO_NAME] == b"disk"
    assert info[INFO_DESCRIPTION] == b"tmem test disk"
    assert info[INFO_BLOCK_SIZE] == struct.pack(">III", 512, 4096, MAX_PAYLOAD)
    assert 999 not in info
    assert c.rx == b""  # no padding after GO
    (sel,) = evs
    assert isinstance(sel, ExportSelected)
    assert sel.name == "disk" and sel.block_size_acked and sel.max_payload == MAX_PAYLOAD
    assert sel.flags == RW_FLAGS
    assert c.conn.state is State.TRANSMISSION and c.conn.export is sel.info


def test_go_sends_block_size_even_unasked_but_no_name_or_description() -> None:
    c = make(max_payload=1 * MiB)
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(option(OPT_GO, go_data("disk")))
    info = info_map(c.opt_replies())
    assert set(info) == {INFO_EXPORT, INFO_BLOCK_SIZE}
    assert info[INFO_BLOCK_SIZE] == struct.pack(">III", 512, 4096, MiB)
    assert isinstance(evs[0], ExportSelected) and not evs[0].block_size_acked


def test_info_stays_in_negotiation_and_go_follows() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    assert c.send(option(OPT_INFO, go_data("other", (INFO_BLOCK_SIZE,)))) == []
    info = info_map(c.opt_replies())
    # "other": no CAN_MULTI_CONN
    assert info[INFO_EXPORT] == struct.pack(">QH", 8 * 4096, RW_FLAGS & ~0x0100)
    assert c.conn.state is State.NEGOTIATING
    evs = c.send(option(OPT_GO, go_data("other", (INFO_BLOCK_SIZE,))))
    assert isinstance(evs[0], ExportSelected) and evs[0].name == "other"


def test_go_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    assert c.send(option(OPT_GO, go_data("missing"))) == []
    (r,) = c.opt_replies()
    assert r.type == REP_ERR_UNKNOWN and b"missing" in r.data
    assert c.conn.state is State.NEGOTIATING
    assert isinstance(c.send(option(OPT_GO, go_data("disk")))[0], ExportSelected)


def test_default_export_absent_means_unknown() -> None:
    c = make(default=None)
    c.greeting()
    c.send(struct.pack(">I", 3))
    c.send(option(OPT_GO, go_data("")))
    assert c.opt_reply().type == REP_ERR_UNKNOWN


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 10) + b"disk" + b"\x00\x00",  # name length past the end
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\x00\x03",  # count mismatch
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"\x00",  # trailing byte
        struct.pack(">I", 2) + b"\xc3\x28" + struct.pack(">H", 0),  # bad UTF-8
        struct.pack(">I", 2) + b"a\x00" + struct.pack(">H", 0),  # NUL in name
        struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00",
    ],
)
@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO])
def test_malformed_info_go_is_err_invalid(opt: int, data: bytes) -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    assert c.send(option(opt, data)) == []
    (r,) = c.opt_replies()
    assert r.option == opt and r.type == REP_ERR_INVALID
    assert c.conn.state is State.NEGOTIATING


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    c.send(option(OPT_LIST))
    replies = c.opt_replies()
    assert [r.type for r in replies] == [REP_SERVER, REP_SERVER, REP_ACK]
    servers = {}
    for r in replies[:2]:
        (n,) = struct.unpack_from(">I", r.data)
        servers[r.data[4 : 4 + n].decode()] = r.data[4 + n :]
    assert servers == {"disk": b"tmem test disk", "other": b""}
    c.send(option(OPT_LIST, b"x"))
    assert c.opt_reply().type == REP_ERR_INVALID


def test_exports_may_be_a_callable_evaluated_per_lookup() -> None:
    table: dict[str, ExportInfo] = {}
    c = Client(ServerConnection(lambda: table, default_export="late"))
    c.greeting()
    c.send(struct.pack(">I", 3))
    c.send(option(OPT_GO, go_data("")))
    assert c.opt_reply().type == REP_ERR_UNKNOWN
    table["late"] = ExportInfo("late", 4096, read_only=True)
    evs = c.send(option(OPT_GO, go_data("")))
    assert isinstance(evs[0], ExportSelected)
    assert evs[0].flags & TransmissionFlag.READ_ONLY
    assert not evs[0].flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)


def test_abort_acks_and_ends_the_session() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(option(OPT_ABORT, b"ignored data"))
    assert evs == [Disconnect("abort")]
    r = c.opt_reply()
    assert (r.option, r.type, r.data) == (OPT_ABORT, REP_ACK, b"")
    assert c.conn.state is State.DISCONNECTED
    c.conn.receive_data(option(OPT_GO, go_data("disk")))
    assert c.conn.next_event() == Disconnect("abort")
    assert c.conn.data_to_send() == b""


def test_structured_reply_ack_and_invalid_with_data() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    c.send(option(OPT_SR, b"x"))
    assert c.opt_reply().type == REP_ERR_INVALID
    assert not c.conn.structured
    c.send(option(OPT_SR))
    assert c.opt_reply().type == REP_ACK
    assert c.conn.structured
    evs = c.send(option(OPT_GO, go_data("")))
    assert isinstance(evs[0], ExportSelected) and evs[0].structured
    assert evs[0].flags & TransmissionFlag.SEND_DF


@pytest.mark.parametrize("opt", [OPT_STARTTLS, 4, 9, 10, 11, 12, 0, 0xFFFFFFFF])
def test_unsupported_options_get_err_unsup_and_parsing_continues(opt: int) -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    assert c.send(option(opt, b"some data")) == []
    r = c.opt_reply()
    assert (r.option, r.type) == (opt, REP_ERR_UNSUP)
    assert isinstance(c.send(option(OPT_GO, go_data("")))[0], ExportSelected)


def test_bad_option_magic_is_fatal() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(struct.pack(">QII", 0x1234, OPT_GO, 0))
    assert isinstance(evs[0], ProtocolError) and c.conn.state is State.ERROR


def test_oversized_option_is_skipped_without_buffering_then_err_too_big() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    big = 10 * MiB
    assert c.send(struct.pack(">QII", 0x49484156454F5054, OPT_GO, big)) == []
    junk = b"\xaa" * 65536
    for i in range(big // len(junk)):
        assert c.rx == b""  # nothing until the whole option was skipped
        assert c.send(junk) == []
        assert c.conn.buffered == 0, i
    r = c.opt_reply()
    assert (r.option, r.type) == (OPT_GO, REP_ERR_TOO_BIG)
    assert isinstance(c.send(option(OPT_GO, go_data("")))[0], ExportSelected)


def test_oversized_option_skip_survives_one_shot_and_split_feeding() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    stream = struct.pack(">QII", 0x49484156454F5054, 77, 70000) + bytes(70000)
    stream += option(OPT_GO, go_data(""))
    evs = c.send(stream)
    assert c.opt_reply().type == REP_ERR_TOO_BIG
    assert isinstance(evs[0], ExportSelected)


def test_oversized_export_name_is_fatal() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(struct.pack(">QII", 0x49484156454F5054, OPT_EXPORT_NAME, 1 << 31))
    assert isinstance(evs[0], ProtocolError)
    assert c.conn.buffered == 0


def test_too_many_options_is_fatal() -> None:
    c = make(max_options=5)
    c.greeting()
    c.send(struct.pack(">I", 3))
    evs = c.send(option(OPT_LIST) * 6)
    assert isinstance(evs[-1], ProtocolError)
    assert len(c.opt_replies()) == 3  # first LIST answered in full


def test_shutdown_during_negotiation() -> None:
    c = make()
    c.greeting()
    c.send(struct.pack(">I", 3))
    c.conn.start_shutdown()
    for opt in (OPT_GO, OPT_INFO, OPT_LIST, OPT_SR, 99):
        c.send(option(opt, go_data("") if opt in (OPT_GO, OPT_INFO) else b""))
        r = c.opt_reply()
        assert (r.option, r.type) == (opt, REP_ERR_SHUTDOWN)
    assert c.send(option(OPT_ABORT)) == [Disconnect("abort")]
    assert c.opt_reply().type == REP_ACK
    c2 = make()
    c2.greeting()
    c2.send(struct.pack(">I", 3))
    c2.conn.start_shutdown()
    assert isinstance(c2.send(option(OPT_EXPORT_NAME))[0], ProtocolError)


def test_eof_during_handshake() -> None:
    c = make()
    c.conn.receive_data(b"")
    assert c.pump() == [ConnectionClosed(clean=True)]
    assert c.conn.state is State.CLOSED
    c = make()
    c.send(struct.pack(">I", 3) + option(OPT_GO)[:7])
    c.conn.receive_data(b"")
    assert c.pump() == [ConnectionClosed(clean=False)]


def test_options_and_requests_pipelined_in_one_chunk() -> None:
    c = make()
    c.greeting()
    stream = (
        struct.pack(">I", 3)
        + option(OPT_SR)
        + option(OPT_GO, go_data("disk", (INFO_BLOCK_SIZE,)))
        + request(WRITE, 1, 0, 4, payload=b"abcd")
        + request(READ, 2, 0, 4)
        + request(DISC)
    )
    evs = c.send(stream)
    assert [type(e) for e in evs] == [ExportSelected, Request, Request, Disconnect]
    assert evs[1].payload == b"abcd"  # type: ignore[union-attr]


def test_export_info_validation() -> None:
    with pytest.raises(ConfigError):
        ExportInfo("x", -1)
    with pytest.raises(ConfigError):
        ExportInfo("x", 4096, min_block=3)
    with pytest.raises(ConfigError):
        ExportInfo("x", 4096, min_block=1 << 17)
    with pytest.raises(ConfigError):
        ExportInfo("x", 4096, preferred_block=256)
    with pytest.raises(ConfigError):
        ExportInfo("x", 4096, max_payload=1024)
    with pytest.raises(ConfigError):
        ExportInfo("a\0b", 4096)
    with pytest.raises(ConfigError):
        ExportInfo("n" * 4097, 4096)
    with pytest.raises(ConfigError):
        ServerConnection({}, max_payload=100)
    assert issubclass(ConfigError, TmemError)


# ------------------------------------------------------------------------ transmission


def one(c: Client, data: bytes) -> Request | RequestRejected:
    evs = c.send(data)
    assert len(evs) == 1, evs
    ev = evs[0]
    assert isinstance(ev, Request | RequestRejected), ev
    return ev


def test_a_request_is_a_value_and_its_repr_leaves_out_the_payload() -> None:
    c = connected()
    w = one(c, request(WRITE, 9, 4096, 8, FUA, b"secret!!"))
    assert isinstance(w, Request)
    same = Request(Command.WRITE, w.flags, 9, 4096, 8, b"secret!!")
    assert w == same and hash(w) == hash(same)
    assert w != Request(Command.WRITE, w.flags, 10, 4096, 8, b"secret!!")
    assert w != (Command.WRITE, w.flags, 9, 4096, 8, b"secret!!")
    assert "secret" not in repr(w) and "cookie=9" in repr(w)
    if hasattr(Request, "__mypyc_attrs__"):
        with pytest.raises(AttributeError):  # compiled: Final attributes are read-only
            w.cookie = 1  # type: ignore[misc]


def test_write_then_read_simple_replies() -> None:
    c = connected()
    w = one(c, request(WRITE, 0xDEADBEEFCAFE, 4096, 8, FUA, b"12345678"))
    assert isinstance(w, Request)
    assert (w.command, w.cookie, w.offset, w.length, w.payload) == (
        Command.WRITE,
        0xDEADBEEFCAFE,
        4096,
        8,
        b"12345678",
    )
    assert w.fua and w.kind is Command.WRITE
    assert c.conn.in_flight == 1
    r = one(c, request(READ, 7, 4096, 8))
    assert isinstance(r, Request) and r.payload is None
    assert c.conn.in_flight == 2
    # out of order: READ answered first, the cookie is echoed verbatim
    c.rx += c.conn.reply(r, data=b"12345678")
    c.rx += c.conn.reply(w)
    assert c.simple(8) == (0, 7, b"12345678")
    assert c.simple() == (0, 0xDEADBEEFCAFE, b"")
    assert c.conn.in_flight == 0
    assert c.rx == b""


def test_simple_error_replies_carry_no_data() -> None:
    c = connected()
    r = one(c, request(READ, 3, 0, 512))
    assert isinstance(r, Request)
    c.rx += c.conn.reply(r, error=EIO, data=b"ignored" * 0)
    assert c.simple(512) == (EIO, 3, b"")
    assert c.rx == b""


def test_structured_read_is_one_offset_data_chunk_with_done() -> None:
    c = connected(structured=True)
    r = one(c, request(READ, 9, 8192, 4096))
    assert isinstance(r, Request)
    parts = c.conn.reply_parts(r, data=b"z" * 4096)
    assert parts[-1] == b"z" * 4096  # data is not copied
    c.rx += b"".join(parts)
    ch = c.chunk()
    assert (ch.flags, ch.type, ch.cookie) == (1, CHUNK_DATA, 9)
    assert ch.payload == struct.pack(">Q", 8192) + b"z" * 4096
    assert c.rx == b""


def test_structured_read_error_is_an_error_chunk_with_message() -> None:
    c = connected(structured=True)
    r = one(c, request(READ, 9, 0, 4096))
    assert isinstance(r, Request)
    c.rx += c.conn.reply(r, error=EIO, message="disk on fire")
    ch = c.chunk()
    assert (ch.flags, ch.type, ch.cookie) == (1, CHUNK_ERROR, 9)
    assert ch.payload == struct.pack(">IH", EIO, 12) + b"disk on fire"


def test_structured_non_read_success_is_simple_and_error_is_a_chunk() -> None:
    c = connected(structured=True)
    w = one(c, request(WRITE, 1, 0, 4, payload=b"abcd"))
    f = one(c, request(FLUSH, 2))
    assert isinstance(w, Request) and isinstance(f, Request)
    c.rx += c.conn.reply(w, error=ENOSPC)
    c.rx += c.conn.reply(f)
    ch = c.chunk()
    assert (ch.type, ch.cookie) == (CHUNK_ERROR, 1)
    assert struct.unpack_from(">I", ch.payload)[0] == ENOSPC
    assert c.simple() == (0, 2, b"")


def test_structured_zero_length_read_is_a_none_chunk() -> None:
    c = connected(structured=True)
    r = one(c, request(READ, 5, SIZE, 0))
    assert isinstance(r, Request)
    c.rx += c.conn.reply(r, data=b"")
    ch = c.chunk()
    assert (ch.flags, ch.type, ch.cookie, ch.payload) == (1, CHUNK_NONE, 5, b"")


def test_reply_read_with_holes() -> None:
    c = connected(structured=True)
    r = one(c, request(READ, 4, 4096, 12288))
    assert isinstance(r, Request)
    c.rx += b"".join(c.conn.reply_read(r, [b"a" * 4096, 4096, b"b" * 4096]))
    a, hole, b = c.chunk(), c.chunk(), c.chunk()
    assert (a.flags, a.type, a.payload) == (0, CHUNK_DATA, struct.pack(">Q", 4096) + b"a" * 4096)
    assert (hole.flags, hole.type, hole.payload) == (0, CHUNK_HOLE, struct.pack(">QI", 8192, 4096))
    assert (b.flags, b.type, b.payload[:8]) == (1, CHUNK_DATA, struct.pack(">Q", 12288))
    assert {a.cookie, hole.cookie, b.cookie} == {4}
    # with DF: one content chunk, zeros explicit
    r = one(c, request(READ, 6, 0, 8192, DF))
    assert isinstance(r, Request) and r.df
    c.rx += b"".join(c.conn.reply_read(r, [4096, b"c" * 4096]))
    ch = c.chunk()
    assert (ch.flags, ch.type) == (1, CHUNK_DATA)
    assert ch.payload == bytes(8) + bytes(4096) + b"c" * 4096
    assert c.rx == b""
    assert c.conn.in_flight == 0


def test_reply_read_without_structured_sends_zeros() -> None:
    c = connected()
    r = one(c, request(READ, 4, 0, 1024))
    assert isinstance(r, Request)
    c.rx += b"".join(c.conn.reply_read(r, [512, b"x" * 512]))
    assert c.simple(1024) == (0, 4, bytes(512) + b"x" * 512)


def test_reply_misuse_raises_local_protocol_error() -> None:
    c = connected()
    r = one(c, request(READ, 1, 0, 16))
    w = one(c, request(WRITE, 2, 0, 1, payload=b"x"))
    assert isinstance(r, Request) and isinstance(w, Request)
    with pytest.raises(LocalProtocolError):
        c.conn.reply(r, data=b"short")
    with pytest.raises(LocalProtocolError):
        c.conn.reply(r)
    with pytest.raises(LocalProtocolError):
        c.conn.reply(w, data=b"x")
    with pytest.raises(LocalProtocolError):
        c.conn.reply_read(r, [8, 4])
    with pytest.raises(LocalProtocolError):
        c.conn.reply_read(r, [16, 0])
    with pytest.raises(LocalProtocolError):
        c.conn.reply_read(w, [1])
    assert c.conn.in_flight == 2  # misuse does not count as an answer
    assert c.rx == b""


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (READ, FUA),
        (WRITE, FUA),
        (FLUSH, FUA),
        (TRIM, FUA),
        (CACHE, FUA),
        (CACHE, 0),
        (WRITE_ZEROES, 0),
        (WRITE_ZEROES, NO_HOLE),
        (WRITE_ZEROES, FAST_ZERO),
        (WRITE_ZEROES, NO_HOLE | FAST_ZERO | FUA),
    ],
)
def test_allowed_command_flags(cmd: int, flags: int) -> None:
    c = connected()
    length = 0 if cmd == FLUSH else 512
    ev = one(c, request(cmd, 1, 0, length, flags, b"p" * 512 if cmd == WRITE else b""))
    assert isinstance(ev, Request), ev
    assert (int(ev.command), int(ev.flags), ev.length) == (cmd, flags, length)
    assert ev.fua == bool(flags & FUA)
    assert ev.no_hole == bool(flags & NO_HOLE) and ev.fast_zero == bool(flags & FAST_ZERO)


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (READ, DF),  # DF needs structured replies
        (READ, NO_HOLE),
        (WRITE, NO_HOLE),
        (WRITE, FAST_ZERO),
        (TRIM, NO_HOLE),
        (READ, REQ_ONE),
        (CACHE, FAST_ZERO),
        (WRITE_ZEROES, DF),
        (READ, 1 << 5),
        (WRITE, 1 << 15),
        (FLUSH, NO_HOLE),
    ],
)
def test_invalid_command_flags_are_einval_and_stream_stays_in_sync(cmd: int, flags: int) -> None:
    c = connected()
    length = 0 if cmd == FLUSH else 512
    ev = one(c, request(cmd, 11, 0, length, flags, b"p" * 512 if cmd == WRITE else b""))
    assert isinstance(ev, RequestRejected) and ev.error == EINVAL and ev.cookie == 11
    assert c.simple() == (EINVAL, 11, b"")
    assert isinstance(one(c, request(READ, 12, 0, 512)), Request)


def test_df_allowed_with_structured_replies() -> None:
    c = connected(structured=True)
    ev = one(c, request(READ, 1, 0, 512, DF))
    assert isinstance(ev, Request) and ev.df


@pytest.mark.parametrize("cmd", [7, 8, 9, 100, 0xFFFF])
def test_unknown_commands_are_einval_without_payload(cmd: int) -> None:
    c = connected(structured=True)
    ev = one(c, request(cmd, 5, 0, 4096))
    assert isinstance(ev, RequestRejected) and ev.command == cmd and ev.error == EINVAL
    ch = c.chunk()
    assert ch.type == CHUNK_ERROR and struct.unpack_from(">I", ch.payload)[0] == EINVAL
    assert isinstance(one(c, request(FLUSH, 6)), Request)


def test_read_over_max_payload_is_einval_or_eoverflow_with_df() -> None:
    c = connected(structured=True, max_payload=MiB)
    ev = one(c, request(READ, 1, 0, MiB + 512))
    assert isinstance(ev, RequestRejected) and ev.error == EINVAL
    ch = c.chunk()  # a rejected READ still gets a structured reply
    assert ch.type == CHUNK_ERROR and ch.flags == 1
    ev = one(c, request(READ, 2, 0, MiB + 512, DF))
    assert isinstance(ev, RequestRejected) and ev.error == EOVERFLOW
    assert isinstance(one(c, request(READ, 3, 0, MiB)), Request)


def test_trim_and_zero_may_exceed_max_payload() -> None:
    c = connected(max_payload=256 * 1024)
    for cmd in (TRIM, WRITE_ZEROES, CACHE):
        ev = one(c, request(cmd, 1, 0, SIZE))
        assert isinstance(ev, Request) and ev.length == SIZE > 256 * 1024


@pytest.mark.parametrize(
    ("cmd", "error"),
    [(READ, EINVAL), (TRIM, EINVAL), (CACHE, EINVAL), (WRITE, ENOSPC), (WRITE_ZEROES, ENOSPC)],
)
def test_past_the_end(cmd: int, error: int) -> None:
    c = connected()
    pay = b"q" * 1024 if cmd == WRITE else b""
    ok = one(c, request(cmd, 1, SIZE - 1024, 1024, payload=pay))
    assert isinstance(ok, Request)
    ev = one(c, request(cmd, 2, SIZE - 512, 1024, payload=pay))
    assert isinstance(ev, RequestRejected) and ev.error == error
    ev = one(c, request(cmd, 3, 1 << 63, 512, payload=pay[:512]))
    assert isinstance(ev, RequestRejected) and ev.error == error
    ev = one(c, request(cmd, 4, 0xFFFFFFFFFFFFFFFF, 1, payload=pay[:1]))
    assert isinstance(ev, RequestRejected) and ev.error == error
    assert [c.simple()[:2] for _ in range(3)] == [(error, 2), (error, 3), (error, 4)]
    assert isinstance(one(c, request(FLUSH, 5)), Request)


def test_zero_length_at_the_end_is_valid() -> None:
    c = connected()
    for cmd in (READ, WRITE, TRIM, WRITE_ZEROES, CACHE):
        assert isinstance(one(c, request(cmd, 1, SIZE, 0)), Request)


@pytest.mark.parametrize("cmd", [WRITE, TRIM, WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(cmd: int) -> None:
    c = connected(read_only=True)
    pay = b"w" * 512 if cmd == WRITE else b""
    ev = one(c, request(cmd, 8, 0, 512, payload=pay))
    assert isinstance(ev, RequestRejected) and ev.error == EPERM
    assert c.simple() == (EPERM, 8, b"")
    for ok in (READ, CACHE):
        assert isinstance(one(c, request(ok, 9, 0, 512)), Request)
    assert isinstance(one(c, request(FLUSH, 9)), Request)


def test_flush_with_offset_or_length_is_einval() -> None:
    c = connected()
    for off, ln in ((1, 0), (0, 1)):
        ev = one(c, request(FLUSH, 1, off, ln))
        assert isinstance(ev, RequestRejected) and ev.error == EINVAL


def test_bad_request_magic_is_fatal() -> None:
    c = connected()
    evs = c.send(b"\x00" * 28)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert c.conn.state is State.ERROR and c.rx == b""


def test_disc_is_a_soft_disconnect_and_later_data_is_ignored() -> None:
    c = connected()
    assert isinstance(one(c, request(READ, 1, 0, 512)), Request)
    evs = c.send(request(DISC, 2) + request(READ, 3, 0, 512))
    assert evs == [Disconnect("disc")]
    assert c.conn.state is State.DISCONNECTED
    assert c.conn.in_flight == 1  # the server still owes the READ reply
    c.conn.receive_data(request(WRITE, 4, 0, 1, payload=b"x"))
    assert c.conn.next_event() == Disconnect("disc")
    assert c.rx == b""


def test_huge_write_length_drops_without_allocating() -> None:
    c = connected()
    evs = c.send(request(WRITE, 1, 0, 0xFFFFFFFF))
    assert len(evs) == 1 and isinstance(evs[0], ProtocolError)
    assert c.conn.buffered == 0


def test_write_over_small_max_payload_is_skipped_with_einval() -> None:
    c = connected(max_payload=256 * 1024)
    length = 256 * 1024 + 4096  # over the limit but within the spec's 32 MiB "not a DoS"
    assert c.send(request(WRITE, 1, 0, length)) == []
    for _ in range(length // 65536):
        c.send(b"\x55" * 65536)
        assert c.conn.buffered <= 65536 + 28
    evs = c.send(b"\x55" * (length % 65536) + request(READ, 2, 0, 512))
    assert isinstance(evs[0], RequestRejected) and evs[0].error == EINVAL
    assert isinstance(evs[1], Request)
    assert c.simple() == (EINVAL, 1, b"")


def test_rejected_write_payload_is_skipped() -> None:
    c = connected()
    evs = c.send(request(WRITE, 1, SIZE, 4096, payload=b"x" * 4096) + request(FLUSH, 2))
    assert isinstance(evs[0], RequestRejected) and evs[0].error == ENOSPC
    assert isinstance(evs[1], Request) and evs[1].command is Command.FLUSH


def test_large_write_in_chunks_buffers_at_most_one_payload() -> None:
    c = connected()
    data = bytes(range(256)) * (MAX_PAYLOAD // 256)
    stream = request(WRITE, 77, 0, 0, payload=b"")  # placeholder to get header length
    stream = request(WRITE, 77, 0, MiB, payload=data[:MiB]) + request(
        WRITE, 78, MiB - MiB, MiB, payload=data[MiB : 2 * MiB]
    )
    got = []
    for i in range(0, len(stream), 100_000):
        got += c.send(stream[i : i + 100_000])
        assert c.conn.buffered <= MiB + 28 + 100_000
    assert [type(e) for e in got] == [Request, Request]
    assert got[0].payload == data[:MiB]  # type: ignore[union-attr]
    assert got[1].payload == data[MiB : 2 * MiB]  # type: ignore[union-attr]


def test_write_payload_bytes_passed_through_without_copy() -> None:
    c = connected()
    c.send(request(WRITE, 1, 0, 8192))
    chunk = b"k" * 8192
    (ev,) = c.send(chunk)
    assert isinstance(ev, Request) and ev.payload is chunk


def test_eof_mid_request_and_at_boundary() -> None:
    c = connected()
    c.send(request(WRITE, 1, 0, 4096, payload=b"x" * 100))
    c.conn.receive_data(b"")
    assert c.pump() == [ConnectionClosed(clean=False)]
    assert c.conn.state is State.CLOSED
    c = connected()
    c.send(request(READ, 1, 0, 512)[:10])
    c.conn.receive_data(b"")
    assert c.pump() == [ConnectionClosed(clean=False)]
    c = connected()
    c.conn.receive_data(b"")
    assert c.pump() == [ConnectionClosed(clean=True)]
    c.conn.receive_data(b"more")  # ignored after EOF
    assert c.conn.next_event() == ConnectionClosed(clean=True)


def test_shutdown_refuses_new_requests_with_eshutdown() -> None:
    c = connected(structured=True)
    inflight = one(c, request(READ, 1, 0, 512))
    assert isinstance(inflight, Request)
    c.conn.start_shutdown()
    evs = c.send(
        request(WRITE, 2, 0, 512, payload=b"s" * 512) + request(READ, 3, 0, 512) + request(DISC)
    )
    assert [type(e) for e in evs] == [RequestRejected, RequestRejected, Disconnect]
    assert [e.error for e in evs[:2]] == [ESHUTDOWN, ESHUTDOWN]  # type: ignore[union-attr]
    for cookie in (2, 3):
        ch = c.chunk()
        assert ch.cookie == cookie and struct.unpack_from(">I", ch.payload)[0] == ESHUTDOWN
    # the in-flight READ can be cut short with ESHUTDOWN too
    c.rx += c.conn.reply(inflight, error=ESHUTDOWN)
    assert struct.unpack_from(">I", c.chunk().payload)[0] == ESHUTDOWN


def test_nbd_errno_mapping() -> None:
    assert nbd_errno(0) == 0
    for e in (EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN):
        assert nbd_errno(e) == e
    assert nbd_errno(errno.EDQUOT) == ENOSPC
    assert nbd_errno(errno.EFBIG) == ENOSPC
    assert nbd_errno(errno.EROFS) == EPERM
    assert nbd_errno(errno.ENOENT) == EIO
    c = connected()
    r = one(c, request(WRITE, 1, 0, 1, payload=b"x"))
    assert isinstance(r, Request)
    c.rx += c.conn.reply(r, error=errno.EDQUOT)
    assert c.simple() == (ENOSPC, 1, b"")


def test_next_event_before_data_is_need_data() -> None:
    c = make()
    assert c.conn.next_event() is NEED_DATA
    c.conn.receive_data(b"\x00\x00")
    assert c.conn.next_event() is NEED_DATA
    assert c.conn.buffered == 2


def test_reply_read_runs_of_buffers_are_one_chunk_each() -> None:
    """A data extent given as a list of buffers goes out as one chunk, not joined."""
    c = connected(structured=True)
    r = one(c, request(READ, 7, 0, 4 * 4096))
    assert isinstance(r, Request)
    pages = [b"p" * 4096, b"q" * 4096]
    parts = c.conn.reply_read(r, [pages, 4096, [b"r" * 4096]])
    assert any(p is pages[0] for p in parts) and any(p is pages[1] for p in parts)
    c.rx += b"".join(parts)
    run, hole, last = c.chunk(), c.chunk(), c.chunk()
    assert (run.flags, run.type) == (0, CHUNK_DATA)
    assert run.payload == struct.pack(">Q", 0) + b"p" * 4096 + b"q" * 4096
    assert (hole.flags, hole.type, hole.payload) == (0, CHUNK_HOLE, struct.pack(">QI", 8192, 4096))
    assert (last.flags, last.payload) == (1, struct.pack(">Q", 12288) + b"r" * 4096)
    # DF: one chunk with the holes as zeros
    r = one(c, request(READ, 8, 0, 3 * 4096, DF))
    assert isinstance(r, Request)
    c.rx += b"".join(c.conn.reply_read(r, [[b"a" * 4096, b"b" * 4096], 4096]))
    ch = c.chunk()
    assert (ch.flags, ch.type) == (1, CHUNK_DATA)
    assert ch.payload == bytes(8) + b"a" * 4096 + b"b" * 4096 + bytes(4096)
    with pytest.raises(LocalProtocolError):
        c.conn.reply_read(r, [[], 3 * 4096])  # an empty run
    assert c.rx == b"" and c.conn.in_flight == 0


def test_reply_read_runs_without_structured_replies() -> None:
    c = connected()
    r = one(c, request(READ, 9, 0, 3 * 512))
    assert isinstance(r, Request)
    c.rx += b"".join(c.conn.reply_read(r, [[b"x" * 512, b"y" * 512], 512]))
    assert c.simple(3 * 512) == (0, 9, b"x" * 512 + b"y" * 512 + bytes(512))
    with pytest.raises(LocalProtocolError):
        c.conn.reply_read(r, [[b"x" * 512], 512])  # covers 1024 of 1536 bytes


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_requests_split_anywhere_in_any_buffer_type(kind: type) -> None:
    """bytes chunks are adopted as the receive buffer (payload sliced out as views);
    bytearray/memoryview chunks are copied, so the caller may reuse its buffer."""
    stream = (
        request(WRITE, 1, 0, 8192, payload=bytes(range(256)) * 32)
        + request(READ, 2, 4096, 4096)
        + request(WRITE, 3, 8192, 100, FUA, payload=b"z" * 100)
        + request(READ, 4, SIZE, 1)  # past the end: rejected
        + request(WRITE, 5, 0, 3, payload=b"abc")
    )
    expect = [
        (Command.WRITE, 1, 0, 8192, bytes(range(256)) * 32),
        (Command.READ, 2, 4096, 4096, None),
        (Command.WRITE, 3, 8192, 100, b"z" * 100),
        ("rejected", 4),
        (Command.WRITE, 5, 0, 3, b"abc"),
    ]
    for cut in [*range(60), *range(8180, 8260), len(stream) - 1]:
        c = connected()
        got: list[tuple[object, ...]] = []
        for piece in (stream[:cut], stream[cut:]):
            if not piece:
                continue
            buf = bytearray(piece)
            c.conn.receive_data(kind(buf) if kind is not bytearray else buf)
            while (ev := c.conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    assert ev.payload is None or type(ev.payload) is bytes
                    got.append((ev.command, ev.cookie, ev.offset, ev.length, ev.payload))
                else:
                    assert isinstance(ev, RequestRejected)
                    got.append(("rejected", ev.cookie))
            buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer
        assert got == expect, cut
