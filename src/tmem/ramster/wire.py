"""Sans-IO RAMster wire codec: frames, typed messages, one role-agnostic Connection.

The kernel's r2net sent raw host-order structs of at most 4072 bytes and trusted
its peers. Here every frame is big-endian, checksummed, bounded *before* it is
buffered, and (with a :class:`~tmem.ramster.handshake.Handshake`) accepted only
from a peer that proved knowledge of the cluster secret. No sockets, no asyncio:
bytes in, events out (h11 style); the asyncio transport is a thin shell.

Frame (``HEADER_SIZE`` = 28 bytes, then ``length`` payload bytes)::

    magic   u16  0x7734 ("RMSTR_KEY" low half)
    version u8   PROTOCOL_VERSION
    type    u8   MsgType
    flags   u16  per-type flags (FLAG_FREE on GetBatch)
    _pad    u16  zero
    cookie  u64  request id chosen by the requester; replies echo it
    status  i32  0 or a negative errno (replies)
    length  u32  payload length, checked against max_payload before buffering
    crc     u32  zlib.crc32 over header bytes 0..23 then the payload

Page identity (``KEY``, 33 bytes): client u16, pool_id u16, flags u8
(bit0 persistent, bit1 raw/uncompressed data, bit2 miss, bit3 whole object),
oid 3 x u64, index u32.  Page-carrying items add a u32 data length; in batches
all fixed records come first, then the concatenated data, so decoding is one
``struct.iter_unpack`` plus zero-copy ``memoryview`` slices.

API::

    conn = Connection(handshake=hs)        # hs: tmem.ramster.handshake.Handshake
    sock.write(conn.data_to_send())        # our HELLO (queued by the constructor)
    conn.receive_data(chunk)               # b"" means EOF
    while (ev := conn.next_event()) is not NEED_DATA:
        match ev:
            case Authenticated(): ...      # data messages may flow from now on
            case HandshakeFailed() | ProtocolError(): drop + count (terminal)
            case ConnectionClosed(): peer closed cleanly (terminal)
            case Put(key=k, data=d, cookie=c): ...
    sock.write(conn.data_to_send())        # e.g. our PROOF, queued by the handshake
    sock.write(conn.send(Status(cookie=c, status=0)))

``Connection(handshake=None)`` trusts the peer from the first byte (unit tests and
benchmarks only; a node always passes a Handshake).

Events returned by :meth:`Connection.next_event`: every :class:`Message` subclass
(with ``cookie``/``status`` from the header), :class:`Authenticated`,
:class:`HandshakeFailed`, :class:`ProtocolError`, :class:`ConnectionClosed`, and
the :data:`NEED_DATA` sentinel. The last three-but-one are *terminal*: afterwards
the connection is closed, ignores received data, returns NEED_DATA forever and
raises :class:`ConnectionClosedError` from :meth:`Connection.send`.

Decoded page data are read-only ``memoryview`` slices of an immutable ``bytes``
object (no copy); a view keeps its whole received chunk alive, so call ``bytes()``
on pages kept long-term. ``receive_data`` parses eagerly: call ``next_event`` until
NEED_DATA after each call (and stop reading from the socket while busy) so the
event queue stays short. Timeouts (handshake, idle, keepalive) and cookie
allocation belong to the transport; both ends must configure the same
``max_payload`` (``send`` refuses frames the peer would refuse).

Why struct and not msgpack for batches: ``benchmarks/ramster_wire_codec.py``
measured both on 128 lz4 corpus pages (~1.2 KiB): struct encode+decode ~640k
pages/CPU-s vs msgpack ~580k, and struct decodes page data zero-copy with every
length checked against the payload before anything is built.

Invariants the fuzz tests check: no exception escapes ``receive_data`` /
``next_event``; the internal receive buffer never holds more than
``HEADER_SIZE + max_payload`` bytes; a length field above the limit is refused
from the header alone (no allocation sized by it).
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple

from tmem.errors import TmemError

try:  # mypyc compiles this module when the package is built (setup.py COMPILED)
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - pure Python without mypy installed

    def mypyc_attr(*_args: object, **_kwargs: object) -> Callable[[type], type]:  # type: ignore[misc]
        return lambda cls: cls


if TYPE_CHECKING:
    from tmem.ramster.handshake import Handshake

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "FLAG_FREE",
    "HANDSHAKE_MAX_PAYLOAD",
    "HEADER_SIZE",
    "ITEM_OVERHEAD",
    "KEY_SIZE",
    "MAGIC",
    "NEED_DATA",
    "OBJECT_INDEX",
    "PROTOCOL_VERSION",
    "Authenticated",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "DestroyPool",
    "Error",
    "Event",
    "FlushBatch",
    "FlushItem",
    "FlushObject",
    "FlushPage",
    "Get",
    "GetBatch",
    "GetBatchReply",
    "GetReply",
    "GetResult",
    "HandshakeFailed",
    "Heartbeat",
    "Hello",
    "LocalProtocolError",
    "Message",
    "MsgType",
    "PageKey",
    "Ping",
    "Pong",
    "Proof",
    "ProtocolError",
    "Put",
    "PutBatch",
    "PutItem",
    "Status",
    "WireError",
    "chunk_put_items",
    "decode_frame",
    "encode",
]

MAGIC: Final = 0x7734
PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_PAYLOAD: Final = 1 << 20  # 1 MiB: ~200+ compressed pages per batch
HANDSHAKE_MAX_PAYLOAD: Final = 1024  # what an unauthenticated peer may make us buffer
OBJECT_INDEX: Final = 0xFFFFFFFF  # conventional index of an object-level flush key
FLAG_FREE: Final = 0x0001  # GetBatch: get-and-free

_HDR = struct.Struct(">HBBHHQiII")
_HDR_PREFIX_S = struct.Struct(">HBBHHQiI")  # the header up to the crc
_HDR_PREFIX = _HDR_PREFIX_S.size  # bytes covered by the crc before the payload
HEADER_SIZE: Final = _HDR.size

_KEY = struct.Struct(">HHBQQQI")
_ITEM = struct.Struct(">HHBQQQII")
_COUNT = struct.Struct(">I")
_DESTROY = struct.Struct(">HHB")
_HEARTBEAT = struct.Struct(">HQQQQ")
_HELLO = struct.Struct(">HBH32s")
KEY_SIZE: Final = _KEY.size
ITEM_OVERHEAD: Final = _ITEM.size

_F_PERS = 0x01
_F_RAW = 0x02
_F_MISS = 0x04
_F_OBJ = 0x08
_F_ALL = _F_PERS | _F_RAW | _F_MISS | _F_OBJ

_crc32 = zlib.crc32


class WireError(TmemError):
    """Base of the errors this module raises to its *local* caller."""


class LocalProtocolError(WireError, ValueError):
    """The local caller asked for something the protocol forbids (bad field, too big)."""


class ConnectionClosedError(LocalProtocolError):
    """send() on a connection that already ended (error, handshake failure or EOF)."""


class MsgType(IntEnum):
    """Frame type byte. Values are part of the protocol: never renumber."""

    HELLO = 1
    PROOF = 2
    PING = 3
    PONG = 4
    HEARTBEAT = 5
    STATUS = 6
    ERROR = 7
    PUT = 16
    GET = 17
    GET_AND_FREE = 18
    GET_REPLY = 19
    FLUSH_PAGE = 20
    FLUSH_OBJECT = 21
    DESTROY_POOL = 22
    PUT_BATCH = 32
    GET_BATCH = 33
    GET_BATCH_REPLY = 34
    FLUSH_BATCH = 35


_HANDSHAKE_TYPES: Final = frozenset({MsgType.HELLO, MsgType.PROOF})

Buffer = bytes | bytearray | memoryview


class PageKey(NamedTuple):
    """Where a page lives: (client node, pool id, pool class, oid, index)."""

    client: int
    pool_id: int
    persistent: bool
    oid: tuple[int, int, int]
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: tmem naming


class PutItem(NamedTuple):
    """One page of a put: ``data`` compressed with the handshake's compressor unless
    ``compressed`` is False (a raw page, e.g. one that did not compress)."""

    key: PageKey
    data: Buffer
    compressed: bool = True


class GetResult(NamedTuple):
    """One page of a get reply; ``data is None`` is a miss."""

    key: PageKey
    data: Buffer | None
    compressed: bool = True


class FlushItem(NamedTuple):
    """One flush of a flush batch: a page, or the whole object when ``whole_object``."""

    key: PageKey
    whole_object: bool = False


# ---------------------------------------------------------------- messages


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every frame. ``cookie`` pairs replies with requests; ``status`` is
    0 or a negative errno (meaningful on replies)."""

    TYPE: ClassVar[MsgType]
    cookie: int = 0
    status: int = 0


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """Handshake opener; see :mod:`tmem.ramster.handshake`."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    version: int
    initiator: bool
    node: int
    nonce: bytes
    cluster: str
    name: str
    compressor: str


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Proof(Message):
    """Handshake answer: HMAC-SHA256 over the transcript (32 bytes)."""

    TYPE: ClassVar[MsgType] = MsgType.PROOF
    mac: bytes


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Message):
    """Keepalive request; answer with a Pong echoing the cookie."""

    TYPE: ClassVar[MsgType] = MsgType.PING


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Message):
    """Keepalive response."""

    TYPE: ClassVar[MsgType] = MsgType.PONG


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Periodic liveness + load report. ``incarnation`` changes when a node restarts
    (e.g. its start time in ns), ``seq`` grows within one incarnation."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    node: int
    incarnation: int
    seq: int
    free_frames: int
    total_frames: int


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Message):
    """Generic reply: ``status`` for the request, ``results`` per item of a batch
    (same order; 0 or a negative errno each)."""

    TYPE: ClassVar[MsgType] = MsgType.STATUS
    results: tuple[int, ...] = ()


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """Failure reply with a human-readable reason (``status`` is a negative errno)."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    reason: str = ""


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Put(Message):
    """Store one page on the receiver, in its pool for client ``key.client``."""

    TYPE: ClassVar[MsgType] = MsgType.PUT
    key: PageKey
    data: Buffer
    compressed: bool = True


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class Get(Message):
    """Fetch one page; ``free`` removes it on the receiver (the kernel's get-and-free)."""

    TYPE: ClassVar[MsgType] = MsgType.GET
    key: PageKey
    free: bool = False


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class GetReply(Message):
    """Answer to Get: ``data is None`` is a miss."""

    TYPE: ClassVar[MsgType] = MsgType.GET_REPLY
    key: PageKey
    data: Buffer | None
    compressed: bool = True


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class FlushPage(Message):
    """Drop one page."""

    TYPE: ClassVar[MsgType] = MsgType.FLUSH_PAGE
    key: PageKey


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class FlushObject(Message):
    """Drop every page of ``key.oid`` (``key.index`` is carried but not used)."""

    TYPE: ClassVar[MsgType] = MsgType.FLUSH_OBJECT
    key: PageKey


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class DestroyPool(Message):
    """Drop a whole foreign pool."""

    TYPE: ClassVar[MsgType] = MsgType.DESTROY_POOL
    client: int
    pool_id: int
    persistent: bool


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class PutBatch(Message):
    """Many puts in one frame; answered by a Status with one result per item."""

    TYPE: ClassVar[MsgType] = MsgType.PUT_BATCH
    items: Sequence[PutItem]


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class GetBatch(Message):
    """Many gets in one frame; answered by a GetBatchReply in the same order."""

    TYPE: ClassVar[MsgType] = MsgType.GET_BATCH
    keys: Sequence[PageKey]
    free: bool = False


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class GetBatchReply(Message):
    """Answer to GetBatch."""

    TYPE: ClassVar[MsgType] = MsgType.GET_BATCH_REPLY
    items: Sequence[GetResult]


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True, kw_only=True)
class FlushBatch(Message):
    """Many page/object flushes in one frame, applied in order; answered by Status."""

    TYPE: ClassVar[MsgType] = MsgType.FLUSH_BATCH
    items: Sequence[FlushItem]


