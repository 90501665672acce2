"""The public Zcache API as users call it: puts, gets, flushes, pools, errors."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

import tmem
from tmem import PutResult, Zcache

PAGE = 4096


def incompressible(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE)


def test_put_get_roundtrip_persistent(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="4MiB")
    pool = zc.new_pool(persistent=True)
    stored = {i: p for i, p in enumerate(anon_pages[:300]) if zc.put(pool, (1, 2, 3), i, p)}
    assert len(stored) > 200  # only poorly compressible pages are refused
    for i, page in stored.items():
        assert zc.get(pool, (1, 2, 3), i) == page
        assert zc.get(pool, (1, 2, 3), i) == page  # persistent gets keep the page
    assert zc.get(pool, (1, 2, 3), 10_000) is None


def test_ephemeral_get_is_exclusive(file_pages: list[bytes]) -> None:
    zc = Zcache(memory="1MiB")
    pool = zc.new_pool()
    page = next(p for p in file_pages if zc.put(pool, (9, 0, 0), 1, p))
    assert zc.get(pool, (9, 0, 0), 1) == page
    assert zc.get(pool, (9, 0, 0), 1) is None
    assert zc.stats()["eph_zpages"] == 0


def test_persistent_get_with_free_removes(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="1MiB")
    pool = zc.new_pool(persistent=True)
    assert zc.put(pool, (0, 0, 1), 5, anon_pages[0])
    assert zc.get(pool, (0, 0, 1), 5, free=True) == anon_pages[0]
    assert zc.get(pool, (0, 0, 1), 5) is None
    assert zc.frames_used == 0


def test_duplicate_put_replaces_and_frees_old(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="1MiB")
    pool = zc.new_pool(persistent=True)
    assert zc.put(pool, (1, 1, 1), 0, anon_pages[0])
    assert zc.put(pool, (1, 1, 1), 0, anon_pages[1])
    assert zc.get(pool, (1, 1, 1), 0) == anon_pages[1]
    assert zc.stats()["pers_zpages"] == 1


def test_failed_put_leaves_no_stale_copy(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="1MiB")
    pool = zc.new_pool(persistent=True)
    assert zc.put(pool, (1, 1, 1), 0, anon_pages[0])
    assert zc.put_status(pool, (1, 1, 1), 0, incompressible(1)) is PutResult.POOR_COMPRESSION
    assert zc.get(pool, (1, 1, 1), 0) is None
    assert zc.stats()["compress_poor"] == 1


def half_random(seed: int) -> bytes:
    """2100 random bytes then zeros: compresses to a little over 2100 bytes, so two such
    pages never share one 4096-byte frame (and none is rejected as incompressible)."""
    return random.Random(seed).randbytes(2100) + bytes(PAGE - 2100)


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud"])
def test_failed_put_for_lack_of_memory_leaves_no_stale_copy(allocator: str) -> None:
    zc = Zcache(memory=8 * PAGE, allocator=allocator)
    pool = zc.new_pool(persistent=True)
    n = 0
    while zc.put(pool, (0, 0, 0), n, half_random(n)):  # fill the budget
        n += 1
    assert n >= 2 and zc.last_refusal is PutResult.NO_MEMORY
    # a new version of page 0 of the same size finds no room either (no ephemeral pages,
    # no writeback target) while the old version still holds its place...
    assert zc.put_status(pool, (0, 0, 0), 0, half_random(1000)) is PutResult.NO_MEMORY
    # ...so the put fails, and the old version must not be returned any more
    assert zc.get(pool, (0, 0, 0), 0) is None
    for i in range(1, n):
        assert zc.get(pool, (0, 0, 0), i) == half_random(i)
    assert zc.stats()["failed_pers_puts"] == 2
    assert zc.flush_page(pool, (0, 0, 0), 1)
    assert zc.put(pool, (0, 0, 0), 0, half_random(1000))  # room again
    assert zc.check_frames() == []


def test_zero_and_same_filled_pages_use_no_frame() -> None:
    zc = Zcache(memory="1MiB")
    pool = zc.new_pool(persistent=True)
    zero = bytes(PAGE)
    pattern = b"\x01\x02\x03\x04\x05\x06\x07\x08" * (PAGE // 8)
    assert zc.put(pool, (0, 0, 0), 0, zero)
    assert zc.put(pool, (0, 0, 0), 1, pattern)
    assert zc.frames_used == 0
    assert zc.get(pool, (0, 0, 0), 0) == zero
    assert zc.get(pool, (0, 0, 0), 1) == pattern
    stats = zc.stats()
    assert stats["zero_filled_pages"] == 1
    assert stats["same_filled_pages"] == 2
    assert zc.flush_page(pool, (0, 0, 0), 0)
    assert zc.stats()["zero_filled_pages"] == 0


@pytest.mark.parametrize("behind", [False, True], ids=["at-put", "compress-behind"])
def test_same_filled_pages_in_any_buffer_type_use_no_frame(behind: bool) -> None:
    zc = Zcache(memory="1MiB", compress_behind=behind)
    pool = zc.new_pool(persistent=True)
    pattern = b"\x01\x02\x03\x04\x05\x06\x07\x08" * (PAGE // 8)
    pages = [
        memoryview(pattern),
        bytearray(PAGE),
        bytearray(pattern),
        memoryview(bytearray(PAGE)),
    ]
    for i, page in enumerate(pages):
        assert zc.put(pool, (0, 0, 0), i, page)
    zc.compact(100)
    assert zc.frames_used == 0 and zc.stats()["same_filled_pages"] == 4
    assert [zc.get(pool, (0, 0, 0), i) for i in range(4)] == [pattern, bytes(PAGE)] * 2


@pytest.mark.parametrize("name", ["lz4", "lzo", "zstd", "zstd-3"])
def test_each_compressor_roundtrips(name: str, anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="2MiB", compressor=name)
    pool = zc.new_pool(persistent=True)
    stored = [i for i in range(64) if zc.put(pool, (0, 0, 7), i, anon_pages[i])]
    assert len(stored) > 40
    for i in stored:
        assert zc.get(pool, (0, 0, 7), i) == anon_pages[i]


def test_flush_object_and_destroy_pool(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="2MiB")
    pool = zc.new_pool(persistent=True)
    for i in range(20):
        zc.put(pool, (5, 0, 0), i, anon_pages[i])
        zc.put(pool, (6, 0, 0), i, anon_pages[i])
    n5 = zc.pool_pages(pool) // 2
    assert zc.flush_object(pool, (5, 0, 0)) == n5
    assert zc.flush_object(pool, (5, 0, 0)) == 0
    assert zc.get(pool, (5, 0, 0), 1) is None
    remaining = zc.pool_pages(pool)
    assert zc.destroy_pool(pool) == remaining
    assert zc.frames_used == 0
    with pytest.raises(tmem.UnknownPoolError):
        zc.get(pool, (6, 0, 0), 1)


def test_shared_pools_by_uuid(file_pages: list[bytes]) -> None:
    zc = Zcache(memory="1MiB")
    uuid = bytes(range(16))
    a = zc.new_pool(shared=True, uuid=uuid)
    b = zc.new_pool(shared=True, uuid=uuid)
    c = zc.new_pool(shared=True, uuid=bytes(16))
    assert a == b != c
    assert zc.put(a, (1, 0, 0), 0, file_pages[3])
    assert zc.get(b, (1, 0, 0), 0) == file_pages[3]
    zc.destroy_pool(a)  # one user left: still there
    assert zc.has_pool(b)
    zc.destroy_pool(b)
    assert not zc.has_pool(b)


def test_pool_limit() -> None:
    zc = Zcache(memory="64KiB")
    ids = [zc.new_pool() for _ in range(16)]
    assert ids == list(range(16))
    with pytest.raises(tmem.PoolLimitError):
        zc.new_pool()
    zc.destroy_pool(3)
    assert zc.new_pool(persistent=True) == 3


@pytest.mark.parametrize(
    ("oid", "index"),
    [
        ((1, 2), 0),
        ((1, 2, 3, 4), 0),
        ((-1, 0, 0), 0),
        ((1 << 64, 0, 0), 0),
        (("a", 0, 0), 0),
        ([1, 2, 3], 0),
        ((1, 2, 3), -1),
        ((1, 2, 3), 1 << 32),
        ((1, 2, 3), 1.5),
        (((1 << 64) - 1,) * 3, 0),
    ],
)
def test_bad_handles_raise_and_change_nothing(oid: object, index: object) -> None:
    zc = Zcache(memory="64KiB")
    pool = zc.new_pool(persistent=True)
    assert zc.put(pool, (1, 2, 3), 0, b"a" * PAGE)
    before = zc.stats()
    for call in (
        lambda: zc.put(pool, oid, index, b"b" * PAGE),  # type: ignore[arg-type]
        lambda: zc.get(pool, oid, index),  # type: ignore[arg-type]
        lambda: zc.flush_page(pool, oid, index),  # type: ignore[arg-type]
    ):
        with pytest.raises(tmem.InvalidHandleError):
            call()
    assert zc.get(pool, (1, 2, 3), 0) == b"a" * PAGE
    after = zc.stats()
    assert after["pers_zpages"] == before["pers_zpages"]


@pytest.mark.parametrize(
    "page",
    [b"", b"x" * 4095, b"x" * 4097, "x" * 4096, None, 7],
    ids=["empty", "short", "long", "str", "none", "int"],
)
def test_wrong_page_size_raises(page: object) -> None:
    zc = Zcache(memory="64KiB")
    pool = zc.new_pool(persistent=True)
    with pytest.raises(tmem.PageSizeError):
        zc.put(pool, (1, 2, 3), 0, page)  # type: ignore[arg-type]
    assert zc.stats()["stored_pages"] == 0


def test_bytes_like_pages_accepted(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="64KiB")
    pool = zc.new_pool(persistent=True)
    assert zc.put(pool, (1, 2, 3), 0, bytearray(anon_pages[0]))
    assert zc.put(pool, (1, 2, 3), 1, memoryview(anon_pages[1]))
    assert zc.get(pool, (1, 2, 3), 0) == anon_pages[0]
    assert zc.get(pool, (1, 2, 3), 1) == anon_pages[1]


@pytest.mark.parametrize("pool_id", [-1, 16, 99, "0", None, 1.0])
def test_unknown_pool_raises(pool_id: object) -> None:
    zc = Zcache(memory="64KiB")
    zc.new_pool()
    zc.new_pool()
    for call in (
        lambda: zc.put(pool_id, (1, 2, 3), 0, b"x" * PAGE),  # type: ignore[arg-type]
        lambda: zc.get(pool_id, (1, 2, 3), 0),  # type: ignore[arg-type]
        lambda: zc.flush_page(pool_id, (1, 2, 3), 0),  # type: ignore[arg-type]
        lambda: zc.flush_object(pool_id, (1, 2, 3)),  # type: ignore[arg-type]
        lambda: zc.destroy_pool(pool_id),  # type: ignore[arg-type]
    ):
        with pytest.raises(tmem.UnknownPoolError):
            call()


@pytest.mark.parametrize("memory", ["0", "100", "lots", -5, "1 parsec"])
def test_bad_memory_budget(memory: object) -> None:
    with pytest.raises(tmem.ConfigError):
        Zcache(memory=memory)  # type: ignore[arg-type]


def test_unknown_compressor() -> None:
    with pytest.raises(tmem.ConfigError):
        Zcache(memory="1MiB", compressor="snappy")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("4096", 4096),
        ("1.5m", 1536 << 10),
        ("2 GB", 2 * 10**9),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert tmem.parse_size(text) == value
    assert Zcache(memory=text, prefault=False).frames_total == value // PAGE


def test_put_many_and_get_many(anon_pages: list[bytes]) -> None:
    zc = Zcache(memory="2MiB")
    pool = zc.new_pool(persistent=True)
    items = [((0, 0, i & 7), i >> 3, anon_pages[i]) for i in range(100)]
    results = zc.put_many(pool, items)
    pages = zc.get_many(pool, [(oid, index) for oid, index, _ in items])
    for ok, page, (_, _, original) in zip(results, pages, items, strict=True):
        assert page == (original if ok else None)


def test_ramster_free_paths_do_not_load_cluster_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tmem; zc = tmem.Zcache(memory='1MiB'); p = zc.new_pool(persistent=True);"
        "zc.put(p, (1,2,3), 0, b'x'*4096); zc.get(p, (1,2,3), 0); zc.stats();"
        "tmem.Frontswap(zc); tmem.Cleancache(zc);"
        "print(sorted(m for m in sys.modules if m.startswith('tmem.ramster') or m == 'tmem.nbd'))"
    )
    import os
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_stats_count_metadata_without_walking_pages(anon_pages: list[bytes]) -> None:
    """Stats come from counts and sizes (no walk over pages, so a /stats scrape of
    millions of pages does not stall clients): stats_steps has one step, equal to
    stats(), and the counts follow flushes at once."""
    zc = Zcache(memory="4MiB", huge_pages=True)  # incompressible pages kept raw too
    pool = zc.new_pool(persistent=True)
    for n in range(600):  # 600 objects of sparse pages, some same-filled
        page = anon_pages[n % len(anon_pages)] if n % 5 else bytes(PAGE)
        assert zc.put(pool, (n, 0, 0), 1000 + n, page)
    steps = list(zc.stats_steps(pages_per_step=100))
    assert steps == [zc.stats()]
    assert zc.stats()["metadata_bytes"] == zc.metadata_bytes()
    assert zc.stats()["obj_count"] == 600 and zc.stats()["stored_pages"] == 600
    for n in range(600):
        zc.flush_object(pool, (n, 0, 0))
    final = zc.stats()
    assert final["stored_pages"] == 0 and final["obj_count"] == 0


def test_run_in_steps_lets_other_tasks_run_between_steps() -> None:
    import asyncio

    from tmem.aio import run_in_steps

    ticks: list[int] = []

    def steps() -> Iterator[dict[str, int | float] | None]:
        for _ in range(10):
            yield None
        yield {"done": len(ticks)}

    async def main() -> dict[str, int | float]:
        async def ticker() -> None:
            while True:
                ticks.append(1)
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        result = await run_in_steps(steps())
        task.cancel()
        return result

    result = asyncio.run(main())
    assert result["done"] >= 10  # the ticker ran between the 10 steps
    with pytest.raises(ValueError, match="without a result"):
        asyncio.run(run_in_steps(iter([None, None])))
