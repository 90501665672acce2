"""Fuzz the wire codec with >= 10^5 malformed, truncated and oversized inputs.

Every case runs through a fresh Connection (a tenth of them with a Handshake, to
fuzz the unauthenticated state) fed in random chunks. Invariants:
* nothing raises out of receive_data / next_event;
* the only events are decoded messages and the documented terminal events;
* the receive buffer never exceeds HEADER_SIZE + max_payload (the limit that
  applies: HANDSHAKE_MAX_PAYLOAD before authentication);
* after a terminal event the connection is closed and ignores further data.
Mutations keep the CRC valid where that matters, so payload decoders (not just the
checksum) see the garbage. Seeded, so a failure reproduces.
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from collections import Counter

from tmem.ramster.handshake import Handshake
from tmem.ramster.wire import (
    HANDSHAKE_MAX_PAYLOAD,
    HEADER_SIZE,
    NEED_DATA,
    Authenticated,
    Connection,
    ConnectionClosed,
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
    HandshakeFailed,
    Heartbeat,
    Hello,
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
    encode,
)

CASES = int(os.environ.get("TMEM_FUZZ_CASES", "100000"))
MAX_PAYLOAD = 64 * 1024
_HDR = struct.Struct(">HBBHHQiII")


def _corpus(rng: random.Random) -> list[bytes]:
    def key() -> PageKey:
        return PageKey(
            rng.randrange(1 << 16),
            rng.randrange(16),
            rng.random() < 0.5,
            (rng.randrange(1 << 64), rng.randrange(1 << 64), rng.randrange(1 << 64)),
            rng.randrange(1 << 32),
        )

    def blob() -> bytes:
        return rng.randbytes(rng.randrange(0, 300))

    msgs: list[Message] = [
        Hello(
            version=1,
            initiator=True,
            node=2,
            nonce=rng.randbytes(32),
            cluster="lab",
            name="n2",
            compressor="lz4",
        ),
        Proof(mac=rng.randbytes(32)),
        Ping(cookie=1),
        Pong(cookie=1),
        Heartbeat(node=3, incarnation=5, seq=9, free_frames=100, total_frames=200),
        Status(status=-28, results=(0, -28, 0)),
        Error(status=-22, reason="bad pool"),
        Put(key=key(), data=blob()),
        Get(key=key(), free=True),
        Get(key=key()),
        GetReply(key=key(), data=blob()),
        GetReply(key=key(), data=None),
        FlushPage(key=key()),
        FlushObject(key=key()),
        DestroyPool(client=1, pool_id=2, persistent=True),
        PutBatch(items=[PutItem(key(), blob(), rng.random() < 0.5) for _ in range(6)]),
        GetBatch(keys=[key() for _ in range(5)], free=True),
        GetBatchReply(items=[GetResult(key(), blob()), GetResult(key(), None)]),
        FlushBatch(items=[FlushItem(key(), rng.random() < 0.5) for _ in range(4)]),
    ]
    return [encode(m) for m in msgs]


def _reseal(frame: bytearray) -> bytes:
    """Recompute the CRC so the mutation reaches the decoders."""
    crc = zlib.crc32(memoryview(frame)[HEADER_SIZE:], zlib.crc32(memoryview(frame)[:24]))
    struct.pack_into(">I", frame, 24, crc)
    return bytes(frame)


def _mutate(rng: random.Random, corpus: list[bytes]) -> tuple[str, bytes, bool]:
    """(kind, bytes, eof_after)"""
    base = bytearray(rng.choice(corpus))
    kind = rng.randrange(10)
    if kind == 0:
        return "random", rng.randbytes(rng.randrange(1, 400)), rng.random() < 0.5
    if kind == 1:  # flip bytes anywhere, CRC left stale
        for _ in range(rng.randrange(1, 5)):
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        return "flip", bytes(base), False
    if kind == 2 and len(base) > HEADER_SIZE:  # garble the payload, CRC fixed up
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(HEADER_SIZE, len(base))
            base[i] = rng.randrange(256)
        return "payload", _reseal(base), False
    if kind == 3:  # huge or wrong length field
        n = rng.choice(
            [rng.randrange(MAX_PAYLOAD + 1, 1 << 32), 0xFFFFFFFF, len(base) - HEADER_SIZE + 1]
        )
        struct.pack_into(">I", base, 20, n)
        return "length", _reseal(base) if rng.random() < 0.5 else bytes(base), rng.random() < 0.5
    if kind == 4:  # header fields, CRC fixed up
        off, fmt, val = rng.choice(
            [
                (0, ">H", rng.randrange(1 << 16)),
                (2, ">B", rng.randrange(256)),
                (3, ">B", rng.randrange(256)),
                (4, ">H", rng.randrange(1 << 16)),
                (6, ">H", rng.randrange(1 << 16)),
                (3, ">B", rng.randrange(40)),
            ]
        )
        struct.pack_into(fmt, base, off, val)
        return "header", _reseal(base), False
    if kind == 5:  # truncated then EOF
        return "truncated", bytes(base[: rng.randrange(1, len(base))]), True
    if kind == 6:  # a bad frame between good ones
        bad = bytearray(base)
        bad[rng.randrange(len(bad))] ^= 0xFF
        return "sandwich", rng.choice(corpus) + bytes(bad) + rng.choice(corpus), False
    if kind == 7 and len(base) > HEADER_SIZE + 4:  # forged batch/status count
        struct.pack_into(">I", base, HEADER_SIZE, rng.choice([0, 1, 7, 1 << 20, 0xFFFFFFFF]))
        return "count", _reseal(base), False
    if kind == 8:  # header only announcing more than the limit
        hdr = _HDR.pack(
            0x7734, 1, rng.randrange(1, 36), 0, 0, 0, 0, MAX_PAYLOAD + rng.randrange(1, 1 << 30), 0
        )
        return "oversized", hdr, False
    other = rng.choice(corpus)  # splice two frames
    return (
        "splice",
        bytes(base[: rng.randrange(len(base) + 1)]) + other[rng.randrange(len(other)) :],
        False,
    )


def _handshake(rng: random.Random) -> Handshake:
    return Handshake(
        cluster="lab",
        secret=b"k",
        node=1,
        name="n1",
        compressor="lz4",
        initiator=False,
        known_nodes={2, 3},
        nonce=rng.randbytes(32),
    )


def test_fuzz_codec_survives_malformed_input() -> None:
    rng = random.Random(0x7734)
    corpus = _corpus(rng)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    terminal_types = (ProtocolError, HandshakeFailed, ConnectionClosed)
    t0 = time.perf_counter()
    for _ in range(CASES):
        kind, blob, eof = _mutate(rng, corpus)
        kinds[kind] += 1
        with_hs = rng.random() < 0.1
        conn = Connection(max_payload=MAX_PAYLOAD, handshake=_handshake(rng) if with_hs else None)
        conn.data_to_send()
        limit = HEADER_SIZE + (min(MAX_PAYLOAD, HANDSHAKE_MAX_PAYLOAD) if with_hs else MAX_PAYLOAD)
        events: list[object] = []
        cuts = sorted(rng.randrange(len(blob) + 1) for _ in range(rng.randrange(3)))
        prev = 0
        for cut in [*cuts, len(blob)]:
            if cut > prev:
                conn.receive_data(blob[prev:cut])
                assert conn.buffered <= limit
                while (ev := conn.next_event()) is not NEED_DATA:
                    events.append(ev)
            prev = cut
        if eof:
            conn.receive_data(b"")
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
        for ev in events[:-1]:
            assert isinstance(ev, Message | Authenticated), (kind, ev)
        if events and isinstance(events[-1], terminal_types):
            assert conn.closed and conn.buffered == 0, kind
            last = events[-1]
            outcomes[getattr(last, "reason", "eof")] += 1
            conn.receive_data(corpus[2])  # a valid Ping: ignored now
            conn.receive_data(b"")
            assert conn.next_event() is NEED_DATA
        else:
            assert not conn.closed
            assert all(isinstance(e, Message | Authenticated) for e in events), (kind, events)
            outcomes["still-open"] += 1
    elapsed = time.perf_counter() - t0
    dropped = sum(v for k, v in outcomes.items() if k not in ("still-open", "eof"))
    print(
        f"\nfuzz: {CASES} cases in {elapsed:.1f} s ({CASES / elapsed:,.0f}/s); "
        f"dropped {dropped}; outcomes {dict(outcomes.most_common())}; kinds {dict(kinds)}"
    )
    # the mutations must actually exercise the error paths, not just pass through
    for reason in ("bad-magic", "version", "oversized", "checksum", "unknown-type", "malformed",
                   "truncated", "unauthenticated"):  # fmt: skip
        assert outcomes[reason] > 0, (reason, outcomes)
    assert dropped > CASES // 2


def test_fuzz_valid_stream_split_everywhere() -> None:
    """The positive control: a valid stream cut at every byte offset decodes intact."""
    rng = random.Random(1)
    corpus = _corpus(rng)
    stream = b"".join(corpus[2:])  # data frames only (no handshake configured)
    want = len(corpus) - 2
    for cut in range(len(stream) + 1):
        conn = Connection(max_payload=MAX_PAYLOAD)
        for part in (stream[:cut], stream[cut:]):
            if part:  # b"" would be EOF
                conn.receive_data(part)
        got = []
        while (ev := conn.next_event()) is not NEED_DATA:
            got.append(ev)
        assert len(got) == want and all(isinstance(e, Message) for e in got)


def test_fuzz_accepted_frames_are_canonical() -> None:
    """Whatever garbled frame the decoder accepts re-encodes to the very same bytes:
    no ignored bits, no slack lengths, no second spelling of a message (Error's
    free-text reason, decoded leniently, is the one exception)."""
    from tmem.ramster.wire import LocalProtocolError, decode_frame

    rng = random.Random(77)
    corpus = _corpus(rng)
    accepted = 0
    for _ in range(20_000):
        frame = bytearray(rng.choice(corpus))
        if len(frame) > HEADER_SIZE and rng.random() < 0.7:
            for _ in range(rng.randrange(1, 4)):
                frame[rng.randrange(HEADER_SIZE, len(frame))] = rng.randrange(256)
        else:
            off = rng.choice([2, 3, 4, 5, 6, 7, 8, 15, 16, 19])
            frame[off] = rng.randrange(256)
        blob = _reseal(frame)
        try:
            msg = decode_frame(blob)
        except LocalProtocolError:
            continue
        accepted += 1
        if not isinstance(msg, Error):
            assert encode(msg) == blob, msg
    assert accepted > 1000
