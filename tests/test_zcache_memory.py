"""mem_used_total is what the process really holds for the store (its RSS growth).

Measured in a fresh interpreter: the test process's own heap would blur the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tmem.zcache

# Runs in the child: argv = pages file, prefault (0/1). Prints one JSON line.
CHILD = r"""
import json, os, sys
import tmem.zcache
from tmem.zcache import Zcache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

with open(sys.argv[1], "rb") as f:
    blob = f.read()
pages = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]
del blob
prefault = sys.argv[2] == "1"
# Warm up: import and run every code path once, so the baseline includes them.
warm = Zcache("64KiB", prefault=prefault)
wp = warm.new_pool(persistent=True)
warm.put(wp, (0, 0, 0), 0, pages[0])
warm.get(wp, (0, 0, 0), 0)
warm.flush_object(wp, (0, 0, 0))
warm.stats()
del warm, wp
before = rss()
zc = Zcache("24MiB", prefault=prefault)
pool = zc.new_pool(persistent=True)
reps = -(-4096 // len(pages))
for rep in range(reps):
    for i, page in enumerate(pages):
        zc.put(pool, (rep, i // 512, 0), i % 512, page)
stored = zc.stats()["stored_pages"]
# Flush the later half: their frames go back to the free stack but stay resident.
for rep in range(reps // 2, reps):
    for obj in range(-(-len(pages) // 512)):
        zc.flush_object(pool, (rep, obj, 0))
stats = zc.stats()
grown = rss() - before
print(json.dumps({"file": tmem.zcache.__file__, "stored": stored, "grown": grown,
                  "frames_used": stats["frames_used"], "stats": stats}))
"""


@pytest.mark.parametrize("prefault", [True, False])
def test_mem_used_total_matches_rss_growth(
    tmp_path: Path, anon_pages: list[bytes], prefault: bool
) -> None:
    pages_file = tmp_path / "pages"
    pages_file.write_bytes(b"".join(anon_pages))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(pages_file), "1" if prefault else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["file"] == tmem.zcache.__file__  # the build this test run uses
    assert got["stored"] > 3000
    stats, grown = got["stats"], got["grown"]
    # Half the pages were flushed: frames sit free but resident, and a prefaulted
    # arena is resident whole.
    assert stats["frames_used"] * 4096 < 0.75 * grown
    assert abs(stats["mem_used_total"] - grown) <= 0.2 * grown, (stats["mem_used_total"], grown)
    assert stats["mem_used_total"] <= stats["memory_budget"] + stats["metadata_bytes"]
