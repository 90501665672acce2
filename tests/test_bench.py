"""The bench library: keys, budget sizing, phases, report shape (small and fast)."""

from __future__ import annotations

import os
import statistics

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
    # the budget filled: what is stored fits in it (same-filled pages take no room),
    # and the rest was refused for lack of room
    zs = report.zcache_stats
    assert zs["compr_data_size"] <= 256 * 1024 and zs["frames_used"] <= 64
    assert d["rejects_no_memory"] >= 100
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
    for op in ("put", "get"):
        # the median of the runs' own ratios, each over the same pages on both sides
        per_run = [getattr(r, f"zc_{op}") / getattr(r, f"dict_{op}") for r in report.runs]
        assert d[op]["ratio"] == pytest.approx(statistics.median(per_run))
    # put_many/get_many are loops over put/get: no row that times the same work again
    assert "put_many" not in d and "get_many" not in d
    assert d["put"]["zcache_us_per_page"] == pytest.approx(1e6 / d["put"]["zcache_pages_per_s"])
    z = d["density"]["zcache"]
    assert z["ram_used"] == z["frames_used"] * PAGE + z["metadata_bytes_tracemalloc"]
    assert z["stored_pages"] + z["refused_pages"] == 1200
    m = d["mixed"]
    assert m["frames_total"] < z["frames_used"]  # the budget is below the data
    # every ephemeral frame evicted was taken by one of the two ouroboros paths
    assert m["evicted_eph_pageframes"] == m["eph_ate_tail"] + m["pers_ate_eph"] > 0
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
    with pytest.raises(ConfigError, match="unknown allocator 'slab'"):
        bench.run_bench(anon_pages, n=10, allocator="slab")


def _compressible(pages: list[bytes], count: int) -> list[bytes]:
    """``count`` distinct pages that compress to well under half a page."""
    import lz4.block

    out = [p for p in dict.fromkeys(pages) if len(lz4.block.compress(p, store_size=False)) < 1500]
    assert len(out) >= count, "the corpus has too few compressible pages"
    return out[:count]


def test_refused_page_is_counted_against_zcache(anon_pages: list[bytes]) -> None:
    """An incompressible page zcache refuses stays in the page set: density divides the
    original bytes of ALL offered pages by what each side holds, and zcache holds the
    refused page raw (4096 B) on top of its frames and metadata."""
    noise = os.urandom(PAGE)
    pages = [*_compressible(anon_pages, 30), noise]
    n = len(pages) * 8  # every 31st item is the random page: 8 of them
    report = bench.run_bench(pages, n=n, repeat=1, mixed=False)
    d = report.as_dict()
    z, naive = d["density"]["zcache"], d["density"]["dict"]
    assert z["offered_pages"] == naive["offered_pages"] == n
    assert z["offered_bytes"] == naive["offered_bytes"] == n * PAGE
    assert d["rejects"] == d["rejects_poor_compression"] == 8
    assert z["refused_pages"] == 8 and z["stored_pages"] == n - 8
    assert naive["refused_pages"] == 0 and naive["stored_pages"] == n
    assert z["refused_raw_bytes"] >= 8 * PAGE
    assert z["held_bytes"] == z["ram_used"] + z["refused_raw_bytes"]
    assert z["density"] == pytest.approx(n * PAGE / z["held_bytes"])
    assert naive["density"] == pytest.approx(n * PAGE / naive["held_bytes"])
    # the refused pages make zcache's density lower than its stored pages alone would
    assert z["density"] < z["density_zcache_only"]
    assert "ALL offered pages" in d["density"]["definition"]
    # read-back through zcache + its fallback returned every page, the random ones too
    assert d["verified"]


def test_verify_needs_the_refused_page_from_the_fallback() -> None:
    """The read-back check fails when a refused page is not served by the fallback."""
    from tmem.zcache import Zcache

    zc = Zcache(memory=64 * PAGE)
    pool = zc.new_pool(persistent=True)
    noise = os.urandom(PAGE)
    items = [((1, 0, 0), 0, bytes(100) + b"x" * (PAGE - 100)), ((1, 0, 0), 1, noise)]
    fails = [0]
    fallback: dict[tuple[tuple[int, int, int], int], bytes] = {}
    bench._zc_put(zc, pool, items, fails, fallback)
    assert fails == [1] and fallback == {((1, 0, 0), 1): noise}
    last = {(o, i): p for o, i, p in items}
    assert bench._verify(zc, pool, last, 1, fallback)
    assert not bench._verify(zc, pool, last, 1, {})
    assert not bench._verify(zc, pool, last, 1, {((1, 0, 0), 1): bytes(PAGE)})
