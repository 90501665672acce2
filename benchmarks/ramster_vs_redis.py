"""Remote put/get pages per second: RAMster node vs redis-server, same pages, same run.

Starts a real RAMster node process (``tmem cluster serve``) and a redis-server on
free loopback ports.  The sending node runs in this process: the real
:class:`~tmem.ramster.transport.Transport` with the HMAC handshake, sending
PutBatch/GetBatch frames the way its remotify worker and remote gets do.

The baseline is redis with its own batch commands, given the *same* byte strings
and the same batches: one ``MSET`` (put) or ``MGET`` (get) of ``--batch`` pages
per RAMster PutBatch/GetBatch, not one SET/GET per page.  With N batches in flight
(``/N``), RAMster has N requests outstanding on its connection and redis gets a
pipeline of N MSET/MGET commands per round trip: the same number of batches in
flight on both sides.  N = 1 and N = 2 are measured.  Each round runs redis/1,
ramster/1, redis/2, ramster/2 back to back and the median of the rounds is
reported, since the machine may be shared.  redis-py parses replies with hiredis
when it is installed (the header says which).

Two payloads are measured:
* ``stored``: each page's stored form, lz4-compressed (what remotify sends);
* ``raw``: the 4096-byte pages themselves (the receiver compresses them).

Usage::

    python3 benchmarks/ramster_vs_redis.py [--pages 20000] [--batch 256] [--rounds 5]

Prints pages/s for each and the ratio RAMster / redis at the same depth, also per
round (paired: the median, worst: the lowest).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import statistics
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


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, this process's CPU (the client) and the server's CPU of one phase."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.s0 = proc_cpu(server_pid)

    def stop(self, pages: int) -> tuple[float, float, float]:
        """(pages/s, server CPU us/page, client CPU us/page)."""
        wall = time.perf_counter() - self.t0
        cli = time.process_time() - self.c0
        srv = proc_cpu(self.pid) - self.s0
        return pages / wall, srv / pages * 1e6, cli / pages * 1e6


#: what each run returns, in order
FIELDS = ("put", "get", "put_srv", "get_srv", "put_cli", "get_cli")


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
    cluster: Path,
    blobs: list[tuple[bytes, bool]],
    batch: int,
    pool: int,
    inflight: int,
    node_pid: int,
) -> tuple[float, ...]:
    """Put then get ``blobs`` in PutBatch/GetBatch of ``batch`` pages, ``inflight`` requests
    outstanding: the :data:`FIELDS`."""
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

        m = Meter(node_pid)
        for w in range(0, len(starts), inflight):
            await asyncio.gather(*(put(i) for i in starts[w : w + inflight]))
        put_m = m.stop(len(blobs))
        m = Meter(node_pid)
        n = 0
        for w in range(0, len(starts), inflight):
            n += sum(await asyncio.gather(*(get(i) for i in starts[w : w + inflight])))
        get_m = m.stop(len(blobs))
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
        return put_m[0], get_m[0], put_m[1], get_m[1], put_m[2], get_m[2]
    finally:
        await t.stop()


def redis_run(
    port: int, datas: list[bytes], batch: int, tag: str, inflight: int, redis_pid: int
) -> tuple[float, ...]:
    """Put then get ``datas`` as MSET/MGET of ``batch`` pages, ``inflight`` commands per
    round trip (a pipeline of them): the :data:`FIELDS`."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    keys = [f"{tag}:1:0:0:{i}".encode() for i in range(len(datas))]
    starts = list(range(0, len(datas), batch))
    r.ping()  # connect outside the clock, as RAMster's handshake is
    m = Meter(redis_pid)
    for w in range(0, len(starts), inflight):
        p = r.pipeline(transaction=False)
        for i in starts[w : w + inflight]:
            p.mset(dict(zip(keys[i : i + batch], datas[i : i + batch], strict=True)))
        p.execute()
    put_m = m.stop(len(datas))
    m = Meter(redis_pid)
    n = 0
    for w in range(0, len(starts), inflight):
        p = r.pipeline(transaction=False)
        for i in starts[w : w + inflight]:
            p.mget(keys[i : i + batch])
        n += sum(v is not None for got in p.execute() for v in got)
    get_m = m.stop(len(datas))
    if n != len(datas):
        raise RuntimeError(f"redis returned {n} of {len(datas)}")
    assert r.get(keys[0]) == datas[0] and r.get(keys[-1]) == datas[-1]
    r.flushall()
    r.close()
    return put_m[0], get_m[0], put_m[1], get_m[1], put_m[2], get_m[2]


