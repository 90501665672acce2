"""The bench library: keys, budget sizing, phases, report shape (small and fast)."""

from __future__ import annotations

import os

import pytest

from tmem import bench, corpus
from tmem.frontends import swizzle

PAGE = 4096


@pytest.fixture(scope="module")
def anon_pages() -> list[bytes]:
    """Real anonymous pages: the shared corpus, or sampled from a child process."""
    return corpus.load_pages("anon", sample_pages=1024)


def test_items_use_frontswap_keys(anon_pages: list[bytes]) -> None:
    items = bench.make_items(anon_pages[:10], 700)
    assert len(items) == 700
    for i in (0, 9, 255, 256, 699):
        oid, index, page = items[i]
        assert (oid, index) == swizzle(0, i)
        assert page is anon_pages[i % 10]


def test_enough_memory_holds_every_page(anon_pages: list[bytes]) -> None:
    n = 3000
    budget = bench._enough_memory(anon_pages, n, "lz4")
    assert budget < n * PAGE  # zbud pairs pages: no frame per page
    report = bench.run_bench(anon_pages, n=n, repeat=1, density=False, mixed=False)
    assert report.memory == budget
    stats = report.zcache_stats
    # every put either stored or was rejected for compressing poorly, never for lack of room
    assert report.runs[0].rejects == stats["compress_poor"] + stats["mean_compress_poor"]
    d = report.as_dict()
    assert d["rejects"] == d["rejects_poor_compression"] and d["rejects_no_memory"] == 0


def test_small_budget_rejects_for_memory(anon_pages: list[bytes]) -> None:
    report = bench.run_bench(anon_pages, n=600, memory="256KiB", repeat=1, density=False)
    d = report.as_dict()
    assert d["memory"] == 256 * 1024
    assert d["rejects_no_memory"] > 0
    assert d["rejects"] == d["rejects_poor_compression"] + d["rejects_no_memory"]
    assert d["verified"]  # stored pages read back intact, rejected ones are absent
    assert report.runs[0].verified


def test_incompressible_pages_need_a_frame_each() -> None:
    pages = [os.urandom(PAGE) for _ in range(8)]
    assert bench._enough_memory(pages, 100, "lz4") == (100 + 64) * PAGE


def test_report_shape_and_mixed_phase(anon_pages: list[bytes]) -> None:
    report = bench.run_bench(anon_pages, n=1200, repeat=2, corpus="t")
    d = report.as_dict()
    assert len(report.runs) == 2
    for op in ("put", "get", "put_many", "get_many"):
        assert d[op]["ratio"] > 0
    assert d["put"]["zcache_us_per_page"] == pytest.approx(1e6 / d["put"]["zcache_pages_per_s"])
    z = d["density"]["zcache"]
    assert z["ram_used"] == z["frames_used"] * PAGE + z["metadata_bytes_tracemalloc"]
    assert z["stored_pages"] <= 1200
    m = d["mixed"]
    assert m["frames_total"] < z["frames_used"]  # the budget is below the data
    assert m["evicted_eph_pageframes"] > 0
    assert m["pers_corrupt"] == 0 and m["eph_wrong_data"] == 0
    assert m["pers_stored"] + m["pers_failed"] == 400


def test_phase_sizes_match_progress(anon_pages: list[bytes]) -> None:
    seen: list[int] = []
    bench.run_bench(anon_pages, n=500, repeat=2, progress=lambda _p, k: seen.append(k))
    assert sum(seen) == bench.phase_sizes(500, 2, density=True, mixed=True)


def test_bad_compressor(anon_pages: list[bytes]) -> None:
    from tmem.errors import ConfigError

    with pytest.raises(ConfigError):
        bench.run_bench(anon_pages, n=10, compressor="gzip")
