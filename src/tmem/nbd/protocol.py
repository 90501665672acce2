"""Server side of the NBD protocol, sans-IO: bytes in, events out, no sockets.

Follows ``doc/proto.md`` of NetworkBlockDevice/nbd: fixed newstyle handshake with
NO_ZEROES, options GO / INFO / EXPORT_NAME / LIST / ABORT / STRUCTURED_REPLY (ERR_UNSUP
for everything else, and parsing goes on), the transmission phase with READ, WRITE, DISC,
FLUSH, TRIM, CACHE, WRITE_ZEROES (NO_HOLE, FAST_ZERO) and FUA, simple replies, and
structured replies when the client asked for them. Like h11 there is no networking code
here: the asyncio server is a thin shell that moves bytes, so every byte-level rule can be
tested (and fuzzed) without a socket.

Using it (the contract the server codes against)::

    conn = ServerConnection({"tmem": ExportInfo("tmem", size)}, default_export="tmem")
    transport.write(conn.initial_bytes())            # the greeting
    while True:
        event = conn.next_event()
        if out := conn.data_to_send():               # ALWAYS flush after next_event()
            transport.write(out)
        if event is NEED_DATA:
            conn.receive_data(await read())          # b"" means EOF
        elif isinstance(event, ExportSelected):
            ...                                      # event.info, event.flags, event.structured
        elif isinstance(event, Request):
            ...                                      # may complete later, in any order:
            transport.writelines(conn.reply_parts(event, error=0, data=page_bytes))
        elif isinstance(event, RequestRejected):
            pass                                     # error reply already in data_to_send()
        elif isinstance(event, Disconnect):          # DISC or OPT_ABORT: finish in-flight
            break                                    # requests, flush, then close
        elif isinstance(event, (ConnectionClosed, ProtocolError)):
            break                                    # close now

Rules the shell must follow:

* After **every** ``next_event()`` call, send ``data_to_send()`` (handshake replies and
  error replies to rejected requests are produced internally).
* Call ``receive_data()`` only after ``next_event()`` returned ``NEED_DATA``. Then the
  receive buffer holds at most one incomplete message (header + at most ``max_payload``
  bytes of WRITE payload) plus the chunk just read; lengths are always checked against
  limits before anything is buffered for them, and oversized options or WRITE payloads
  that can be skipped are discarded as they stream in, never stored.
* A ``Request`` is valid (command known, flags allowed, range inside the export, length
  within the maximum payload, export writable for writes). Answer it exactly once with
  ``reply()`` / ``reply_parts()`` / ``reply_read()``; replies may go out in any order
  (the cookie is opaque). ``reply`` picks a simple or structured reply from the
  negotiation; READ error replies under structured replies are ERROR chunks.
  ``reply_read(req, [data, hole_len, ...])`` sends holes as OFFSET_HOLE chunks when
  structured replies are on (zeros otherwise). ``conn.in_flight`` counts requests not
  answered yet. ``Request.command`` (alias ``kind``) is a ``Command``; ``flags`` a
  ``CmdFlag`` with ``fua`` / ``no_hole`` / ``fast_zero`` / ``df`` shortcuts; a WRITE's
  ``payload`` is ``bytes`` (often the very object passed to receive_data, uncopied).
* Opt-in ``block_status=True``: LIST/SET_META_CONTEXT offer ``base:allocation`` (after
  STRUCTURED_REPLY), ``ExportSelected.meta_context`` says it was selected, and then
  ``Request(command=BLOCK_STATUS)`` events arrive (REQ_ONE allowed); answer them with
  ``reply_block_status(req, [(length, STATE_HOLE | STATE_ZERO), ...])``. Without the
  option those options get ERR_UNSUP and BLOCK_STATUS is EINVAL.
* WRITE payloads over the maximum but within the spec's 32 MiB "not a denial of
  service" bound are skipped and answered EINVAL; larger ones are a ProtocolError.
* Invalid requests never reach the server: the connection queues the NBD error reply
  (EINVAL, ENOSPC, EPERM, EOVERFLOW, ESHUTDOWN) and reports ``RequestRejected``.
* Graceful shutdown: ``conn.start_shutdown()``. Later options get
  NBD_REP_ERR_SHUTDOWN and later requests NBD_ESHUTDOWN (queued automatically); in-flight
  requests can be finished normally or answered with ``error=ESHUTDOWN``.
* Terminal events (``Disconnect``, ``ConnectionClosed``, ``ProtocolError``) are returned
  again by every later ``next_event()`` call; data received afterwards is ignored.
  ``ProtocolError`` means hard-disconnect now (bad magic, unknown client flags, a WRITE
  payload too large to skip, EXPORT_NAME for an unknown export ...).
* Alignment to the advertised minimum block size is *not* enforced here: the block
  device does read-modify-write, so misaligned I/O from clients that never negotiated
  block sizes still works (the spec only says SHOULD for EINVAL on misalignment).
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias

from tmem.errors import ConfigError, TmemError

__all__ = [
    "BASE_ALLOCATION",
    "EINVAL",
    "EIO",
    "ENOMEM",
    "ENOSPC",
    "ENOTSUP",
    "EOVERFLOW",
    "EPERM",
    "ESHUTDOWN",
    "IHAVEOPT",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "NBDMAGIC",
    "NEED_DATA",
    "OPTION_REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRUCTURED_REPLY_MAGIC",
    "Buffer",
    "ChunkType",
    "ClientFlag",
    "CmdFlag",
    "Command",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "ExportSelected",
    "HandshakeFlag",
    "InfoType",
    "LocalProtocolError",
    "NeedData",
    "Option",
    "ProtocolError",
    "ReplyType",
    "Request",
    "RequestRejected",
    "ServerConnection",
    "State",
    "TransmissionFlag",
    "nbd_errno",
]

# --------------------------------------------------------------------------- constants

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

MAX_PAYLOAD: Final = 32 * 1024 * 1024
"""Default maximum payload (2**25): what interoperable clients assume anyway."""

SPEC_SAFE_PAYLOAD: Final = 1 << 25
"""WRITEs up to this size must not be treated as DoS; larger ones over the limit drop."""

MAX_OPTION_LENGTH: Final = 64 * 1024
"""Largest option payload we buffer; GO/INFO need 4 + 4096 + 2 + 2n bytes at most."""

MAX_OPTIONS: Final = 256
"""Options per handshake before we call it a denial of service and hard-disconnect."""

MAX_STRING: Final = 4096
"""Spec limit for names and messages (UTF-8, no NUL)."""

# NBD error values (not raw errno: the spec fixes these numbers).
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108
_NBD_ERRORS: Final = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})


def nbd_errno(err: int) -> int:
    """Map a host errno to the NBD error set (the spec does not allow raw errno values).

    EDQUOT/EFBIG become ENOSPC and EROFS/EACCES become EPERM as the spec asks; anything
    else outside the set becomes EIO. 0 stays 0.
    """
    if err == 0 or err in _NBD_ERRORS:
        return err
    if err in (_errno.EDQUOT, _errno.EFBIG):
        return ENOSPC
    if err in (_errno.EROFS, _errno.EACCES):
        return EPERM
    if err == _errno.EOPNOTSUPP:
        return ENOTSUP
    return EIO


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR: Final = 1 << 31


class ReplyType(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class InfoType(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE: Final = 1

BASE_ALLOCATION: Final = "base:allocation"
META_CONTEXT_ID: Final = 1
"""Our id for base:allocation (the only metadata context; ids are opaque to clients)."""
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
MAX_EXTENTS: Final = 1 << 20

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPT_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQ_HDR = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + u64 offset
_ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length

OPTION_HEADER_SIZE: Final = _OPT_HDR.size  # 16
REQUEST_HEADER_SIZE: Final = _REQ_HDR.size  # 28

# Commands that modify the export, and the error for ranges past its end.
_WRITES: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
_PAST_END_ERROR: Final = {
    Command.READ: EINVAL,
    Command.BLOCK_STATUS: EINVAL,
    Command.TRIM: EINVAL,
    Command.CACHE: EINVAL,
    Command.WRITE: ENOSPC,
    Command.WRITE_ZEROES: ENOSPC,
}
# Lookups instead of Enum construction on the per-request path (EnumType.__call__ costs
# about a microsecond): every command value, and every combination of known flag bits.
_COMMANDS: Final[dict[int, Command]] = {int(c): c for c in Command}
_CMD_FLAGS: Final[dict[int, CmdFlag]] = {f: CmdFlag(f) for f in range(32)}
_READ: Final = Command.READ
_WRITE: Final = Command.WRITE


# --------------------------------------------------------------------------- data types


class LocalProtocolError(TmemError, ValueError):
    """Our own side misused the API (e.g. a READ reply with the wrong amount of data)."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake advertises about one export.

    ``multi_conn`` is true because every connection of a tmem server shares one store, so
    FLUSH/FUA on one connection covers writes made through the others.
    """

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = 512
    preferred_block: int = 4096
    max_payload: int = MAX_PAYLOAD
    multi_conn: bool = True
    rotational: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ConfigError(f"export size must be in [0, 2**63): {self.size}")
        for what, text in (("name", self.name), ("description", self.description)):
            raw = text.encode("utf-8")
            if len(raw) > MAX_STRING or "\0" in text:
                raise ConfigError(f"export {what} must be <= 4096 UTF-8 bytes without NUL")
        if not _is_pow2(self.min_block) or self.min_block > 65536:
            raise ConfigError(f"min_block must be a power of 2 <= 65536: {self.min_block}")
        if not _is_pow2(self.preferred_block) or self.preferred_block < max(self.min_block, 512):
            raise ConfigError(
                f"preferred_block must be a power of 2 >= max(min_block, 512): "
                f"{self.preferred_block}"
            )
        if not self.preferred_block <= self.max_payload <= 1 << 30:
            raise ConfigError(
                f"max_payload must be in [preferred_block, 1 GiB]: {self.max_payload}"
            )

    def transmission_flags(self, structured: bool = False) -> TransmissionFlag:
        """The flags sent with this export (SEND_DF needs structured replies)."""
        f = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_CACHE
        )
        if self.read_only:
            f |= TransmissionFlag.READ_ONLY
        else:
            f |= (
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        if self.multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if self.rotational:
            f |= TransmissionFlag.ROTATIONAL
        if structured:
            f |= TransmissionFlag.SEND_DF
        return f


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    NEGOTIATING = "negotiating"
    TRANSMISSION = "transmission"
    DISCONNECTED = "disconnected"  # client sent DISC or OPT_ABORT: finish, then close
    CLOSED = "closed"  # EOF from the client
    ERROR = "error"  # protocol violation: hard-disconnect


class NeedData:
    """Sentinel type: feed more bytes with receive_data()."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        inst = NeedData._instance
        if inst is None:
            inst = NeedData._instance = super().__new__(cls)
        return inst

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
_TRANSMISSION: Final = State.TRANSMISSION


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """Transmission phase entered (after GO or EXPORT_NAME); the reply is already queued.

    ``block_size_acked``: the client sent GO with an NBD_INFO_BLOCK_SIZE request, so it
    promised to obey min_block / max_payload (clients that did not still get served).
    """

    name: str
    info: ExportInfo
    flags: TransmissionFlag
    structured: bool
    max_payload: int
    block_size_acked: bool
    meta_context: bool = False


