"""Wire codec: every message round-trips, framing survives any split, bad frames end
the connection with the documented ProtocolError and nothing else."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem.errors import TmemError
from tmem.ramster import wire
from tmem.ramster.wire import (
    HEADER_SIZE,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ConnectionClosedError,
    DestroyPool,
    Error,
    FlushBatch,
    FlushItem,
    FlushObject,
    FlushPage,
    Get,
    GetBatch,
    GetBatchReply,
    GetReply,
    GetResult,
    Heartbeat,
    Hello,
    LocalProtocolError,
    Message,
    PageKey,
    Ping,
    Pong,
    Proof,
    ProtocolError,
    Put,
    PutBatch,
    PutItem,
    Status,
    chunk_put_items,
    decode_frame,
    encode,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
data = st.binary(max_size=600)
text = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)

keys = st.builds(PageKey, u16, u16, st.booleans(), st.tuples(u64, u64, u64), u32)
head = {"cookie": u64, "status": i32}


def _miss_or_data() -> st.SearchStrategy[tuple[bytes | None, bool]]:
    # a miss carries no compressed flag on the wire: it decodes as the default (True)
    return st.one_of(st.just((None, True)), st.tuples(data, st.booleans()))


get_results = st.builds(
    lambda k, dc: GetResult(k, dc[0], dc[1]),
    keys,
    _miss_or_data(),
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        version=u16,
        initiator=st.booleans(),
        node=u16,
        nonce=st.binary(min_size=32, max_size=32),
        cluster=text,
        name=text,
        compressor=text,
        **head,
    ),
    st.builds(Proof, mac=st.binary(min_size=32, max_size=32), **head),
    st.builds(Ping, **head),
    st.builds(Pong, **head),
    st.builds(
        Heartbeat, node=u16, incarnation=u64, seq=u64, free_frames=u64, total_frames=u64, **head
    ),
    st.builds(Status, results=st.lists(i32, max_size=50).map(tuple), **head),
    st.builds(Error, reason=st.text(max_size=100), **head),
    st.builds(Put, key=keys, data=data, compressed=st.booleans(), **head),
    st.builds(Get, key=keys, free=st.booleans(), **head),
    st.builds(
        lambda k, dc, **kw: GetReply(key=k, data=dc[0], compressed=dc[1], **kw),
        keys,
        _miss_or_data(),
        **head,
    ),
    st.builds(FlushPage, key=keys, **head),
    st.builds(FlushObject, key=keys, **head),
    st.builds(DestroyPool, client=u16, pool_id=u16, persistent=st.booleans(), **head),
    st.builds(
        PutBatch,
        items=st.lists(st.builds(PutItem, keys, data, st.booleans()), max_size=8),
        **head,
    ),
    st.builds(GetBatch, keys=st.lists(keys, max_size=8), free=st.booleans(), **head),
    st.builds(GetBatchReply, items=st.lists(get_results, max_size=8), **head),
    st.builds(
        FlushBatch, items=st.lists(st.builds(FlushItem, keys, st.booleans()), max_size=8), **head
    ),
)
data_messages = messages.filter(lambda m: not isinstance(m, Hello | Proof))


def drain(conn: Connection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def test_every_message_type_is_covered() -> None:
    """The strategy above must name every class the encoder knows (no silent gaps)."""
    assert set(wire._ENCODERS) == {
        Hello, Proof, Ping, Pong, Heartbeat, Status, Error, Put, Get, GetReply, FlushPage,
        FlushObject, DestroyPool, PutBatch, GetBatch, GetBatchReply, FlushBatch,
    }  # fmt: skip
    assert {int(t) for t in wire.MsgType} == set(wire._DECODERS)


@settings(max_examples=400, deadline=None)
@given(messages)
def test_round_trip_encode_decode(msg: Message) -> None:
    frame = encode(msg)
    assert len(frame) >= HEADER_SIZE
    assert decode_frame(frame) == msg


@settings(max_examples=200, deadline=None)
@given(data_messages)
def test_round_trip_through_connection(msg: Message) -> None:
    a, b = Connection(), Connection()
    b.receive_data(a.send(msg))
    assert drain(b) == [msg]
    assert b.buffered == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(data_messages, min_size=1, max_size=6), st.data())
def test_chunked_feeding_at_random_split_points(msgs: list[Message], d: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(d.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    conn = Connection()
    got: list[object] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:
            conn.receive_data(stream[prev:cut])
            got += drain(conn)
        prev = cut
    assert got == msgs
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]
    assert conn.closed


def test_byte_at_a_time_and_mutable_input() -> None:
    k = PageKey(3, 1, True, (1, 2, 3), 9)
    msgs = [Put(key=k, data=b"x" * 700, cookie=1), Ping(cookie=2), Get(key=k, free=True)]
    stream = bytearray(b"".join(encode(m) for m in msgs))
    conn = Connection()
    got: list[object] = []
    for i in range(len(stream)):
        chunk = stream[i : i + 1]
        conn.receive_data(chunk)
        stream[i] ^= 0xFF  # the caller reuses its buffer: decoded data must not change
        got += drain(conn)
    assert got == msgs


def test_decoded_page_data_is_zero_copy_view() -> None:
    k = PageKey(1, 0, False, (0, 0, 0), 0)
    pages = [bytes([i]) * 1500 for i in range(4)]
    frame = encode(PutBatch(items=[PutItem(k._replace(index=i), p) for i, p in enumerate(pages)]))
    conn = Connection()
    conn.receive_data(frame)
    (ev,) = drain(conn)
    assert isinstance(ev, PutBatch)
    views = [item.data for item in ev.items]
    assert all(isinstance(v, memoryview) and v.readonly for v in views)
    assert [bytes(v) for v in views] == pages
    assert views[0].obj is frame  # sliced out of the received bytes, not copied


def _frame(
    mtype: int,
    payload: bytes,
    *,
    magic: int = wire.MAGIC,
    version: int = 1,
    flags: int = 0,
    pad: int = 0,
    length: int | None = None,
    crc: int | None = None,
) -> bytes:
    n = len(payload) if length is None else length
    hdr = struct.pack(">HBBHHQiI", magic, version, mtype, flags, pad, 7, 0, n)
    c = zlib.crc32(payload, zlib.crc32(hdr)) if crc is None else crc
    return hdr + struct.pack(">I", c) + payload


def _error_of(stream: bytes, conn: Connection | None = None) -> ProtocolError:
    conn = conn or Connection(max_payload=4096)
    conn.receive_data(stream)
    evs = drain(conn)
    assert evs, "expected a terminal ProtocolError"
    assert isinstance(evs[-1], ProtocolError), evs
    assert all(isinstance(e, Message) for e in evs[:-1])
    assert conn.closed and conn.terminal is evs[-1]
    assert conn.buffered == 0
    # a closed connection ignores further data and refuses to send
    conn.receive_data(encode(Ping()))
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    with pytest.raises(ConnectionClosedError):
        conn.send(Ping())
    return evs[-1]


KEY = PageKey(1, 2, True, (3, 4, 5), 6)


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (_frame(3, b"", magic=0x1234), "bad-magic"),
        (_frame(3, b"", version=2), "version"),
        (_frame(3, b"", crc=1), "checksum"),
        (_frame(99, b""), "unknown-type"),
        (_frame(0, b""), "unknown-type"),
        (_frame(3, b"x"), "malformed"),  # ping with a payload
        (_frame(3, b"", flags=1), "malformed"),  # flag not defined for ping
        (_frame(3, b"", pad=1), "malformed"),
        (_frame(16, b"\0" * 10), "malformed"),  # short put record
        (_frame(32, struct.pack(">I", 0xFFFFFFFF)), "malformed"),  # huge batch count
        (_frame(33, struct.pack(">I", 1) + b"\0" * 40), "malformed"),  # trailing bytes
        (_frame(6, struct.pack(">I", 3) + b"\0" * 8), "malformed"),  # status count
        (_frame(5, b"\0" * 33), "malformed"),  # heartbeat size
        (_frame(3, b"", length=4097), "oversized"),
        (_frame(3, b"", length=0xFFFFFFFF), "oversized"),
    ],
)
def test_bad_frames_are_terminal_protocol_errors(stream: bytes, reason: str) -> None:
    good = encode(Put(key=KEY, data=b"ok"))
    err = _error_of(good + stream + good)
    assert err.reason == reason, err


def test_bad_flags_in_page_records() -> None:
    frame = bytearray(encode(Put(key=KEY, data=b"abc")))
    frame[HEADER_SIZE + 4] |= 0x80  # the record's flags byte
    body = bytes(frame[HEADER_SIZE:])
    assert _error_of(_frame(16, body)).reason == "malformed"
    # a miss that carries data is malformed too
    rec = struct.pack(">HHBQQQII", 1, 2, 0x04, 0, 0, 0, 0, 3) + b"abc"
    assert _error_of(_frame(19, rec)).reason == "malformed"


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    """No buffer sized by an untrusted length: memory stays flat and nothing waits."""
    conn = Connection()  # default 1 MiB limit
    tracemalloc.start()
    try:
        conn.receive_data(_frame(32, b"", length=0xFFFFFFF0)[:HEADER_SIZE])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    (err,) = drain(conn)
    assert isinstance(err, ProtocolError) and err.reason == "oversized"


def test_buffer_is_bounded_while_a_frame_arrives() -> None:
    conn = Connection(max_payload=10_000)
    frame = encode(Put(key=KEY, data=b"z" * 9_900))
    body = frame[:-1]
    for i in range(0, len(body), 1000):
        conn.receive_data(body[i : i + 1000])
        assert conn.buffered <= HEADER_SIZE + conn.max_payload
    conn.receive_data(frame[-1:])
    assert [type(e) for e in drain(conn)] == [Put]
    assert conn.buffered == 0


def test_eof_inside_a_frame_is_truncated() -> None:
    conn = Connection()
    conn.receive_data(encode(Put(key=KEY, data=b"abc"))[:-1])
    conn.receive_data(b"")
    (err,) = drain(conn)
    assert isinstance(err, ProtocolError) and err.reason == "truncated"


def test_handshake_frames_without_a_handshake_are_unexpected() -> None:
    hello = encode(Hello(version=1, initiator=True, node=1, nonce=b"n" * 32, cluster="c",
                         name="a", compressor="lz4"))  # fmt: skip
    assert _error_of(hello).reason == "unexpected"


def test_send_validates_fields() -> None:
    conn = Connection(max_payload=1000)
    with pytest.raises(LocalProtocolError):
        conn.send(Put(key=KEY._replace(pool_id=1 << 16), data=b""))
    with pytest.raises(LocalProtocolError):
        conn.send(Put(key=KEY._replace(oid=(1, 2)), data=b""))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        conn.send(Status(status=1 << 40))
    with pytest.raises(LocalProtocolError, match="max_payload"):
        conn.send(Put(key=KEY, data=b"x" * 1000))
    with pytest.raises(LocalProtocolError):
        conn.send(Proof(mac=b"x" * 32))  # handshake frames are internal
    with pytest.raises(TmemError):
        encode("not a message")  # type: ignore[arg-type]
    assert not conn.closed  # local mistakes do not end the connection


def test_chunk_put_items_fits_frames() -> None:
    items = [PutItem(KEY._replace(index=i), bytes(1000 + i)) for i in range(300)]
    chunks = list(chunk_put_items(items, max_payload=64 * 1024))
    assert [it for c in chunks for it in c] == items
    assert len(chunks) > 1
    for c in chunks:
        frame = encode(PutBatch(items=c), max_payload=64 * 1024)
        assert len(frame) <= HEADER_SIZE + 64 * 1024
    with pytest.raises(LocalProtocolError):
        list(chunk_put_items([PutItem(KEY, bytes(70_000))], max_payload=64 * 1024))


def test_batch_of_128_pages_round_trips(anon_pages: list[bytes]) -> None:
    from tmem.compress import get_compressor

    lz4 = get_compressor("lz4")
    items = [
        PutItem(PageKey(2, 1, True, (7, 0, i), i), lz4.compress(p))
        for i, p in enumerate(anon_pages[:128])
    ]
    conn = Connection()
    conn.receive_data(encode(PutBatch(items=items, cookie=42)))
    (ev,) = drain(conn)
    assert isinstance(ev, PutBatch) and ev.cookie == 42
    assert [lz4.decompress(bytes(it.data)) for it in ev.items] == anon_pages[:128]
