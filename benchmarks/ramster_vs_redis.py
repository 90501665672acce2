"""Remote put/get pages per second: RAMster node vs redis-server, same pages, same run.

Starts a real RAMster node process (``tmem cluster serve``) and a redis-server on
free loopback ports.  The sending node runs in this process: the real
:class:`~tmem.ramster.transport.Transport` with the HMAC handshake, sending
PutBatch/GetBatch frames the way its remotify worker and remote gets do.  redis
gets the *same* byte strings through redis-py pipelines of the same batch size.
redis-py sends one pipeline at a time (one round trip per batch); RAMster is
measured with one batch in flight (``ramster/1``, the like-for-like number) and
with two (``ramster/2``: requests are cookie-matched, so a node may overlap
them).  Rounds alternate redis and RAMster and the median is reported, since
the machine may be shared.

Two payloads are measured:
* ``stored``: each page's stored form, lz4-compressed (what remotify sends);
* ``raw``: the 4096-byte pages themselves (the receiver compresses them).

Usage::

    python3 benchmarks/ramster_vs_redis.py [--pages 20000] [--batch 256] [--rounds 5]

Prints pages/s for each and the ratio RAMster / redis (target >= 1.0), also per
round (paired: the median, worst: the lowest).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tmem.aio import loop_factory  # noqa: E402
from tmem.compress import get_compressor  # noqa: E402
from tmem.ramster.config import load_config  # noqa: E402
from tmem.ramster.remotify import Blob, Key, PutStatus  # noqa: E402
from tmem.ramster.transport import Transport  # noqa: E402

CORPUS = ROOT.parent.parent / "shared" / "corpus" / "anon.pages"
ALT_CORPUS = Path("/work/shared/corpus/anon.pages")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def load_pages(n: int) -> list[bytes]:
    for path in (CORPUS, ALT_CORPUS):
        if path.exists():
            blob = path.read_bytes()
            pages = [blob[i : i + 4096] for i in range(0, len(blob) - 4095, 4096)]
            break
    else:
        import random

        rng = random.Random(1)
        pages = [rng.randbytes(1536) + bytes(2560) for _ in range(2048)]
    out = [pages[i % len(pages)] for i in range(n)]
    # Make every page distinct (a counter in the first 8 bytes), as real pages are.
    return [i.to_bytes(8, "little") + p[8:] for i, p in enumerate(out)]


class Sink:
    """The sender's RequestHandler: it serves nothing in this benchmark."""

    def store_foreign(self, client: int, persistent: bool, items: Any) -> list[int]:
        return [PutStatus.BAD for _ in items]

    def get_foreign(self, client: int, keys: Any, free: bool) -> list[Blob | None]:
        return [None for _ in keys]

    def flush_foreign(self, client: int, keys: Any) -> int:
        return 0

    def flush_foreign_objects(self, client: int, objs: Any) -> int:
        return 0

    def destroy_foreign_pools(self, client: int, pools: Any) -> int:
        return 0

    def heartbeat(self, hb: Any, peer: int) -> None:
        return None


async def ramster_run(
    cluster: Path, blobs: list[tuple[bytes, bool]], batch: int, pool: int, inflight: int = 1
) -> tuple[float, float]:
    cfg = load_config(cluster)
    me = cfg.node("sender")
    t = Transport(cfg, me, Sink())
    await t.start()
    try:
        deadline = time.monotonic() + 20
        while not t.is_connected(1):
            if time.monotonic() > deadline:
                raise RuntimeError("sender could not connect to the node")
            await asyncio.sleep(0.02)
        keys: list[Key] = [(pool, (1, 0, 0), i) for i in range(len(blobs))]
        starts = list(range(0, len(blobs), batch))

        async def put(i: int) -> None:
            items = [(keys[j], *blobs[j]) for j in range(i, min(i + batch, len(blobs)))]
            st = await t.put_pages(1, True, items)
            if any(s != PutStatus.STORED for s in st):
                raise RuntimeError(f"node refused pages: {set(st)}")

        async def get(i: int) -> int:
            got = await t.get_pages(1, keys[i : i + batch], False)
            return sum(g is not None for g in got)

        t0 = time.perf_counter()
        for w in range(0, len(starts), inflight):
            await asyncio.gather(*(put(i) for i in starts[w : w + inflight]))
        put_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for w in range(0, len(starts), inflight):
            n += sum(await asyncio.gather(*(get(i) for i in starts[w : w + inflight])))
        get_s = time.perf_counter() - t0
        if n != len(blobs):
            raise RuntimeError(f"node returned {n} of {len(blobs)} pages")
        # Spot-check contents (same-filled pages come back decompressed).
        lz4 = get_compressor("lz4")
        got = await t.get_pages(1, keys[:50], False)
        for g, b in zip(got, blobs[:50], strict=True):
            assert g is not None
            page = lz4.decompress(g[0]) if g[1] else g[0]
            want = lz4.decompress(b[0]) if b[1] else b[0]
            assert page == want, "page mismatch"
        await t.flush_objects(1, [(pool, (1, 0, 0))])
        return len(blobs) / put_s, len(blobs) / get_s
    finally:
        await t.stop()


