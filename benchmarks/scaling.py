#!/usr/bin/env python3
"""Per-page cost of zcache with 10**6 stored pages vs 10**4 (target: within 1.3x).

Each size runs in a fresh ``tmem bench`` process (same corpus, compressor and
options), so the large run's heap does not colour the small one. Prints zcache
us/page for put and get at both sizes and the ratio large/small; the naive dict's
ratio is shown too, as the reference for what a plain hash table pays for size.

Usage: python3 benchmarks/scaling.py [--small 10000] [--large 1000000]
       [--corpus anon] [--compressor lz4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"


def bench(n: int, repeat: int, corpus: str, compressor: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "tmem",
        "bench",
        "--json",
        "--no-density",
        "--no-mixed",
        "--pages",
        str(n),
        "--repeat",
        str(repeat),
        "--corpus",
        corpus,
        "--compressor",
        compressor,
    ]
    # the installed tmem (compiled, as users run it) when there is one, else the tree's
    installed = importlib.util.find_spec("tmem") is not None
    env = dict(os.environ) if installed else {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--small-repeat", type=int, default=9)
    parser.add_argument("--large-repeat", type=int, default=3)
    parser.add_argument("--corpus", default="anon")
    parser.add_argument("--compressor", default="lz4")
    args = parser.parse_args()

    small = bench(args.small, args.small_repeat, args.corpus, args.compressor)
    large = bench(args.large, args.large_repeat, args.corpus, args.compressor)
    print(
        f"corpus {small['corpus']}, {args.compressor}; "
        f"{args.small:,} pages (median of {args.small_repeat}) vs "
        f"{args.large:,} pages (median of {args.large_repeat})"
    )
    print(
        f"{'':10s} {'small us/page':>14s} {'large us/page':>14s} {'large/small':>12s}"
        f"   {'dict large/small':>16s}"
    )
    for op in ("put", "get"):
        s_rate = small[op]["zcache_pages_per_s"]
        l_rate = large[op]["zcache_pages_per_s"]
        if not s_rate or not l_rate:
            continue
        d_ratio = small[op]["dict_pages_per_s"] / large[op]["dict_pages_per_s"]
        print(
            f"{op:10s} {1e6 / s_rate:14.2f} {1e6 / l_rate:14.2f} {s_rate / l_rate:11.2f}x"
            f"   {d_ratio:15.2f}x"
        )


if __name__ == "__main__":
    main()
