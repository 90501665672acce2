"""Micro-benchmark of the RAMster wire codec: encode + decode of put batches.

Compares, in the same run, on the same pages (lz4-compressed corpus pages):
* ``struct``  -- tmem.ramster.wire (records array + concatenated data, zero-copy views)
* ``msgpack`` -- the alternative considered: one msgpack array of per-page lists,
                 crc32 over it, decoded back into the same typed PutItems
* ``redis-py`` -- redis-py's own pipeline packing of the same pages as SET commands
                 (encode only: the client-side cost the cluster benchmark competes with)

Run:  PYTHONPATH=src python3 benchmarks/ramster_wire_codec.py [--pages 128] [--seconds 1]
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack

from tmem.compress import PAGE_SIZE, get_compressor
from tmem.ramster.wire import NEED_DATA, Connection, PageKey, PutBatch, PutItem, encode

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "anon.pages"


def load_pages(n: int) -> list[bytes]:
    if CORPUS.exists():
        blob = CORPUS.read_bytes()
        pages = [blob[i : i + PAGE_SIZE] for i in range(0, len(blob), PAGE_SIZE)]
    else:
        import random

        rng = random.Random(1)
        pages = [rng.randbytes(1200) + bytes(PAGE_SIZE - 1200) for _ in range(n * 4)]
    lz4 = get_compressor("lz4")
    comp = [lz4.compress(p) for p in pages]
    # keep pages that compress to a RAMster-typical 0.5..3.5 KiB, ~1.5 KiB on average
    comp = [c for c in comp if 512 <= len(c) <= 3584]
    comp.sort(key=lambda c: abs(len(c) - 1536))
    return comp[:n]


def rate(fn: Callable[[], object], pages: int, seconds: float) -> float:
    """Pages per CPU-second of ``fn``: best of 7 short runs, timed with process_time so
    that other processes on a shared machine do not count against us."""
    loops = 1
    while True:  # calibrate to ~seconds/7 per run
        t0 = time.process_time()
        for _ in range(loops):
            fn()
        dt = time.process_time() - t0
        if dt >= seconds / 70 or loops > 1 << 20:
            break
        loops *= 2
    loops = max(1, int(loops * (seconds / 7) / max(dt, 1e-6)))
    best = float("inf")
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(loops):
            fn()
        best = min(best, time.process_time() - t0)
    return loops * pages / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()
    comp = load_pages(args.pages)
    n = len(comp)
    mean = sum(map(len, comp)) / n
    items = [PutItem(PageKey(2, 1, True, (7, 0, i), i), c) for i, c in enumerate(comp)]
    batch = PutBatch(items=items, cookie=1)

    # -- struct (ours)
    frame = encode(batch)

    def struct_encode() -> object:
        return encode(batch)

    def struct_decode() -> object:
        conn = Connection()
        conn.receive_data(frame)
        ev = conn.next_event()
        assert ev is not NEED_DATA and len(ev.items) == n  # type: ignore[union-attr]
        return ev

    def struct_both() -> object:
        conn = Connection()
        conn.receive_data(encode(batch))
        return conn.next_event()

    # -- msgpack alternative, decoded into the same typed items
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def mp_enc() -> bytes:
        body = packb(
            [
                [k.client, k.pool_id, k.persistent, k.oid[0], k.oid[1], k.oid[2], k.index, d, c]
                for k, d, c in items
            ]
        )
        return zlib.crc32(body).to_bytes(4, "big") + body

    mframe = mp_enc()

    def mp_dec() -> object:
        if zlib.crc32(memoryview(mframe)[4:]) != int.from_bytes(mframe[:4], "big"):
            raise ValueError("crc")
        rows = unpackb(memoryview(mframe)[4:])
        return [PutItem(PageKey(c, p, f, (a, b, e), i), d, z) for c, p, f, a, b, e, i, d, z in rows]

    def mp_both() -> object:
        body = mp_enc()
        if zlib.crc32(memoryview(body)[4:]) != int.from_bytes(body[:4], "big"):
            raise ValueError("crc")
        rows = unpackb(memoryview(body)[4:])
        return [PutItem(PageKey(c, p, f, (a, b, e), i), d, z) for c, p, f, a, b, e, i, d, z in rows]

    assert [bytes(x.data) for x in struct_decode().items] == comp  # type: ignore[attr-defined]
    assert [bytes(x.data) for x in mp_dec()] == comp  # type: ignore[attr-defined]

    # -- redis-py pipeline packing of the same pages (client-side encode only)
    try:
        from redis.connection import Connection as RedisConnection

        rconn = RedisConnection()
        cmds = [("SET", f"p:2:1:7:0:{i}:{i}", c) for i, c in enumerate(comp)]

        def redis_pack() -> object:
            return rconn.pack_commands(cmds)

    except ImportError:  # pragma: no cover
        redis_pack = None  # type: ignore[assignment]

    s = args.seconds
    res = {
        "struct encode": rate(struct_encode, n, s),
        "struct decode": rate(struct_decode, n, s),
        "struct enc+dec": rate(struct_both, n, s),
        "msgpack encode": rate(mp_enc, n, s),
        "msgpack decode": rate(mp_dec, n, s),
        "msgpack enc+dec": rate(mp_both, n, s),
    }
    if redis_pack is not None:
        res["redis-py pack_commands (encode)"] = rate(redis_pack, n, s)
    print(
        f"python {sys.version.split()[0]}; batch of {n} lz4 pages, "
        f"mean {mean:.0f} B, frame {len(frame)} B"
    )
    for name, r in res.items():
        print(f"  {name:34s} {r:12,.0f} pages/s  {r * mean / 1e6:8.1f} MB/s")
    print(f"ratio struct/msgpack enc+dec: {res['struct enc+dec'] / res['msgpack enc+dec']:.2f}x")
    if redis_pack is not None:
        print(
            "ratio struct encode / redis-py pack_commands: "
            f"{res['struct encode'] / res['redis-py pack_commands (encode)']:.2f}x"
        )


if __name__ == "__main__":
    main()