def redis_run(port: int, datas: list[bytes], batch: int, tag: str) -> tuple[float, float]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    keys = [f"{tag}:1:0:0:{i}".encode() for i in range(len(datas))]
    t0 = time.perf_counter()
    for i in range(0, len(datas), batch):
        p = r.pipeline(transaction=False)
        for j in range(i, min(i + batch, len(datas))):
            p.set(keys[j], datas[j])
        p.execute()
    put_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(datas), batch):
        p = r.pipeline(transaction=False)
        for j in range(i, min(i + batch, len(datas))):
            p.get(keys[j])
        n += sum(v is not None for v in p.execute())
    get_s = time.perf_counter() - t0
    if n != len(datas):
        raise RuntimeError(f"redis returned {n} of {len(datas)}")
    assert r.get(keys[0]) == datas[0]
    r.flushall()
    r.close()
    return len(datas) / put_s, len(datas) / get_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")

    pages = load_pages(args.pages)
    lz4 = get_compressor("lz4")
    stored: list[tuple[bytes, bool]] = []
    for p in pages:
        c = lz4.compress(p)
        stored.append((c, True) if len(c) <= 3584 else (p, False))
    raw = [(p, False) for p in pages]
    # The page lists live for the whole run: keep the cyclic GC from re-walking them
    # during every timed phase (this process is the client of both redis and RAMster).
    gc.collect()
    gc.freeze()
    mean = sum(len(b) for b, _ in stored) / len(stored)
    print(
        f"{len(pages)} pages ({'corpus' if ALT_CORPUS.exists() else 'generated'}), "
        f"batch {args.batch}, stored form mean {mean:.0f} B"
    )

    tmp = Path(tempfile.mkdtemp(prefix="ramster-bench-"))
    rport = free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(rport),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cluster = tmp / "bench.toml"
    nport, sport = free_port("127.0.0.1"), free_port("127.0.0.2")
    cluster.write_text(
        '[cluster]\nname = "bench"\nsecret = "bench-secret-0123456789"\nreplicas = 1\n'
        "request_timeout = 30.0\nidle_timeout = 60.0\n"
        f'[[node]]\nname = "node"\nnumber = 1\nhost = "127.0.0.1"\nport = {nport}\n'
        f'[[node]]\nname = "sender"\nnumber = 2\nhost = "127.0.0.2"\nport = {sport}\n'
    )
    mem_mib = max(256, args.pages * 4096 * 2 // (1 << 20))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tmem",
            "cluster",
            "serve",
            "--cluster",
            str(cluster),
            "--node",
            "node",
            "--memory",
            f"{mem_mib}MiB",
            "--huge-pages",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=rport).ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results: dict[str, list[tuple[float, ...]]] = {}
        for rnd in range(args.rounds):
            for name, blobs in (("stored", stored), ("raw", raw)):
                datas = [b for b, _ in blobs]
                rd = redis_run(rport, datas, args.batch, f"{name}{rnd}")
                with asyncio.Runner(loop_factory=loop_factory()) as runner:
                    r1 = runner.run(ramster_run(cluster, blobs, args.batch, pool=0, inflight=1))
                    r2 = runner.run(ramster_run(cluster, blobs, args.batch, pool=1, inflight=2))
                results.setdefault(name, []).append((*rd, *r1, *r2))
        print(
            f"{'payload':8s} {'op':4s} {'redis p/s':>10s} {'ramster/1':>10s} {'ratio':>6s}"
            f" {'paired':>7s} {'worst':>6s} {'ramster/2':>10s} {'ratio':>6s}"
        )
        for name, rows in results.items():
            # median of the rounds (the machine is shared; medians resist outliers)
            med = [sorted(r[k] for r in rows)[len(rows) // 2] for k in range(6)]
            for op, k in (("put", 0), ("get", 1)):
                red, a1, a2 = med[k], med[2 + k], med[4 + k]
                # per-round ratios: redis and RAMster of one round ran back to back
                per = sorted(r[2 + k] / r[k] for r in rows)
                print(
                    f"{name:8s} {op:4s} {red:10.0f} {a1:10.0f} {a1 / red:5.2f}x"
                    f" {per[len(per) // 2]:6.2f}x {per[0]:5.2f}x {a2:10.0f} {a2 / red:5.2f}x"
                )
        print(
            f"median of {args.rounds} rounds; redis-py pipelines of {args.batch}, one at a time;"
            " ramster/N = N batches in flight on the one node connection;\n"
            "ratio = median RAMster / median redis; paired = median and worst = lowest of the"
            " per-round ratios of ramster/1 (each round runs redis, then RAMster)"
        )
    finally:
        node.terminate()
        redis_proc.terminate()
        node.wait(10)
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