def hiredis_in_use() -> bool:
    """Whether redis-py parses replies with hiredis (faster MGET replies)."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)


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
        f"batch {args.batch}, stored form mean {mean:.0f} B; baseline redis-server "
        f"MSET/MGET via redis-py (hiredis parser: {'yes' if hiredis_in_use() else 'no'})"
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
        # per round and payload, per depth: redis FIELDS then RAMster FIELDS
        results: dict[str, list[dict[tuple[str, int, str], float]]] = {}
        for rnd in range(args.rounds):
            for name, blobs in (("stored", stored), ("raw", raw)):
                datas = [b for b, _ in blobs]
                row: dict[tuple[str, int, str], float] = {}
                with asyncio.Runner(loop_factory=loop_factory()) as runner:
                    for depth in (1, 2):
                        rd = redis_run(
                            rport, datas, args.batch, f"{name}{rnd}", depth, redis_proc.pid
                        )
                        rm = runner.run(
                            ramster_run(cluster, blobs, args.batch, depth - 1, depth, node.pid)
                        )
                        for f, a, b in zip(FIELDS, rd, rm, strict=True):
                            row[("redis", depth, f)] = a
                            row[("ramster", depth, f)] = b
                results.setdefault(name, []).append(row)
        print(
            f"{'payload':8s} {'op':4s} {'depth':>5s} {'redis p/s':>10s} {'ramster p/s':>11s}"
            f" {'ratio':>6s} {'paired':>7s} {'worst':>6s} {'best':>6s}"
            f" {'server CPU us/page':>20s} {'client CPU us/page':>20s}"
        )
        print(f"{'':54s} {'redis':>9s} {'ramster':>10s} {'redis':>9s} {'ramster':>10s}")
        for name, rows in results.items():

            def med(
                side: str, depth: int, f: str, rows: list[dict[tuple[str, int, str], float]] = rows
            ) -> float:
                """Median over the rounds (the machine is shared; medians resist outliers)."""
                return float(statistics.median(r[(side, depth, f)] for r in rows))

            for depth in (1, 2):
                for op in ("put", "get"):
                    red, ram = med("redis", depth, op), med("ramster", depth, op)
                    # per-round ratios: redis and RAMster of one round ran back to back
                    per = sorted(r[("ramster", depth, op)] / r[("redis", depth, op)] for r in rows)
                    print(
                        f"{name:8s} {op:4s} {depth:5d} {red:10.0f} {ram:11.0f} {ram / red:5.2f}x"
                        f" {statistics.median(per):6.2f}x {per[0]:5.2f}x {per[-1]:5.2f}x"
                        f" {med('redis', depth, op + '_srv'):9.2f}"
                        f" {med('ramster', depth, op + '_srv'):10.2f}"
                        f" {med('redis', depth, op + '_cli'):9.2f}"
                        f" {med('ramster', depth, op + '_cli'):10.2f}"
                    )
        print(
            f"median of {args.rounds} rounds; batches of {args.batch} pages: redis MSET/MGET"
            " (a pipeline of `depth` of them per round trip) vs RAMster PutBatch/GetBatch"
            " (`depth` requests in flight on the one node connection);\n"
            "ratio = median RAMster / median redis; paired = median, worst = lowest, best ="
            " highest of the per-round ratios (each round runs redis, then RAMster, per depth);\n"
            "server CPU = redis-server or the RAMster node process (/proc, all threads);"
            " client CPU = this process (redis-py + hiredis, or the RAMster Transport)"
        )
    finally:
        node.terminate()
        redis_proc.terminate()
        node.wait(10)
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
