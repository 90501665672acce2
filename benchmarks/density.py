#!/usr/bin/env python3
"""Density as the OS sees it, per corpus x codec x allocator, against the naive dict.

Usage: python3 benchmarks/density.py [--corpus anon,file] [--allocators zsmalloc,zbud]
       [--repeat 3] [--json]

Each cell runs in a fresh process (so RSS growth is the store's alone), exactly as
``../shared/tools/rss_density.py`` measures: every page of the corpus file in one
persistent pool (budget twice the data, huge pages on: nothing refused), compaction,
then every page read back and compared. Codecs: ``lz4``, ``zstd``, and ``lz4+recompress``
(lz4 at put, then every page recompressed with zstd once settled: recompress_after=0
and ``compact_all()``, what a server does after 30 idle seconds).

Columns: density by RSS growth; by anonymous RSS growth only (RssAnon: without the
library code a first put pages in, ~0.8 MiB of shared, file-backed pages with the
mypyc-compiled build, a fixed cost that 8 MiB of pages feel and a real store does
not); by the store's own count (mem_used_total); metadata
bytes per stored page, and put/get speed as ratios to a naive ``dict[(oid, index)] ->
compressed bytes`` with the same codec (lz4+recompress: against dict+lz4 for puts,
since recompression is background work), timed in the same child process, best of
``--repeat`` passes (CPU time), same pages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"

CHILD = r"""
import gc, json, sys, time
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
import tmem
from tmem.compress import get_compressor

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no " + field)

def rss():
    return status("VmRSS")

def anon():
    return status("RssAnon")

rss(); anon()  # the first read of /proc/self/status pages in code of its own

path, codec, alloc, repeat = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
data = open(path, "rb").read()
pages = [data[i : i + 4096] for i in range(0, len(data) - 4095, 4096)]
tiered = codec == "lz4+recompress"
base_codec = "lz4" if tiered else codec
out = {}
if alloc == "dict":
    comp = get_compressor(base_codec)
    c, d = comp.compress, comp.decompress
    c(pages[0]); d(c(pages[0]))
    gc.collect(); before = rss(); before_anon = anon()
    store = {}
    t0 = time.process_time()
    for i, p in enumerate(pages):
        store[(0, 0, 1, i)] = c(p)
    put = time.process_time() - t0
    gc.collect(); after = rss(); after_anon = anon()
    t0 = time.process_time()
    ok = sum(d(store[(0, 0, 1, i)]) == p for i, p in enumerate(pages))
    get = time.process_time() - t0
    best_put, best_get = put, get
    for _ in range(repeat - 1):
        s2 = {}
        t0 = time.process_time()
        for i, p in enumerate(pages):
            s2[(0, 0, 1, i)] = c(p)
        best_put = min(best_put, time.process_time() - t0)
        t0 = time.process_time()
        for i in range(len(pages)):
            d(s2[(0, 0, 1, i)])
        best_get = min(best_get, time.process_time() - t0)
        del s2
    out = dict(rss=len(pages) * 4096 / max(1, after - before),
               anon=len(pages) * 4096 / max(1, after_anon - before_anon),
               put=best_put, get=best_get, ok=ok == len(pages))
else:
    kw = dict(memory=2 * len(data), compressor=base_codec, huge_pages=True, allocator=alloc)
    if tiered:
        kw.update(recompress="zstd", recompress_after=0.0)
    get_compressor(base_codec).compress(pages[0])
    gc.collect(); before = rss(); before_anon = anon()
    zc = tmem.Zcache(**kw)
    pool = zc.new_pool(persistent=True)
    t0 = time.process_time()
    stored = sum(zc.put(pool, (0, 0, 1), i, p) for i, p in enumerate(pages))
    put = time.process_time() - t0
    if tiered:
        zc.recompress(10**9, now=zc.pages.now() + 1)
    zc.compact_all()
    gc.collect(); after = rss(); after_anon = anon()
    t0 = time.process_time()
    ok = sum(zc.get(pool, (0, 0, 1), i) == p for i, p in enumerate(pages))
    get = time.process_time() - t0
    st = zc.stats()
    best_put, best_get = put, get
    for _ in range(repeat - 1):  # speed: a second store, the same pages
        z2 = tmem.Zcache(**kw)
        p2 = z2.new_pool(persistent=True)
        t0 = time.process_time()
        for i, p in enumerate(pages):
            z2.put(p2, (0, 0, 1), i, p)
        best_put = min(best_put, time.process_time() - t0)
        t0 = time.process_time()
        for i in range(len(pages)):
            z2.get(p2, (0, 0, 1), i)
        best_get = min(best_get, time.process_time() - t0)
        del z2
    out = dict(
        rss=stored * 4096 / max(1, after - before),
        anon=stored * 4096 / max(1, after_anon - before_anon),
        stats=stored * 4096 / max(1, st["mem_used_total"]),
        meta=st["metadata_bytes"] / max(1, st["stored_pages"]),
        put=best_put, get=best_get, ok=ok == stored == len(pages),
    )
print(json.dumps(out))
"""


def run(path: Path, codec: str, alloc: str, repeat: int) -> dict[str, float]:
    # the installed tmem (compiled, as users run it) when there is one, else the tree's
    src = "" if importlib.util.find_spec("tmem") else str(ROOT / "src")
    cmd = [sys.executable, "-c", CHILD, src, str(path), codec, alloc, str(repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="anon,file")
    parser.add_argument("--allocators", default="zsmalloc,zbud")
    parser.add_argument("--codecs", default="lz4,zstd,lz4+recompress")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for corpus in args.corpus.split(","):
        path = CORPUS / f"{corpus}.pages"
        if not path.exists():
            sys.exit(f"no corpus file {path}")
        for codec in args.codecs.split(","):
            base = run(path, "lz4" if codec == "lz4+recompress" else codec, "dict", args.repeat)
            for alloc in args.allocators.split(","):
                r = run(path, codec, alloc, args.repeat)
                rows.append(
                    {
                        "corpus": corpus,
                        "codec": codec,
                        "allocator": alloc,
                        "rss": r["rss"],
                        "anon": r["anon"],
                        "stats": r["stats"],
                        "meta": r["meta"],
                        "put": base["put"] / r["put"],
                        "get": base["get"] / r["get"],
                        "dict_rss": base["rss"],
                        "ok": r["ok"] and base["ok"],
                    }
                )
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        "| corpus | codec | allocator | density (RSS) | (anon RSS) | density (stats) "
        "| metadata B/page | put vs dict | get vs dict | dict density (RSS) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flag = "" if r["ok"] else " (READ-BACK FAILED)"
        print(
            f"| {r['corpus']} | {r['codec']} | {r['allocator']} | {r['rss']:.2f} | "
            f"{r['anon']:.2f} | {r['stats']:.2f} | {r['meta']:.1f} | {r['put']:.2f}x | "
            f"{r['get']:.2f}x | {r['dict_rss']:.2f}{flag} |"
        )


if __name__ == "__main__":
    main()