class Request:
    """A validated transmission request. ``payload`` is the data of a WRITE, else None.

    Immutable like the other events (``Final`` attributes: mypy rejects assignment and
    the compiled build refuses it at run time), but a plain class rather than a frozen
    dataclass: one is built per request, and compiled this costs 0.2 us where the frozen
    dataclass's ``object.__setattr__`` calls cost 0.8-1.5 us.
    """

    __slots__ = ("command", "cookie", "flags", "length", "offset", "payload")

    def __init__(
        self,
        command: Command,
        flags: CmdFlag,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | None = None,
    ) -> None:
        self.command: Final = command
        self.flags: Final = flags
        self.cookie: Final = cookie
        self.offset: Final = offset
        self.length: Final = length
        self.payload: Final = payload

    def _key(self) -> tuple[Command, CmdFlag, int, int, int, bytes | None]:
        return (self.command, self.flags, self.cookie, self.offset, self.length, self.payload)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Request:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:  # the payload left out, as a dataclass field(repr=False)
        return (
            f"Request(command={self.command!r}, flags={self.flags!r}, cookie={self.cookie!r},"
            f" offset={self.offset!r}, length={self.length!r})"
        )

    @property
    def kind(self) -> Command:
        """Alias of ``command`` (the name used in the first API sketch)."""
        return self.command

    @property
    def fua(self) -> bool:
        return int(self.flags) & 1 != 0  # int: IntFlag's & builds a new member

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & CmdFlag.NO_HOLE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & CmdFlag.FAST_ZERO)

    @property
    def df(self) -> bool:
        return bool(self.flags & CmdFlag.DF)


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the protocol layer answered with an error itself (reply already queued).

    ``command`` is the raw type field (it may not be a known Command).
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Soft disconnect: NBD_CMD_DISC ("disc") or NBD_OPT_ABORT ("abort").

    Finish in-flight requests, send data_to_send() (the ABORT ack), then close.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """EOF from the client. ``clean`` is false when it arrived in the middle of a message."""

    clean: bool


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke a MUST of the protocol; hard-disconnect now."""

    reason: str


Event: TypeAlias = (
    ExportSelected | Request | RequestRejected | Disconnect | ConnectionClosed | ProtocolError
)
TerminalEvent: TypeAlias = Disconnect | ConnectionClosed | ProtocolError
Exports: TypeAlias = Mapping[str, ExportInfo] | Callable[[], Mapping[str, ExportInfo]]
Buffer: TypeAlias = bytes | bytearray | memoryview

_TERMINAL_STATES: Final = {
    State.DISCONNECTED,
    State.CLOSED,
    State.ERROR,
}


def _decode_string(raw: bytes) -> str | None:
    """A spec string: UTF-8, no NUL, <= 4096 bytes; None if it is not one."""
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT option, None if malformed."""
    if len(data) < 8:
        return None
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 8:
        return None
    name = _decode_string(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if name is None or count > (len(data) - pos) // 4:
        return None
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            return None
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            return None
        query = _decode_string(data[pos : pos + qlen])
        pos += qlen
        if query is None:
            return None
        queries.append(query)
    if pos != len(data):
        return None
    return name, queries


def _message(text: str) -> bytes:
    raw = text.encode("utf-8", "replace").replace(b"\0", b"?")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


# --------------------------------------------------------------------------- connection


class ServerConnection:
    """One client connection, from greeting to disconnect. See the module docstring."""

    def __init__(
        self,
        exports: Exports,
        default_export: str | None = None,
        *,
        max_payload: int = MAX_PAYLOAD,
        max_option_length: int = MAX_OPTION_LENGTH,
        max_options: int = MAX_OPTIONS,
        block_status: bool = False,
    ) -> None:
        if not 4096 <= max_payload <= 1 << 30:
            raise ConfigError(f"max_payload must be in [4096, 1 GiB]: {max_payload}")
        if max_option_length < 4 + MAX_STRING + 2 + 8:
            raise ConfigError("max_option_length too small for a 4096-byte export name")
        self._exports = exports
        self._default_export = default_export
        self._max_payload = max_payload
        # WRITE payloads over the limit but <= this are skipped (EINVAL), larger ones drop.
        self._skip_limit = max(max_payload, SPEC_SAFE_PAYLOAD)
        self._max_option_length = max_option_length
        self._max_options = max_options
        self._block_status = block_status
        self._meta_export: str | None = None  # export the last SET_META_CONTEXT selected for

        self._state = State.AWAIT_CLIENT_FLAGS
        # Unparsed input. A bytes chunk from receive_data() is adopted as it is (no copy;
        # WRITE payload is then sliced out of it as read-only views), anything else is
        # copied into a bytearray, which is never viewed (so it can grow and shrink).
        self._buf: bytes | bytearray | memoryview = bytearray()
        self._pos = 0  # start of unconsumed data in _buf
        self._eof = False
        self._out: list[bytes] = [
            _U64.pack(NBDMAGIC)
            + _U64.pack(IHAVEOPT)
            + _U16.pack(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        ]
        self._terminal: TerminalEvent | None = None

        # Pending multi-byte work that bypasses the buffer (see receive_data).
        self._skip = 0  # bytes still to discard
        self._after_skip: Callable[[], Event | None] | None = None
        self._payload_need = 0  # WRITE payload bytes still to collect
        self._payload_parts: list[Buffer] = []
        self._payload_hdr: tuple[int, int, int, int, int] | None = None

        self.client_flags = ClientFlag(0)
        self.structured = False
        self.export: ExportInfo | None = None
        self.export_name: str | None = None
        self.flags = TransmissionFlag(0)
        self.options_received = 0
        self.in_flight = 0
        self.shutting_down = False
        self.meta_context = False  # base:allocation active: BLOCK_STATUS requests allowed
        # Copies of the selected export's limits for the READ/WRITE fast path in
        # _read_request (ExportInfo is frozen, so they cannot go stale); -1: no export.
        self._fast_max = -1
        self._fast_size = 0
        self._fast_write = False

    # ---------------------------------------------------------------- public API

    @property
    def state(self) -> State:
        return self._state

    @property
    def max_payload(self) -> int:
        """Effective maximum payload (the export's, once one is selected)."""
        if self.export is not None:
            return min(self._max_payload, self.export.max_payload)
        return self._max_payload

    @property
    def buffered(self) -> int:
        """Bytes held for incomplete messages (buffer plus collected WRITE payload)."""
        return len(self._buf) - self._pos + sum(len(p) for p in self._payload_parts)

    def initial_bytes(self) -> bytes:
        """The greeting (NBDMAGIC, IHAVEOPT, handshake flags); same as data_to_send() now."""
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Bytes the connection produced itself (greeting, option replies, error replies)."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def start_shutdown(self) -> None:
        """From now on refuse options with ERR_SHUTDOWN and requests with ESHUTDOWN."""
        self.shutting_down = True

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the client; ``b""`` signals EOF. Ignored after a terminal event."""
        if self._state in _TERMINAL_STATES or self._eof:
            return
        if not data:
            self._eof = True
            return
        frozen = type(data) is bytes  # immutable: safe to keep views of it
        if self._pos == len(self._buf) and (self._skip or self._payload_need):
            # Fast paths with an empty buffer: discard skipped bytes without storing them,
            # keep WRITE payload chunks as they are (one join later, no bytearray copy).
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                data = memoryview(data)[n:]
            elif self._payload_need:
                n = min(self._payload_need, len(data))
                if n == len(data) and frozen:
                    self._payload_parts.append(data)
                else:
                    chunk = memoryview(data)[:n]
                    self._payload_parts.append(chunk if frozen else bytes(chunk))
                self._payload_need -= n
                data = memoryview(data)[n:]
            if not data:
                return
        if self._pos == len(self._buf):  # nothing unparsed: take the chunk as the buffer
            self._buf = data if frozen else bytearray(data)
            self._pos = 0
            return
        buf = self._buf
        if type(buf) is not bytearray:  # an adopted chunk's tail (a partial message)
            buf = bytearray(memoryview(buf)[self._pos :])
            self._pos = 0
        elif self._pos >= 65536 and self._pos * 2 >= len(buf):
            del buf[: self._pos]
            self._pos = 0
        buf += data
        self._buf = buf

    def next_event(self) -> Event | NeedData:
        """Parse what was received; NEED_DATA when a whole message is not there yet."""
        if self._terminal is not None:
            return self._terminal
        while True:
            state = self._state
            if state is _TRANSMISSION:
                result = self._read_request()
                if type(result) is Request or result is NEED_DATA:
                    return result  # the common cases, without the terminal checks
            elif state is State.AWAIT_CLIENT_FLAGS:
                result = self._read_client_flags()
            elif state is State.NEGOTIATING:
                result = self._read_option()
            else:
                result = self._read_request()
            if result is None:
                continue
            if isinstance(result, Disconnect | ConnectionClosed | ProtocolError):
                self._terminal = result
                if isinstance(result, ProtocolError):
                    self._state = State.ERROR
                elif isinstance(result, ConnectionClosed):
                    self._state = State.CLOSED
                else:
                    self._state = State.DISCONNECTED
                self._buf = bytearray()
                self._pos = 0
                self._payload_parts = []
            return result

    # ---------------------------------------------------------------- replies

    def reply_parts(
        self, request: Request, error: int = 0, data: Buffer | None = None, message: str = ""
    ) -> list[Buffer]:
        """The reply to ``request`` as a list of buffers (for writelines: no data copy).

        READ success needs exactly ``request.length`` bytes of data; other commands take
        no data. ``error`` is mapped into the NBD error set with nbd_errno().
        """
        error = nbd_errno(error)
        if error:
            self._complete(request)
            return [self._error_reply(request.cookie, request.command, error, message)]
        if request.command is Command.READ:
            if data is None or len(data) != request.length:
                got = "no data" if data is None else f"{len(data)} bytes"
                raise LocalProtocolError(f"READ of {request.length} bytes answered with {got}")
            self._complete(request)
            if not self.structured:
                return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie), data]
            if not data:
                return [
                    _CHUNK.pack(
                        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.NONE, request.cookie, 0
                    )
                ]
            hdr = _CHUNK_OFFSET.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                ChunkType.OFFSET_DATA,
                request.cookie,
                8 + len(data),
                request.offset,
            )
            return [hdr, data]
        if request.command is Command.BLOCK_STATUS:
            if data:
                raise LocalProtocolError("use reply_block_status() for BLOCK_STATUS extents")
            # "a server MAY always safely report a status of 0"
            return self.reply_block_status(request, [(request.length, 0)])
        if data:
            raise LocalProtocolError(f"{request.command.name} replies carry no data")
        self._complete(request)
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)]

    def reply(
        self, request: Request, error: int = 0, data: Buffer | None = None, message: str = ""
    ) -> bytes:
        """Like reply_parts(), joined into one bytes object."""
        return b"".join(self.reply_parts(request, error, data, message))

    def reply_read(
        self, request: Request, extents: Sequence[Buffer | int | Sequence[Buffer]]
    ) -> list[Buffer]:
        """A successful READ reply from consecutive extents: data buffers or hole lengths.

        A data extent may also be a sequence of buffers (e.g. pages): it goes out as one
        data run without being joined, so the reply costs no copy of the data.
        With structured replies (and no DF flag) holes go out as OFFSET_HOLE chunks, so
        never-written ranges cost 32 bytes on the wire; otherwise they are sent as zeros.
        """
        if request.command is not Command.READ:
            raise LocalProtocolError(f"reply_read() for {request.command.name}")
        sizes: list[int] = []
        for e in extents:
            if isinstance(e, int):
                n = e
            elif isinstance(e, bytes | bytearray | memoryview):
                n = len(e)
            else:
                n = sum([len(b) for b in e])
            if n <= 0:
                raise LocalProtocolError("READ extents must be non-empty")
            sizes.append(n)
        total = sum(sizes)
        if total != request.length:
            raise LocalProtocolError(
                f"extents cover {total} bytes, READ of {request.length} requested"
            )
        if not extents:
            return self.reply_parts(request, 0, b"")
        parts: list[Buffer] = []
        if not self.structured or request.df:  # one run of data, holes as zeros
            for e in extents:
                if isinstance(e, int):
                    parts.append(bytes(e))
                elif isinstance(e, bytes | bytearray | memoryview):
                    parts.append(e)
                else:
                    parts.extend(e)
            self._complete(request)
            if not self.structured:
                return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie), *parts]
            hdr = _CHUNK_OFFSET.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                ChunkType.OFFSET_DATA,
                request.cookie,
                8 + total,
                request.offset,
            )
            return [hdr, *parts]
        self._complete(request)
        offset = request.offset
        last = len(extents) - 1
        for i, e in enumerate(extents):
            flags = REPLY_FLAG_DONE if i == last else 0
            if isinstance(e, int):
                parts.append(
                    _CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC,
                        flags,
                        ChunkType.OFFSET_HOLE,
                        request.cookie,
                        12,
                        offset,
                    )
                    + _U32.pack(e)
                )
            else:
                parts.append(
                    _CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC,
                        flags,
                        ChunkType.OFFSET_DATA,
                        request.cookie,
                        8 + sizes[i],
                        offset,
                    )
                )
                if isinstance(e, bytes | bytearray | memoryview):
                    parts.append(e)
                else:
                    parts.extend(e)
            offset += sizes[i]
        return parts

    def reply_block_status(
        self, request: Request, extents: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        """A successful BLOCK_STATUS reply: consecutive (length, STATE_HOLE|STATE_ZERO) from
        ``request.offset``. Extents past the request are trimmed (REQ_ONE: just one)."""
        if request.command is not Command.BLOCK_STATUS:
            raise LocalProtocolError(f"reply_block_status() for {request.command.name}")
        if not extents:
            raise LocalProtocolError("BLOCK_STATUS needs at least one extent")
        body = bytearray(_U32.pack(META_CONTEXT_ID))
        covered = 0
        limit = 1 if request.flags & CmdFlag.REQ_ONE else MAX_EXTENTS
        for n, (length, flags) in enumerate(extents):
            if length <= 0 or not 0 <= flags < 1 << 32:
                raise LocalProtocolError(f"bad extent ({length}, {flags})")
            if n == limit or covered >= request.length:
                break
            length = min(length, request.length - covered)
            body += struct.pack(">II", length, flags)
            covered += length
        self._complete(request)
        hdr = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            ChunkType.BLOCK_STATUS,
            request.cookie,
            len(body),
        )
        return [hdr + body]

    def _complete(self, request: Request) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1

    def _error_reply(self, cookie: int, command: int, error: int, message: str) -> bytes:
        if not self.structured:
            return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        msg = _message(message)
        return (
            _CHUNK.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.ERROR, cookie, 6 + len(msg)
            )
            + _ERROR_PAYLOAD.pack(error, len(msg))
            + msg
        )

    # ---------------------------------------------------------------- input plumbing

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        start = self._pos
        self._pos += n
        with memoryview(self._buf) as mv:
            return bytes(mv[start : start + n])

    def _take_part(self, n: int) -> Buffer:
        """Like _take, but a view (no copy) when the buffer is an adopted bytes chunk."""
        buf = self._buf
        if type(buf) is bytearray:
            return self._take(n)
        start = self._pos
        self._pos += n
        return memoryview(buf)[start : start + n]

    def _eof_event(self, partial: bool) -> Event | NeedData:
        if self._eof:
            return ConnectionClosed(clean=not partial and self._available() == 0)
        return NEED_DATA

    def _drain_skip(self) -> bool:
        """Discard buffered bytes owed to a skip; True when the skip is complete."""
        n = min(self._skip, self._available())
        self._pos += n
        self._skip -= n
        return self._skip == 0

    # ---------------------------------------------------------------- handshake

    def _read_client_flags(self) -> Event | NeedData | None:
        if self._available() < 4:
            return self._eof_event(partial=self._available() > 0)
        (flags,) = _U32.unpack(self._take(4))
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            return ProtocolError(f"unknown client flags {flags:#x}")
        self.client_flags = ClientFlag(flags)
        self._state = State.NEGOTIATING
        return None

    def _opt_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, rtype, len(data)) + data)

    def _opt_error(self, option: int, rtype: ReplyType, message: str) -> None:
        self._opt_reply(option, rtype, _message(message))

    def _read_option(self) -> Event | NeedData | None:
        if self._after_skip is not None:
            if not self._drain_skip():
                return self._eof_event(partial=True)
            done, self._after_skip = self._after_skip, None
            return done()
        avail = self._available()
        if avail < OPTION_HEADER_SIZE:
            return self._eof_event(partial=avail > 0)
        magic, option, length = _OPT_HDR.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            return ProtocolError(f"bad option magic {magic:#x}")
        self.options_received += 1
        if self.options_received > self._max_options:
            return ProtocolError(f"more than {self._max_options} options")
        if length > self._max_option_length:
            self._pos += OPTION_HEADER_SIZE
            if option == Option.EXPORT_NAME:  # no way to report an error: hard disconnect
                return ProtocolError(f"EXPORT_NAME of {length} bytes")
            self._skip = length

            def too_big() -> None:
                self._opt_error(option, ReplyType.ERR_TOO_BIG, f"option data of {length} bytes")

            self._after_skip = too_big
            return None
        if avail < OPTION_HEADER_SIZE + length:
            return self._eof_event(partial=True)
        self._pos += OPTION_HEADER_SIZE
        data = self._take(length)
        return self._handle_option(option, data)

    def _lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        exports = self._exports() if callable(self._exports) else self._exports
        if name == "" and self._default_export is not None:
            name = self._default_export
        info = exports.get(name)
        return None if info is None else (name, info)

    def _export_list(self) -> Iterable[tuple[str, ExportInfo]]:
        exports = self._exports() if callable(self._exports) else self._exports
        return list(exports.items())

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == Option.ABORT:
            self._opt_reply(option, ReplyType.ACK)
            return Disconnect("abort")
        if self.shutting_down:
            if option == Option.EXPORT_NAME:
                return ProtocolError("server shutting down (EXPORT_NAME cannot report it)")
            self._opt_error(option, ReplyType.ERR_SHUTDOWN, "server is shutting down")
            return None
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option in (Option.GO, Option.INFO):
            return self._info_or_go(option, data)
        if option == Option.LIST:
            if data:
                self._opt_error(option, ReplyType.ERR_INVALID, "LIST takes no data")
                return None
            for name, info in self._export_list():
                raw = name.encode("utf-8")
                self._opt_reply(
                    option,
                    ReplyType.SERVER,
                    _U32.pack(len(raw)) + raw + info.description.encode("utf-8"),
                )
            self._opt_reply(option, ReplyType.ACK)
            return None
        if self._block_status and option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_option(option, data)
            return None
        if option == Option.STRUCTURED_REPLY:
            if data:
                self._opt_error(option, ReplyType.ERR_INVALID, "STRUCTURED_REPLY takes no data")
                return None
            self.structured = True
            self._opt_reply(option, ReplyType.ACK)
            return None
        try:
            name = Option(option).name
        except ValueError:
            name = str(option)
        self._opt_error(option, ReplyType.ERR_UNSUP, f"option {name} not supported")
        return None

    def _meta_option(self, option: int, data: bytes) -> None:
        """LIST/SET_META_CONTEXT; the only context is base:allocation."""
        if option == Option.SET_META_CONTEXT:
            self._meta_export = None  # a SET replaces the selection even when it fails
        if not self.structured:
            self._opt_error(option, ReplyType.ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._opt_error(option, ReplyType.ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        found = self._lookup(name)
        if found is None:
            self._opt_error(option, ReplyType.ERR_UNKNOWN, f"unknown export {name!r}")
            return
        if option == Option.LIST_META_CONTEXT:
            hit = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            ctx_id = 0  # reserved in LIST replies
        else:
            hit = BASE_ALLOCATION in queries
            ctx_id = META_CONTEXT_ID
            if hit:
                self._meta_export = found[0]
        if hit:
            self._opt_reply(
                option, ReplyType.META_CONTEXT, _U32.pack(ctx_id) + BASE_ALLOCATION.encode()
            )
        self._opt_reply(option, ReplyType.ACK)

    def _enter_transmission(self, name: str, info: ExportInfo, acked: bool) -> ExportSelected:
        self.meta_context = self._meta_export == name
        self.export = info
        self.export_name = name
        self.flags = info.transmission_flags(self.structured)
        self._fast_max = self.max_payload
        self._fast_size = info.size
        self._fast_write = not info.read_only
        self._state = State.TRANSMISSION
        return ExportSelected(
            name, info, self.flags, self.structured, self.max_payload, acked, self.meta_context
        )

    def _export_name(self, data: bytes) -> Event:
        name = _decode_string(data)
        if name is None:
            return ProtocolError("EXPORT_NAME with an invalid name")
        found = self._lookup(name)
        if found is None:
            return ProtocolError(f"EXPORT_NAME for unknown export {name!r}")
        canonical, info = found
        # The export-name reply is decided after STRUCTURED_REPLY, so structured may be on.
        flags = info.transmission_flags(self.structured)
        pad = b"" if self.client_flags & ClientFlag.NO_ZEROES else bytes(124)
        self._out.append(_U64.pack(info.size) + _U16.pack(flags) + pad)
        return self._enter_transmission(canonical, info, acked=False)

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._opt_error(option, ReplyType.ERR_INVALID, "option data too short")
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            self._opt_error(option, ReplyType.ERR_INVALID, "export name length too large")
            return None
        (n_req,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * n_req:
            self._opt_error(option, ReplyType.ERR_INVALID, "information request count mismatch")
            return None
        name = _decode_string(data[4 : 4 + name_len])
        if name is None:
            self._opt_error(option, ReplyType.ERR_INVALID, "export name is not a valid string")
            return None
        requests = {_U16.unpack_from(data, 4 + name_len + 2 + 2 * i)[0] for i in range(n_req)}
        found = self._lookup(name)
        if found is None:
            self._opt_error(option, ReplyType.ERR_UNKNOWN, f"unknown export {name!r}")
            return None
        canonical, info = found
        max_payload = min(self._max_payload, info.max_payload)
        flags = info.transmission_flags(self.structured)
        self._opt_reply(
            option,
            ReplyType.INFO,
            _U16.pack(InfoType.EXPORT) + _U64.pack(info.size) + _U16.pack(flags),
        )
        if InfoType.NAME in requests:
            raw = canonical.encode("utf-8")
            self._opt_reply(option, ReplyType.INFO, _U16.pack(InfoType.NAME) + raw)
        if InfoType.DESCRIPTION in requests:
            raw = info.description.encode("utf-8")
            self._opt_reply(option, ReplyType.INFO, _U16.pack(InfoType.DESCRIPTION) + raw)
        # Sent even when not asked: the server "SHOULD advertise" non-default constraints.
        self._opt_reply(
            option,
            ReplyType.INFO,
            _U16.pack(InfoType.BLOCK_SIZE)
            + _U32.pack(info.min_block)
            + _U32.pack(info.preferred_block)
            + _U32.pack(max_payload),
        )
        self._opt_reply(option, ReplyType.ACK)
        if option == Option.INFO:
            return None
        return self._enter_transmission(canonical, info, acked=InfoType.BLOCK_SIZE in requests)

    # ---------------------------------------------------------------- transmission

    def _reject(
        self,
        cookie: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        error: int,
        reason: str,
    ) -> RequestRejected:
        self._out.append(self._error_reply(cookie, command, error, reason))
        return RequestRejected(cookie, command, flags, offset, length, error, reason)

    def _validate(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(0, "") for a valid request, else the NBD error and why."""
        info = self.export
        assert info is not None
        if command not in _PAST_END_ERROR and command != Command.FLUSH:
            return EINVAL, f"unknown or unsupported command {command}"
        cmd = _COMMANDS[command]
        if cmd is Command.BLOCK_STATUS and not self.meta_context:
            return EINVAL, "BLOCK_STATUS without a negotiated metadata context"
        allowed = CmdFlag.FUA
        if cmd is Command.READ and self.structured:
            allowed |= CmdFlag.DF
        elif cmd is Command.BLOCK_STATUS:
            allowed |= CmdFlag.REQ_ONE
        elif cmd is Command.WRITE_ZEROES:
            allowed |= CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
        if flags & ~int(allowed):  # int: ~ on an IntFlag drops unknown bits
            return EINVAL, f"flags {flags:#x} not allowed for {cmd.name}"
        if cmd is Command.FLUSH:
            if offset or length:
                return EINVAL, "FLUSH with nonzero offset or length"
            return 0, ""
        if cmd is Command.BLOCK_STATUS and length == 0:
            return EINVAL, "BLOCK_STATUS of 0 bytes"
        if info.read_only and cmd in _WRITES:
            return EPERM, f"{cmd.name} on a read-only export"
        if cmd is Command.WRITE and length > self.max_payload:
            return EINVAL, f"WRITE of {length} bytes exceeds max payload {self.max_payload}"
        if cmd is Command.READ and length > self.max_payload:
            err = EOVERFLOW if flags & CmdFlag.DF else EINVAL
            return err, f"READ of {length} bytes exceeds max payload {self.max_payload}"
        if offset + length > info.size:
            return (
                _PAST_END_ERROR[cmd],
                f"{cmd.name} of {length} bytes at {offset} is past the end ({info.size})",
            )
        return 0, ""

    def _read_request(self) -> Event | NeedData | None:
        if self._after_skip is not None:
            if not self._drain_skip():
                return self._eof_event(partial=True)
            done, self._after_skip = self._after_skip, None
            return done()
        if self._payload_hdr is not None:
            return self._collect_payload()
        avail = self._available()
        if avail < REQUEST_HEADER_SIZE:
            return self._eof_event(partial=avail > 0)
        magic, flags, command, cookie, offset, length = _REQ_HDR.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            return ProtocolError(f"bad request magic {magic:#x}")
        self._pos += REQUEST_HEADER_SIZE
        # Fast path: a READ or WRITE with no flag but FUA, inside the export and the
        # payload limit, is valid (the checks _validate would make, in one comparison).
        if (
            command <= 1
            and flags <= 1
            and length <= self._fast_max
            and offset + length <= self._fast_size
            and not self.shutting_down
        ):
            if command == 0:
                self.in_flight += 1
                return Request(_READ, _CMD_FLAGS[flags], cookie, offset, length)
            if self._fast_write:
                self._payload_hdr = (flags, command, cookie, offset, length)
                self._payload_need = length
                self._payload_parts = []
                return self._collect_payload()
        if command == Command.DISC:
            return Disconnect("disc")
        if command == Command.WRITE:
            if length > self._skip_limit:
                return ProtocolError(f"WRITE payload of {length} bytes is too large")
            if self.shutting_down:
                error, reason = ESHUTDOWN, "server is shutting down"
            else:
                error, reason = self._validate(command, flags, offset, length)
            if error:
                # Stay in sync: discard the payload as it streams in, then answer.
                self._skip = length

                def rejected() -> Event:
                    return self._reject(cookie, command, flags, offset, length, error, reason)

                self._after_skip = rejected
                return None
            self._payload_hdr = (flags, command, cookie, offset, length)
            self._payload_need = length
            self._payload_parts = []
            return self._collect_payload()
        if self.shutting_down:
            return self._reject(
                cookie, command, flags, offset, length, ESHUTDOWN, "server is shutting down"
            )
        error, reason = self._validate(command, flags, offset, length)
        if error:
            return self._reject(cookie, command, flags, offset, length, error, reason)
        self.in_flight += 1
        return Request(_COMMANDS[command], _CMD_FLAGS[flags], cookie, offset, length)

    def _collect_payload(self) -> Event | NeedData:
        if self._payload_need:
            n = min(self._payload_need, self._available())
            if n:
                self._payload_parts.append(self._take_part(n))
                self._payload_need -= n
            if self._payload_need:
                return self._eof_event(partial=True)
        assert self._payload_hdr is not None
        flags, _command, cookie, offset, length = self._payload_hdr
        self._payload_hdr = None
        parts, self._payload_parts = self._payload_parts, []
        payload = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        self.in_flight += 1
        return Request(_WRITE, _CMD_FLAGS[flags], cookie, offset, length, payload)