# ---------------------------------------------------------------- other events


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class Authenticated:
    """Both proofs verified: data messages may flow. Peer identity as proven."""

    peer_node: int
    peer_name: str
    compressor: str


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """Terminal: the peer is not one of ours (reason: version, cluster, unknown-node,
    role, compressor, bad-proof, reflected-nonce). Drop the connection and count it."""

    reason: str
    detail: str = ""


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Terminal: the peer sent something invalid (reason: bad-magic, version,
    oversized, checksum, unknown-type, malformed, unauthenticated, unexpected,
    truncated). Drop the connection and count it."""

    reason: str
    detail: str = ""


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Terminal: the peer closed the stream at a frame boundary."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = Message | Authenticated | HandshakeFailed | ProtocolError | ConnectionClosed


class _Malformed(Exception):
    """Internal: a payload that does not decode (becomes ProtocolError('malformed'))."""


# ---------------------------------------------------------------- encoding


def _pack_key(key: PageKey, extra: int = 0) -> bytes:
    o = key.oid
    return _KEY.pack(
        key.client,
        key.pool_id,
        (_F_PERS if key.persistent else 0) | extra,
        o[0],
        o[1],
        o[2],
        key.index,
    )


def _pack_item(key: PageKey, extra: int, length: int) -> bytes:
    o = key.oid
    return _ITEM.pack(
        key.client,
        key.pool_id,
        (_F_PERS if key.persistent else 0) | extra,
        o[0],
        o[1],
        o[2],
        key.index,
        length,
    )


def _str8(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise LocalProtocolError(f"string too long for the wire: {s[:40]!r}...")
    return bytes((len(b),)) + b


def _enc_hello(m: Hello) -> list[Buffer]:
    if len(m.nonce) != 32:
        raise LocalProtocolError("hello nonce must be 32 bytes")
    return [
        _HELLO.pack(m.version, 1 if m.initiator else 0, m.node, m.nonce)
        + _str8(m.cluster)
        + _str8(m.name)
        + _str8(m.compressor)
    ]


def _enc_proof(m: Proof) -> list[Buffer]:
    if len(m.mac) != 32:
        raise LocalProtocolError("proof mac must be 32 bytes")
    return [bytes(m.mac)]


def _enc_empty(m: Message) -> list[Buffer]:
    return []


def _enc_heartbeat(m: Heartbeat) -> list[Buffer]:
    return [_HEARTBEAT.pack(m.node, m.incarnation, m.seq, m.free_frames, m.total_frames)]


def _enc_status(m: Status) -> list[Buffer]:
    n = len(m.results)
    return [_COUNT.pack(n) + struct.pack(f">{n}i", *m.results)]


def _enc_error(m: Error) -> list[Buffer]:
    return [m.reason.encode("utf-8", "replace")]


def _enc_put(m: Put) -> list[Buffer]:
    return [_pack_item(m.key, 0 if m.compressed else _F_RAW, len(m.data)), m.data]


def _enc_get(m: Get) -> list[Buffer]:
    return [_pack_key(m.key)]


def _enc_get_reply(m: GetReply) -> list[Buffer]:
    if m.data is None:
        return [_pack_item(m.key, _F_MISS, 0)]
    return [_pack_item(m.key, 0 if m.compressed else _F_RAW, len(m.data)), m.data]


def _enc_flush_page(m: FlushPage) -> list[Buffer]:
    return [_pack_key(m.key)]


def _enc_flush_object(m: FlushObject) -> list[Buffer]:
    return [_pack_key(m.key, _F_OBJ)]


def _enc_destroy(m: DestroyPool) -> list[Buffer]:
    return [_DESTROY.pack(m.client, m.pool_id, _F_PERS if m.persistent else 0)]


def _enc_put_batch(m: PutBatch) -> list[Buffer]:
    items = m.items
    pack = _ITEM.pack
    recs: list[Buffer] = [_COUNT.pack(len(items))]
    datas: list[Buffer] = []
    for key, data, compressed in items:
        o = key.oid
        recs.append(
            pack(
                key.client,
                key.pool_id,
                (_F_PERS if key.persistent else 0) | (0 if compressed else _F_RAW),
                o[0],
                o[1],
                o[2],
                key.index,
                len(data),
            )
        )
        datas.append(data)
    recs += datas
    return recs


def _enc_get_batch(m: GetBatch) -> list[Buffer]:
    pack = _KEY.pack
    parts: list[Buffer] = [_COUNT.pack(len(m.keys))]
    for key in m.keys:
        o = key.oid
        parts.append(
            pack(
                key.client,
                key.pool_id,
                _F_PERS if key.persistent else 0,
                o[0],
                o[1],
                o[2],
                key.index,
            )
        )
    return parts


def _enc_get_batch_reply(m: GetBatchReply) -> list[Buffer]:
    items = m.items
    pack = _ITEM.pack
    recs: list[Buffer] = [_COUNT.pack(len(items))]
    datas: list[Buffer] = []
    for key, data, compressed in items:
        o = key.oid
        pers = _F_PERS if key.persistent else 0
        if data is None:
            recs.append(
                pack(key.client, key.pool_id, pers | _F_MISS, o[0], o[1], o[2], key.index, 0)
            )
        else:
            flags = pers | (0 if compressed else _F_RAW)
            recs.append(
                pack(key.client, key.pool_id, flags, o[0], o[1], o[2], key.index, len(data))
            )
            datas.append(data)
    recs += datas
    return recs


def _enc_flush_batch(m: FlushBatch) -> list[Buffer]:
    pack = _KEY.pack
    parts: list[Buffer] = [_COUNT.pack(len(m.items))]
    for key, whole in m.items:
        o = key.oid
        flags = (_F_PERS if key.persistent else 0) | (_F_OBJ if whole else 0)
        parts.append(pack(key.client, key.pool_id, flags, o[0], o[1], o[2], key.index))
    return parts


# Each encoder takes its own Message subclass; Any keeps the table simple to type.
_ENCODERS: dict[type[Message], Callable[[Any], list[Buffer]]] = {
    Hello: _enc_hello,
    Proof: _enc_proof,
    Ping: _enc_empty,
    Pong: _enc_empty,
    Heartbeat: _enc_heartbeat,
    Status: _enc_status,
    Error: _enc_error,
    Put: _enc_put,
    Get: _enc_get,
    GetReply: _enc_get_reply,
    FlushPage: _enc_flush_page,
    FlushObject: _enc_flush_object,
    DestroyPool: _enc_destroy,
    PutBatch: _enc_put_batch,
    GetBatch: _enc_get_batch,
    GetBatchReply: _enc_get_batch_reply,
    FlushBatch: _enc_flush_batch,
}


def encode(msg: object, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """One complete frame for ``msg``. Raises LocalProtocolError for out-of-range
    fields or a payload over ``max_payload`` (the peer would drop the connection).

    ``msg`` is typed ``object`` so that a non-message is refused with
    LocalProtocolError also when mypyc compiled this module (it would check the
    argument type first and raise TypeError)."""
    enc = _ENCODERS.get(type(msg)) if isinstance(msg, Message) else None
    if enc is None or not isinstance(msg, Message):
        raise LocalProtocolError(f"not a wire message: {type(msg).__name__}")
    try:
        parts = enc(msg)
        mtype = msg.TYPE
        if mtype is MsgType.GET and isinstance(msg, Get) and msg.free:
            mtype = MsgType.GET_AND_FREE
        flags = FLAG_FREE if isinstance(msg, GetBatch) and msg.free else 0
        length = 0
        for part in parts:
            length += len(part)
        if length > max_payload:
            raise LocalProtocolError(f"payload of {length} bytes exceeds max_payload {max_payload}")
        prefix = _HDR_PREFIX_S.pack(
            MAGIC, PROTOCOL_VERSION, mtype, flags, 0, msg.cookie, msg.status, length
        )
        # The crc runs over the parts in place and the frame is joined once: joining
        # the payload first and then prepending the header copied every page twice,
        # into two fresh large buffers (measured ~3x slower for a 128-page frame).
        crc = _crc32(prefix)
        for part in parts:
            crc = _crc32(part, crc)
    except struct.error as exc:
        raise LocalProtocolError(f"{type(msg).__name__}: field out of range: {exc}") from None
    except (TypeError, AttributeError, IndexError, ValueError) as exc:
        if isinstance(exc, LocalProtocolError):
            raise
        raise LocalProtocolError(f"{type(msg).__name__}: bad field: {exc}") from None
    return b"".join([prefix, _COUNT.pack(crc), *parts])


def chunk_put_items(
    items: Iterable[PutItem], max_payload: int = DEFAULT_MAX_PAYLOAD
) -> Iterator[list[PutItem]]:
    """Split put items into lists that each fit one PutBatch frame."""
    budget = max_payload - _COUNT.size
    chunk: list[PutItem] = []
    used = 0
    for item in items:
        size = ITEM_OVERHEAD + len(item.data)
        if size > budget:
            raise LocalProtocolError(f"a single page of {len(item.data)} bytes cannot fit a frame")
        if used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += size
    if chunk:
        yield chunk


# ---------------------------------------------------------------- decoding


def _key(c: int, p: int, f: int, o0: int, o1: int, o2: int, i: int) -> PageKey:
    return PageKey(c, p, bool(f & _F_PERS), (o0, o1, o2), i)


def _dec_hello(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if len(pl) < _HELLO.size:
        raise _Malformed("short hello")
    version, initiator, node, nonce = _HELLO.unpack_from(pl)
    if initiator > 1:
        raise _Malformed("hello role")
    pos = _HELLO.size
    strs: list[str] = []
    for _ in range(3):
        if pos >= len(pl):
            raise _Malformed("short hello string")
        n = pl[pos]
        end = pos + 1 + n
        if end > len(pl):
            raise _Malformed("short hello string")
        try:
            strs.append(str(pl[pos + 1 : end], "utf-8"))
        except UnicodeDecodeError:
            raise _Malformed("hello string not utf-8") from None
        pos = end
    if pos != len(pl):
        raise _Malformed("trailing bytes in hello")
    return Hello(
        cookie=cookie,
        status=status,
        version=version,
        initiator=bool(initiator),
        node=node,
        nonce=nonce,
        cluster=strs[0],
        name=strs[1],
        compressor=strs[2],
    )


def _dec_proof(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if len(pl) != 32:
        raise _Malformed("proof must be 32 bytes")
    return Proof(cookie=cookie, status=status, mac=bytes(pl))


def _dec_ping(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if pl:
        raise _Malformed("ping has no payload")
    return Ping(cookie=cookie, status=status)


def _dec_pong(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if pl:
        raise _Malformed("pong has no payload")
    return Pong(cookie=cookie, status=status)


def _dec_heartbeat(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if len(pl) != _HEARTBEAT.size:
        raise _Malformed("heartbeat size")
    node, inc, seq, free, total = _HEARTBEAT.unpack(pl)
    return Heartbeat(
        cookie=cookie,
        status=status,
        node=node,
        incarnation=inc,
        seq=seq,
        free_frames=free,
        total_frames=total,
    )


def _dec_status(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if len(pl) < 4:
        raise _Malformed("short status")
    (n,) = _COUNT.unpack_from(pl)
    if len(pl) != 4 + 4 * n:
        raise _Malformed("status result count")
    results = struct.unpack_from(f">{n}i", pl, 4) if n else ()
    return Status(cookie=cookie, status=status, results=results)


def _dec_error(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    return Error(cookie=cookie, status=status, reason=str(pl, "utf-8", "replace"))


def _one_item(pl: memoryview, allowed: int) -> tuple[PageKey, int, memoryview]:
    if len(pl) < ITEM_OVERHEAD:
        raise _Malformed("short page record")
    c, p, f, o0, o1, o2, i, n = _ITEM.unpack_from(pl)
    if f & ~allowed:
        raise _Malformed("bad page flags")
    if ITEM_OVERHEAD + n != len(pl):
        raise _Malformed("page length mismatch")
    return _key(c, p, f, o0, o1, o2, i), f, pl[ITEM_OVERHEAD:]


def _dec_put(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, f, data = _one_item(pl, _F_PERS | _F_RAW)
    return Put(cookie=cookie, status=status, key=key, data=data, compressed=not f & _F_RAW)


def _one_key(pl: memoryview, allowed: int) -> tuple[PageKey, int]:
    if len(pl) != KEY_SIZE:
        raise _Malformed("key size")
    c, p, f, o0, o1, o2, i = _KEY.unpack(pl)
    if f & ~allowed:
        raise _Malformed("bad key flags")
    return _key(c, p, f, o0, o1, o2, i), f


def _dec_get(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, _ = _one_key(pl, _F_PERS)
    return Get(cookie=cookie, status=status, key=key, free=False)


def _dec_get_and_free(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, _ = _one_key(pl, _F_PERS)
    return Get(cookie=cookie, status=status, key=key, free=True)


def _dec_get_reply(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, f, data = _one_item(pl, _F_PERS | _F_RAW | _F_MISS)
    if f & _F_MISS:
        if data or f & _F_RAW:
            raise _Malformed("miss with data")
        return GetReply(cookie=cookie, status=status, key=key, data=None)
    return GetReply(cookie=cookie, status=status, key=key, data=data, compressed=not f & _F_RAW)


def _dec_flush_page(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, _ = _one_key(pl, _F_PERS)
    return FlushPage(cookie=cookie, status=status, key=key)


def _dec_flush_object(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    key, f = _one_key(pl, _F_PERS | _F_OBJ)
    if not f & _F_OBJ:
        raise _Malformed("object flush without object flag")
    return FlushObject(cookie=cookie, status=status, key=key)


def _dec_destroy(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    if len(pl) != _DESTROY.size:
        raise _Malformed("destroy size")
    c, p, f = _DESTROY.unpack(pl)
    if f & ~_F_PERS:
        raise _Malformed("bad destroy flags")
    return DestroyPool(cookie=cookie, status=status, client=c, pool_id=p, persistent=bool(f))


def _records(pl: memoryview, rec: struct.Struct) -> tuple[int, Iterator[tuple[int, ...]]]:
    """Count-prefixed array of fixed records; sizes checked before anything is built."""
    if len(pl) < 4:
        raise _Malformed("short batch")
    (n,) = _COUNT.unpack_from(pl)
    end = 4 + n * rec.size
    if end > len(pl):
        raise _Malformed("batch count exceeds payload")
    return end, rec.iter_unpack(pl[4:end])


_tnew = tuple.__new__  # builds NamedTuples without a Python-level __new__ frame


def _dec_item_array(pl: memoryview, allowed: int, cls: type[Any]) -> list[Any]:
    """Count-prefixed page records then their data, into ``cls(key, data, compressed)``."""
    pos, recs = _records(pl, _ITEM)
    total = len(pl)
    out: list[Any] = []
    append = out.append
    for c, p, f, o0, o1, o2, i, n in recs:
        if f & ~allowed:
            raise _Malformed("bad item flags")
        end = pos + n
        if end > total:
            raise _Malformed("item data past payload end")
        key = _tnew(PageKey, (c, p, (f & _F_PERS) == _F_PERS, (o0, o1, o2), i))
        if f & _F_MISS:
            if n or f & _F_RAW:
                raise _Malformed("miss with data")
            append(_tnew(cls, (key, None, True)))
        else:
            append(_tnew(cls, (key, pl[pos:end], not f & _F_RAW)))
        pos = end
    if pos != total:
        raise _Malformed("trailing bytes in batch")
    return out


def _dec_put_batch(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    items: list[PutItem] = _dec_item_array(pl, _F_PERS | _F_RAW, PutItem)
    return PutBatch(cookie=cookie, status=status, items=items)


def _dec_get_batch(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    end, recs = _records(pl, _KEY)
    if end != len(pl):
        raise _Malformed("trailing bytes in get batch")
    keys: list[PageKey] = []
    for c, p, f, o0, o1, o2, i in recs:
        if f & ~_F_PERS:
            raise _Malformed("bad key flags")
        keys.append(_tnew(PageKey, (c, p, f == _F_PERS, (o0, o1, o2), i)))
    return GetBatch(cookie=cookie, status=status, keys=keys, free=bool(flags & FLAG_FREE))


def _dec_get_batch_reply(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    items: list[GetResult] = _dec_item_array(pl, _F_PERS | _F_RAW | _F_MISS, GetResult)
    return GetBatchReply(cookie=cookie, status=status, items=items)


def _dec_flush_batch(pl: memoryview, flags: int, cookie: int, status: int) -> Message:
    end, recs = _records(pl, _KEY)
    if end != len(pl):
        raise _Malformed("trailing bytes in flush batch")
    items: list[FlushItem] = []
    for c, p, f, o0, o1, o2, i in recs:
        if f & ~(_F_PERS | _F_OBJ):
            raise _Malformed("bad flush flags")
        items.append(FlushItem(PageKey(c, p, bool(f & _F_PERS), (o0, o1, o2), i), bool(f & _F_OBJ)))
    return FlushBatch(cookie=cookie, status=status, items=items)


_Decoder = Callable[[memoryview, int, int, int], Message]
_DECODERS: dict[int, _Decoder] = {
    MsgType.HELLO: _dec_hello,
    MsgType.PROOF: _dec_proof,
    MsgType.PING: _dec_ping,
    MsgType.PONG: _dec_pong,
    MsgType.HEARTBEAT: _dec_heartbeat,
    MsgType.STATUS: _dec_status,
    MsgType.ERROR: _dec_error,
    MsgType.PUT: _dec_put,
    MsgType.GET: _dec_get,
    MsgType.GET_AND_FREE: _dec_get_and_free,
    MsgType.GET_REPLY: _dec_get_reply,
    MsgType.FLUSH_PAGE: _dec_flush_page,
    MsgType.FLUSH_OBJECT: _dec_flush_object,
    MsgType.DESTROY_POOL: _dec_destroy,
    MsgType.PUT_BATCH: _dec_put_batch,
    MsgType.GET_BATCH: _dec_get_batch,
    MsgType.GET_BATCH_REPLY: _dec_get_batch_reply,
    MsgType.FLUSH_BATCH: _dec_flush_batch,
}
# Flags a frame header may carry, per type; anything else is malformed.
_HEADER_FLAGS: dict[int, int] = {MsgType.GET_BATCH: FLAG_FREE}


def decode_frame(frame: Buffer) -> Message:
    """Decode exactly one complete frame of any type, handshake frames included
    (tests and tools; a live peer goes through :class:`Connection`).
    Raises LocalProtocolError naming the ProtocolError reason."""
    mv = memoryview(bytes(frame))
    if len(mv) < HEADER_SIZE:
        raise LocalProtocolError("truncated: shorter than a frame header")
    magic, version, mtype, flags, pad, cookie, status, length, crc = _HDR.unpack_from(mv)
    if magic != MAGIC:
        raise LocalProtocolError(f"bad-magic: 0x{magic:04x}")
    if version != PROTOCOL_VERSION:
        raise LocalProtocolError(f"version: {version}")
    if length != len(mv) - HEADER_SIZE:
        raise LocalProtocolError(f"truncated: length field {length}, {len(mv) - HEADER_SIZE} bytes")
    decoder = _DECODERS.get(mtype)
    if decoder is None:
        raise LocalProtocolError(f"unknown-type: {mtype}")
    if pad or flags & ~_HEADER_FLAGS.get(mtype, 0):
        raise LocalProtocolError("malformed: header flags")
    if _crc32(mv[HEADER_SIZE:], _crc32(mv[:_HDR_PREFIX])) != crc:
        raise LocalProtocolError("checksum")
    try:
        return decoder(mv[HEADER_SIZE:], flags, cookie, status)
    except (_Malformed, struct.error, ValueError) as exc:
        raise LocalProtocolError(f"malformed: {exc}") from None


# ---------------------------------------------------------------- connection


class Connection:
    """One end of one TCP connection; both ends use this class.

    ``max_payload`` bounds every incoming frame (and, by default, outgoing ones);
    before authentication the bound is HANDSHAKE_MAX_PAYLOAD. ``handshake=None``
    skips authentication (tests/benchmarks only).
    """

    def __init__(
        self,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        handshake: Handshake | None = None,
    ) -> None:
        if max_payload < 1:
            raise LocalProtocolError("max_payload must be positive")
        self.max_payload = max_payload
        self._hs = handshake
        self._authenticated = handshake is None
        self._closed = False
        self._parts: list[memoryview] = []  # views of the chunks of an incomplete frame
        self._have = 0  # bytes in _parts
        self._need = HEADER_SIZE  # bytes the buffered frame needs in total
        self._hdr: tuple[int, ...] | None = None  # parsed header of the buffered frame
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self.terminal: Event | None = None  # the event that ended the connection
        self._peer: Authenticated | None = None
        if handshake is not None:
            self._out.append(encode(handshake.hello(), HANDSHAKE_MAX_PAYLOAD))

    # -- state
    @property
    def closed(self) -> bool:
        """True once a terminal event was produced (or close() was called)."""
        return self._closed

    @property
    def authenticated(self) -> bool:
        """True once both proofs verified (always, without a handshake)."""
        return self._authenticated

    @property
    def peer(self) -> Authenticated | None:
        """Who the peer proved to be (None before that, or without a handshake)."""
        return self._peer

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame currently held (≤ HEADER_SIZE + max_payload)."""
        return self._have

    def close(self) -> None:
        """Local close: drop buffers; later data is ignored."""
        self._closed = True
        self._parts = []
        self._have = 0
        self._hdr = None

    # -- output
    def send(self, msg: Message) -> bytes:
        """Encode ``msg`` as one frame. Data messages require an authenticated
        connection; handshake frames are produced internally, never through here."""
        if self._closed:
            raise ConnectionClosedError("connection is closed")
        if msg.TYPE in _HANDSHAKE_TYPES:
            raise LocalProtocolError("handshake frames are sent by the Connection itself")
        if not self._authenticated:
            raise LocalProtocolError("cannot send data before the handshake completed")
        return encode(msg, self.max_payload)

    def data_to_send(self) -> bytes:
        """Bytes the connection produced by itself (handshake); write them out."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- input
    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA when more bytes are needed (or after the end)."""
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the peer; ``b""`` signals EOF. Never raises for peer input.

        Complete frames are decoded straight from ``data``; a frame split across
        calls is kept as views of the chunks it came in and joined once (one copy)."""
        if self._closed:
            return
        if not data:
            if self._have:
                self._fail(ProtocolError("truncated", f"EOF inside a frame ({self._have} bytes)"))
            else:
                self._end(ConnectionClosed())
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # payload views must not alias a buffer the caller reuses
        mv = memoryview(data)
        pos = 0
        n = len(data)
        hdr_size = HEADER_SIZE
        while pos < n and not self._closed:
            if self._have:
                take = min(self._need - self._have, n - pos)
                self._parts.append(mv[pos : pos + take])
                self._have += take
                pos += take
                if self._have < self._need:
                    break
                if self._hdr is None:  # the parts are exactly one header
                    head = b"".join(self._parts)
                    hdr = self._check_header(head, 0)
                    if hdr is None:
                        return
                    self._hdr = hdr
                    self._need = hdr_size + hdr[7]
                    self._parts = [memoryview(head)]
                    if hdr[7]:
                        continue
                frame = b"".join(self._parts)
                hdr = self._hdr
                self._parts = []
                self._have = 0
                self._hdr = None
                self._need = hdr_size
                self._frame(hdr, memoryview(frame), 0)
            else:
                if n - pos < hdr_size:
                    self._parts.append(mv[pos:])
                    self._have = n - pos
                    self._need = hdr_size
                    break
                hdr = self._check_header(mv, pos)
                if hdr is None:
                    return
                end = pos + hdr_size + hdr[7]
                if end > n:
                    self._parts.append(mv[pos:])
                    self._have = n - pos
                    self._hdr = hdr
                    self._need = hdr_size + hdr[7]
                    break
                self._frame(hdr, mv, pos)
                pos = end

    # -- internals
    def _end(self, ev: Event) -> None:
        self._events.append(ev)
        self.terminal = ev
        self.close()

    def _fail(self, ev: ProtocolError | HandshakeFailed) -> None:
        self._end(ev)

    def _check_header(self, b: Buffer, pos: int) -> tuple[int, ...] | None:
        hdr = _HDR.unpack_from(b, pos)
        magic, version, mtype, flags, pad, _c, _s, length, _crc = hdr
        if magic != MAGIC:
            self._fail(ProtocolError("bad-magic", f"magic 0x{magic:04x}"))
            return None
        if version != PROTOCOL_VERSION:
            if not self._authenticated:
                self._fail(
                    HandshakeFailed(
                        "version", f"peer speaks version {version}, we {PROTOCOL_VERSION}"
                    )
                )
            else:
                self._fail(ProtocolError("version", f"version {version}"))
            return None
        limit = (
            self.max_payload
            if self._authenticated
            else min(self.max_payload, HANDSHAKE_MAX_PAYLOAD)
        )
        if length > limit:
            self._fail(ProtocolError("oversized", f"payload length {length} > {limit}"))
            return None
        if mtype not in _DECODERS:
            self._fail(ProtocolError("unknown-type", f"type {mtype}"))
            return None
        if pad or flags & ~_HEADER_FLAGS.get(mtype, 0):
            self._fail(ProtocolError("malformed", f"header flags 0x{flags:04x} pad {pad}"))
            return None
        if not self._authenticated and mtype not in _HANDSHAKE_TYPES:
            self._fail(ProtocolError("unauthenticated", f"{MsgType(mtype).name} before handshake"))
            return None
        return hdr

    def _frame(self, hdr: tuple[int, ...], mv: memoryview, pos: int) -> None:
        _magic, _v, mtype, flags, _pad, cookie, status, length, crc = hdr
        start = pos + HEADER_SIZE
        payload = mv[start : start + length]
        if _crc32(payload, _crc32(mv[pos : pos + _HDR_PREFIX])) != crc:
            self._fail(ProtocolError("checksum", f"{MsgType(mtype).name} frame"))
            return
        try:
            msg = _DECODERS[mtype](payload, flags, cookie, status)
        except (_Malformed, struct.error, ValueError) as exc:
            self._fail(ProtocolError("malformed", f"{MsgType(mtype).name}: {exc}"))
            return
        if mtype in _HANDSHAKE_TYPES:
            self._handshake(msg)
        else:
            self._events.append(msg)

    def _handshake(self, msg: Message) -> None:
        hs = self._hs
        if hs is None or self._authenticated:
            self._fail(ProtocolError("unexpected", f"{type(msg).__name__} after the handshake"))
            return
        out = hs.receive(msg)
        if isinstance(out, HandshakeFailed | ProtocolError):
            self._fail(out)
            return
        if isinstance(out, Proof):
            self._out.append(encode(out, HANDSHAKE_MAX_PAYLOAD))
        elif isinstance(out, Authenticated):
            self._authenticated = True
            self._peer = out
            self._events.append(out)
