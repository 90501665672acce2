"""Zcache.check_frames: the accounting the stateful test relies on must catch a broken
store. Each test builds a real, consistent Zcache, breaks one structure through its
internals (only here), and expects the check to name the fault. Run on every
allocator."""

from __future__ import annotations

import pytest

from tmem import Zcache
from tmem.pagetable import L_EPH, L_PERS, L_STAGED
from tmem.zbud import EPH, PERS

PAGE = 4096
FRAMES = 64
ALLOCATORS = ["zsmalloc", "zbud"]


def filled(anon_pages: list[bytes], allocator: str, *, behind: bool = False) -> tuple[Zcache, int]:
    """A Zcache with free frames, pages of both classes, and (with ``behind``) staged
    pages."""
    zc = Zcache(memory=FRAMES * PAGE, compress_behind=behind, allocator=allocator)
    zc.stage_reserve = FRAMES // 4
    eph = zc.new_pool()
    pers = zc.new_pool(persistent=True)
    for i in range(12):
        zc.put(pers, (1, 0, 0), i, anon_pages[i])
        zc.put(eph, (2, 0, 0), i, anon_pages[100 + i])
    assert zc.frames_free > 0
    return zc, pers


def some_handle(zc: Zcache, pool: int) -> tuple[int, int]:
    """(index, handle) of a page of object (1, 0, 0) the allocator holds."""
    obj = zc.tmem.pool(pool).objects[(1, 0, 0)]
    return next((i, p) for i, p in obj.items() if isinstance(p, int) and p >= 0)


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("behind", [False, True], ids=["at-put", "compress-behind"])
def test_a_consistent_store_passes(anon_pages: list[bytes], allocator: str, behind: bool) -> None:
    zc, _ = filled(anon_pages, allocator, behind=behind)
    assert zc.check_frames() == []
    owners = zc.frame_owners()
    held = zc.allocator.frames_held()
    assert all(len(o) <= 1 for o in owners)
    assert len(held) == zc.frames_used == sum(1 for o in owners if o and o != ["free"])
    assert (zc.staged_pages > 0) == behind
    assert zc.pages.count[L_EPH] > 0 and zc.pages.count[L_PERS] + zc.staged_pages > 0


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_a_frame_both_free_and_used(anon_pages: list[bytes], allocator: str) -> None:
    zc, _ = filled(anon_pages, allocator)
    frame = max(zc.allocator.frames_held())
    zc.arena.give(frame, 1)  # the arena thinks it free; the allocator still uses it
    problems = zc.check_frames()
    assert any(p.startswith(f"frame {frame}: held 2 times: free, ") for p in problems)


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_a_leaked_frame(anon_pages: list[bytes], allocator: str) -> None:
    zc, _ = filled(anon_pages, allocator)
    used = zc.frames_used
    assert zc.arena.take(1) >= 0  # taken from the arena, given to nobody
    problems = zc.check_frames()
    assert f"arena counts {used + 1} frames used, the allocator holds {used}" in problems


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_a_page_no_tmem_entry_maps(anon_pages: list[bytes], allocator: str) -> None:
    zc, pers = filled(anon_pages, allocator)
    index, handle = some_handle(zc, pers)
    zc.tmem.pool(pers).objects[(1, 0, 0)].pop(index)  # stored, unreachable: never freed
    assert zc.check_frames() == [f"handle {handle}: live, but no tmem entry maps it"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_an_entry_to_a_handle_not_live(anon_pages: list[bytes], allocator: str) -> None:
    zc, pers = filled(anon_pages, allocator)
    dead = zc.pages.cap - 1
    zc.tmem.pool(pers).objects[(1, 0, 0)].set(99, dead)
    problems = zc.check_frames()
    assert problems == [f"{((1, 0, 0), 99)} maps to handle {dead}, which is not live"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_two_entries_on_one_handle(anon_pages: list[bytes], allocator: str) -> None:
    zc, pers = filled(anon_pages, allocator)
    _, handle = some_handle(zc, pers)
    zc.tmem.pool(pers).objects[(1, 0, 0)].set(99, handle)
    problems = zc.check_frames()
    assert any(p.startswith(f"handle {handle}: mapped by ") for p in problems)


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_columns_that_name_another_entry(anon_pages: list[bytes], allocator: str) -> None:
    zc, pers = filled(anon_pages, allocator)
    _, handle = some_handle(zc, pers)
    zc.pages.idx[handle] += 1000  # reclaim would drop the wrong entry
    problems = zc.check_frames()
    assert len(problems) == 1 and problems[0].startswith(f"handle {handle}: its columns")


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_a_page_lost_from_its_lru(anon_pages: list[bytes], allocator: str) -> None:
    zc, _ = filled(anon_pages, allocator)
    handle = zc.pages.head[L_EPH]
    zc.pages.unlink(handle, L_EPH)  # reclaim would never evict it
    assert zc.check_frames() == [f"handle {handle}: on list None, not {L_EPH}"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_detects_a_staged_page_missing_from_its_list(
    anon_pages: list[bytes], allocator: str
) -> None:
    zc, _ = filled(anon_pages, allocator, behind=True)
    handle = zc.pages.head[L_STAGED]
    zc.pages.unlink(handle, L_STAGED)  # compact() would never reach it
    assert zc.check_frames() == [f"handle {handle}: on list None, not {L_STAGED}"]


def test_detects_an_unbuddied_frame_lost_from_its_stack(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages, "zbud")
    frame = next(f for f, kind in zc.allocator.frames_held().items() if kind == "unbuddied")
    zc.allocator.where[frame] = 0  # its stack entry reads as stale: best fit never finds it
    problems = zc.check_frames()
    assert len(problems) == 1 and problems[0].startswith(f"zbud: frame {frame}: unbuddied, but")


def test_detects_a_live_frame_lost_from_the_zbud_lru(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages, "zbud")
    frame = zc.allocator.lru_frames(EPH)[0]
    zc.allocator.stamp[frame] = 0  # reclaim would never evict it
    problems = zc.check_frames()
    assert problems == [f"zbud: frame {frame}: live, but not on the LRU of class {EPH}"]


def test_detects_a_held_frame_that_holds_nothing(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages, "zbud")
    frame = zc.arena.take(1)
    zc.allocator.flags[frame] = 1  # F_USED, with no zbud in it
    zc.allocator.cls[frame] = PERS
    problems = zc.check_frames()
    assert f"zbud: frame {frame}: held, but holds no zbud" in problems
