"""Cleancache and Frontswap mapped onto a real Zcache (kernel-zcache2.md 2.1-2.4)."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tmem
from tmem.frontends import SWIZ_BITS, filekey_to_oid, swizzle, unswizzle

PAGE = 4096


def page(n: int) -> bytes:
    """A compressible page that is different for every n."""
    return (n.to_bytes(8, "little") + bytes(range(56))) * (PAGE // 64)


class FailingPuts:
    """A Zcache wrapper whose puts fail on demand (to drive failed-store paths)."""

    def __init__(self, zc: tmem.Zcache) -> None:
        self.zc = zc
        self.fail = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.zc, name)

    def put(self, pool: int, oid: tmem.Oid, index: int, data: bytes) -> bool:
        if self.fail:
            # A failed put must leave no old copy: flush it, as the engine does.
            self.zc.flush_page(pool, oid, index)
            return False
        return self.zc.put(pool, oid, index, data)


@pytest.fixture
def zc() -> tmem.Zcache:
    return tmem.Zcache(memory="2MiB")


# ---- frontswap ---------------------------------------------------------------------


def test_swizzle_matches_kernel_layout() -> None:
    oid, index = swizzle(3, 0x12345)
    assert oid == ((3 << 8) | 0x45, 0, 0)
    assert index == 0x123
    assert SWIZ_BITS == 8
    for t, off in [(0, 0), (1, 255), (1, 256), (31, (1 << 32) - 1), (7, 123456789)]:
        assert unswizzle(*swizzle(t, off)) == (t, off)


def test_store_load_exclusive(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    fs.init(0)
    assert fs.store(0, 5, page(5))
    assert fs.curr_pages() == 1
    assert fs.load(0, 5) == page(5)
    # exclusive: the page left tmem and the bit is clear
    assert fs.curr_pages() == 0
    assert fs.load(0, 5) is None
    assert zc.get(fs.pool, *swizzle(0, 5)) is None  # type: ignore[arg-type]
    s = fs.stats()
    assert (s["frontswap_loads"], s["frontswap_succ_stores"]) == (1, 1)


def test_non_exclusive_load_keeps_page(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc, exclusive_gets=False)
    fs.init(1)
    assert fs.store(1, 300, page(300))
    for _ in range(3):
        assert fs.load(1, 300) == page(300)
    assert fs.curr_pages() == 1
    assert fs.stats()["frontswap_loads"] == 3


def test_dup_store_counts_once_and_replaces(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc, exclusive_gets=False)
    fs.init(0)
    assert fs.store(0, 9, page(1))
    assert fs.store(0, 9, page(2))
    assert fs.curr_pages() == 1
    assert fs.load(0, 9) == page(2)
    assert fs.stats()["frontswap_succ_stores"] == 2


def test_failed_dup_store_invalidates_old_copy(zc: tmem.Zcache) -> None:
    wrapped = FailingPuts(zc)
    fs = tmem.Frontswap(wrapped, exclusive_gets=False)  # type: ignore[arg-type]
    fs.init(0)
    assert fs.store(0, 4, page(1))
    wrapped.fail = True
    assert not fs.store(0, 4, page(2))
    assert fs.curr_pages() == 0
    assert fs.load(0, 4) is None  # never the stale page(1)
    assert zc.get(fs.pool, *swizzle(0, 4)) is None  # type: ignore[arg-type]
    s = fs.stats()
    assert (s["frontswap_failed_stores"], s["frontswap_succ_stores"]) == (1, 1)


def test_failed_store_of_incompressible_page(zc: tmem.Zcache) -> None:
    import os

    fs = tmem.Frontswap(zc)
    fs.init(0)
    assert fs.store(0, 1, page(1))
    assert not fs.store(0, 1, os.urandom(PAGE))  # rejected: compresses poorly
    assert fs.curr_pages() == 0
    assert fs.load(0, 1) is None
    assert fs.stats()["frontswap_failed_stores"] == 1


def test_load_without_bit_does_not_ask_backend(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    fs.init(0)
    # Put a page behind frontswap's back: the bitmap says "on disk", so load misses.
    assert zc.put(fs.pool, *swizzle(0, 7), page(7))  # type: ignore[arg-type]
    assert fs.load(0, 7) is None
    assert fs.stats()["frontswap_loads"] == 0


def test_invalidate_page_and_area(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc, exclusive_gets=False)
    fs.init(0)
    fs.init(1)
    for off in range(600):
        assert fs.store(0, off, page(off))
    assert fs.store(1, 3, page(3))
    fs.invalidate_page(0, 10)
    fs.invalidate_page(0, 10)  # bit already clear: not counted again
    assert fs.stats()["frontswap_invalidates"] == 1
    assert fs.load(0, 10) is None
    assert fs.curr_pages() == 600
    fs.invalidate_area(0)
    assert fs.curr_pages() == 1
    assert all(fs.load(0, off) is None for off in range(600))
    for low in range(256):
        assert zc.flush_object(fs.pool, (low, 0, 0)) == 0  # type: ignore[arg-type]
    assert fs.load(1, 3) == page(3)


def test_one_persistent_pool_for_all_types(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    fs.init(0)
    pool = fs.pool
    fs.init(5)
    assert fs.pool == pool
    assert pool is not None and zc.is_persistent(pool)


def test_reinit_drops_old_pages(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc, exclusive_gets=False)
    fs.init(2)
    fs.store(2, 1, page(1))
    fs.init(2)  # swapon again: a fresh device has nothing in frontswap
    assert fs.curr_pages() == 0
    assert zc.get(fs.pool, *swizzle(2, 1)) is None  # type: ignore[arg-type]


def test_errors(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    with pytest.raises(tmem.TmemError):
        fs.store(0, 0, page(0))  # type not initialised
    fs.init(0, nr_pages=100)
    with pytest.raises(tmem.PageSizeError):
        fs.store(0, 0, b"short")
    with pytest.raises(tmem.InvalidHandleError):
        fs.store(0, -1, page(0))
    with pytest.raises(tmem.InvalidHandleError):
        fs.store(0, 100, page(0))  # beyond the device
    with pytest.raises(tmem.InvalidHandleError):
        fs.init(-1)
    assert fs.curr_pages() == 0


def test_offset_beyond_32_bits_is_skipped(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    fs.init(0)
    assert not fs.store(0, 1 << 32, page(1))
    assert fs.load(0, 1 << 32) is None
    assert fs.curr_pages() == 0
    assert fs.stats()["frontswap_failed_stores"] == 1


def test_shrink_pulls_pages_back(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(zc)
    fs.init(0)
    fs.init(1)
    for off in range(0, 40, 2):
        fs.store(0, off, page(off))
        fs.store(1, off, page(1000 + off))
    back = fs.shrink(15)
    assert len(back) == 25
    assert fs.curr_pages() == 15
    for t, off, data in back:
        assert data == (page(off) if t == 0 else page(1000 + off))
        assert fs.load(t, off) is None
    assert fs.shrink(100) == []


def test_bitmap_is_compact(zc: tmem.Zcache) -> None:
    fs = tmem.Frontswap(tmem.Zcache(memory="64KiB"))
    fs.init(0)
    bitmap = fs._maps[0]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for off in range(0, 1_000_000, 97):
        bitmap.set(off)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 400_000  # ~125 KB of bits for 10**6 slots, not 60 B per page
    assert bitmap.test(97 * 5) and not bitmap.test(98)
    assert list(bitmap.offsets())[:3] == [0, 97, 194]


# ---- cleancache --------------------------------------------------------------------


def test_cleancache_put_get_exclusive(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    pool = cc.init_fs(4096)
    assert pool >= 0 and not zc.is_persistent(pool)
    cc.put_page(pool, 42, 0, page(0))
    assert cc.get_page(pool, 42, 0) == page(0)
    assert cc.get_page(pool, 42, 0) is None  # exclusive
    assert cc.stats() == {
        "cleancache_succ_gets": 1,
        "cleancache_failed_gets": 1,
        "cleancache_puts": 1,
        "cleancache_invalidates": 0,
    }


def test_cleancache_file_handle_keys(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    pool = cc.init_fs()
    fh = bytes(range(1, 25))
    assert filekey_to_oid(fh) == (
        int.from_bytes(fh[:8], "little"),
        int.from_bytes(fh[8:16], "little"),
        int.from_bytes(fh[16:], "little"),
    )
    assert filekey_to_oid(b"\x07") == (7, 0, 0) == filekey_to_oid(7)
    cc.put_page(pool, fh, 3, page(3))
    assert cc.get_page(pool, fh[:-1], 3) is None
    assert cc.get_page(pool, fh, 3) == page(3)
    with pytest.raises(tmem.InvalidHandleError):
        cc.put_page(pool, bytes(25), 0, page(0))
    with pytest.raises(tmem.InvalidHandleError):
        cc.put_page(pool, -1, 0, page(0))


def test_cleancache_invalidate(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    pool = cc.init_fs()
    for i in range(4):
        cc.put_page(pool, 1, i, page(i))
        cc.put_page(pool, 2, i, page(10 + i))
    cc.invalidate_page(pool, 1, 0)
    assert cc.get_page(pool, 1, 0) is None
    cc.invalidate_inode(pool, 1)
    assert all(cc.get_page(pool, 1, i) is None for i in range(4))
    assert cc.get_page(pool, 2, 1) == page(11)
    cc.invalidate_fs(pool)
    assert not zc.has_pool(pool)
    assert cc.stats()["cleancache_invalidates"] == 1


def test_cleancache_dup_put_replaces(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    pool = cc.init_fs()
    cc.put_page(pool, 5, 5, page(1))
    cc.put_page(pool, 5, 5, page(2))
    assert cc.get_page(pool, 5, 5) == page(2)


def test_cleancache_index_beyond_32_bits_skipped(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    pool = cc.init_fs()
    cc.put_page(pool, 5, 1 << 32, page(1))
    assert cc.get_page(pool, 5, 1 << 32) is None
    assert cc.get_page(pool, 5, 0) is None  # did not wrap around to index 0
    cc.invalidate_page(pool, 5, 1 << 32)  # no error
    s = cc.stats()
    assert (s["cleancache_puts"], s["cleancache_failed_gets"]) == (1, 2)


def test_cleancache_wrong_pagesize(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    with pytest.raises(tmem.PageSizeError):
        cc.init_fs(8192)
    with pytest.raises(tmem.PageSizeError):
        cc.init_shared_fs(bytes(16), 2048)


def test_cleancache_negative_pool_is_off(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    cc.put_page(-1, 1, 0, page(0))
    assert cc.get_page(-1, 1, 0) is None
    assert cc.stats()["cleancache_puts"] == 0


def test_cleancache_pool_exhaustion_returns_minus_one(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    ids = [cc.init_fs() for _ in range(16)]
    assert len(set(ids)) == 16 and min(ids) >= 0  # 16 distinct pools
    assert cc.init_fs() == -1


def test_shared_fs_same_uuid_same_pool(zc: tmem.Zcache) -> None:
    cc = tmem.Cleancache(zc)
    uuid = b"0123456789abcdef"
    a = cc.init_shared_fs(uuid, 4096)
    b = cc.init_shared_fs(uuid, 4096)
    c = cc.init_shared_fs(b"fedcba9876543210")
    assert a == b != c
    cc.put_page(a, 9, 0, page(9))
    assert cc.get_page(b, 9, 0) == page(9)
    # a second client of the same Zcache naming the uuid shares the pool too
    other = tmem.Cleancache(zc)
    assert other.init_shared_fs(uuid) == a
    cc.invalidate_fs(a)  # one mount left: still there
    cc.put_page(b, 9, 1, page(1))
    assert cc.get_page(b, 9, 1) == page(1)
    with pytest.raises(tmem.InvalidHandleError):
        cc.init_shared_fs(b"short")


def test_stats_merge_into_zcache_stats(zc: tmem.Zcache) -> None:
    from tmem.frontends import merged_stats

    cc, fs = tmem.Cleancache(zc), tmem.Frontswap(zc)
    merged = merged_stats(zc, cc, fs)
    assert set(cc.stats()) <= set(merged) and set(fs.stats()) <= set(merged)
    assert not set(cc.stats()) & set(zc.stats())
    assert not set(fs.stats()) & set(zc.stats())


# ---- model-based ---------------------------------------------------------------------

_PAGES = [page(i) for i in range(6)] + [bytes(PAGE), b"\xaa" * PAGE]


@settings(max_examples=60, deadline=None)
@given(
    exclusive=st.booleans(),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["store", "load", "inval", "area"]),
            st.integers(0, 1),  # swap type
            st.sampled_from([0, 1, 255, 256, 257, 70000]),  # offsets across objects
            st.integers(0, len(_PAGES)),  # page choice; the last one is incompressible
        ),
        max_size=60,
    ),
)
def test_frontswap_matches_model(exclusive: bool, ops: list[tuple[str, int, int, int]]) -> None:
    """Frontswap over a real Zcache behaves like a dict of slots, exclusive or not."""
    fs = tmem.Frontswap(tmem.Zcache(memory="1MiB"), exclusive_gets=exclusive)
    fs.init(0)
    fs.init(1)
    noise = random.Random(len(ops)).randbytes(PAGE)
    model: dict[tuple[int, int], bytes] = {}
    for op, t, off, which in ops:
        data = _PAGES[which] if which < len(_PAGES) else noise
        if op == "store":
            ok = fs.store(t, off, data)
            assert ok == (which < len(_PAGES))
            if ok:
                model[(t, off)] = data
            else:
                model.pop((t, off), None)
        elif op == "load":
            assert fs.load(t, off) == model.get((t, off))
            if exclusive:
                model.pop((t, off), None)
        elif op == "inval":
            fs.invalidate_page(t, off)
            model.pop((t, off), None)
        else:
            fs.invalidate_area(t)
            model = {k: v for k, v in model.items() if k[0] != t}
        assert fs.curr_pages() == len(model)
    for (t, off), data in model.items():
        assert fs.load(t, off) == data
