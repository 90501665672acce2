#!/usr/bin/env python3
"""zcache vs a naive ``dict[(oid, index)] -> lz4 bytes`` cache, same pages, same run.

Usage: python3 benchmarks/zcache_vs_dict.py [--corpus anon] [--compressor lz4]
       [--pages N] [--repeat R]

A thin wrapper over :func:`tmem.bench.run_bench` (what ``tmem bench`` runs), printing
the ratios the project tracks: put >= 0.75x and get >= 0.6x of the dict on the
anon corpus with lz4 (the same pages on both sides; pages zcache refuses are kept
raw by the caller, inside zcache's time), density of ALL offered pages including
metadata and refused pages, and metadata bytes per stored page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tmem.bench import run_bench
from tmem.corpus import describe_source, load_pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="anon")
    parser.add_argument("--compressor", default="lz4")
    parser.add_argument("--pages", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    pages = load_pages(args.corpus)
    report = run_bench(
        pages,
        n=args.pages,
        compressor=args.compressor,
        repeat=args.repeat,
        corpus=f"{args.corpus} ({describe_source(args.corpus)})",
    ).as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    z = report["density"]["zcache"]
    print(
        f"corpus {report['corpus']}, {report['compressor']}, {report['pages']} pages, "
        f"median of {report['repeat']}"
    )
    for op in ("put", "get"):
        row = report[op]
        print(
            f"  {op:9s} zcache {row['zcache_pages_per_s']:>11,.0f}/s   dict "
            f"{row['dict_pages_per_s']:>11,.0f}/s   ratio {row['ratio']:.2f}x"
        )
    print(
        f"  density of all offered pages {z['density']:.3f} "
        f"({z['refused_pages']} refused, kept raw)  "
        f"(dict {report['density']['dict']['density']:.3f}); "
        f"metadata {z['metadata_per_page']:.1f} B/page (tracemalloc), "
        f"engine estimate {z['metadata_bytes_engine'] / max(1, z['stored_pages']):.1f} B/page"
    )
    print(f"  rejects {report['rejects']}, verified {report['verified']}")
    m = report["mixed"]
    print(
        f"  mixed: evicted eph frames {m.get('evicted_eph_pageframes')}, "
        f"pers corrupt {m['pers_corrupt']}, eph hits {m['eph_hits']}/"
        f"{m['eph_hits'] + m['eph_misses']}"
    )


if __name__ == "__main__":
    main()
