"""zbud layout, best-fit placement, LRU order, eviction and zombies."""

from __future__ import annotations

import mmap

import pytest

from tmem.zbud import (
    EPH,
    HANDLE,
    HANDLE_SIZE,
    MAX_BUDDY_SIZE,
    PAGE_SIZE,
    PERS,
    Zbud,
    chunks,
)


def make(nframes: int = 8) -> Zbud:
    return Zbud(mmap.mmap(-1, nframes * PAGE_SIZE), nframes)  # type: ignore[arg-type]


def h(n: int) -> tuple[int, int, int, int, int, int]:
    return (n, 0, 0, n, 1, 0xFFFF)


def test_constants_match_the_kernel() -> None:
    assert HANDLE_SIZE == 32
    assert MAX_BUDDY_SIZE == 4000
    assert chunks(32 + 1) == 1
    assert chunks(4032) == 63


def test_buddy_layout_first_left_second_right() -> None:
    zb = make()
    a = zb.create(EPH, 0, h(1), b"A" * 1000)
    b = zb.match(EPH, h(2), b"B" * 2000)
    assert a == 0 and b == 1  # frame 0, buddies 0 and 1
    start, end = zb.span(a)
    assert (start, end) == (HANDLE_SIZE, HANDLE_SIZE + 1000)
    start, end = zb.span(b)
    assert PAGE_SIZE - 64 < end <= PAGE_SIZE  # right-justified: ends in the last chunk
    assert bytes(zb.arena[start:end]) == b"B" * 2000
    # the tmem handle sits in front of each buddy, inside the frame
    assert HANDLE.unpack_from(zb.arena, 0) == h(1)
    assert HANDLE.unpack_from(zb.arena, start - HANDLE_SIZE) == h(2)
    assert [hd for _p, hd in zb.handles(0)] == [h(1), h(2)]


def test_two_buddies_that_do_not_fit_take_two_frames() -> None:
    zb = make()
    zb.create(EPH, 0, h(1), b"A" * 2100)
    assert zb.match(EPH, h(2), b"B" * 2100) == -1


def test_best_fit_prefers_the_fullest_frame_with_room() -> None:
    zb = make()
    zb.create(PERS, 0, h(1), b"a" * 500)  # 9 chunks used
    zb.create(PERS, 1, h(2), b"b" * 2500)  # 41 chunks used
    zb.create(PERS, 2, h(3), b"c" * 3000)  # 48 chunks used
    # 1000 bytes + handle = 17 chunks: fits frames 0 (9) and 1 (41), not 2 (48)
    assert zb.match(PERS, h(4), b"d" * 1000) >> 1 == 1
    assert zb.match(PERS, h(5), b"e" * 1000) >> 1 == 0


def test_classes_never_share_frames() -> None:
    zb = make()
    zb.create(EPH, 0, h(1), b"a" * 100)
    assert zb.match(PERS, h(2), b"b" * 100) == -1


def test_free_returns_frame_when_empty_and_reopens_room() -> None:
    zb = make()
    a = zb.create(EPH, 0, h(1), b"a" * 1000)
    b = zb.match(EPH, h(2), b"b" * 1000)
    assert zb.counters[EPH].buddied_count == 1
    assert zb.free(a) == -1
    assert zb.counters[EPH].unbuddied_count == 1
    c = zb.match(EPH, h(3), b"c" * 2000)  # the freed half is usable again
    assert c >> 1 == 0
    assert zb.free(b) == -1
    assert zb.free(c) == 0
    assert zb.counters[EPH].pageframes == 0
    assert zb.counters[EPH].zpages == 0
    assert zb.counters[EPH].zbytes == 0


def test_lru_moves_frame_on_add_not_on_remove() -> None:
    zb = make()
    zb.create(EPH, 0, h(1), b"a" * 1000)
    zb.create(EPH, 1, h(2), b"b" * 3000)
    zb.create(EPH, 2, h(3), b"c" * 3000)
    assert zb.lru_frames(EPH) == [0, 1, 2]
    zb.match(EPH, h(4), b"d" * 1000)  # lands in frame 0 -> MRU
    assert zb.lru_frames(EPH) == [1, 2, 0]
    zb.free(0 << 1 | 1)
    assert zb.lru_frames(EPH) == [1, 2, 0]


def test_evict_lru_returns_frame_and_handles() -> None:
    zb = make()
    zb.create(EPH, 3, h(1), b"a" * 1000)
    zb.match(EPH, h(2), b"b" * 1000)
    zb.create(EPH, 4, h(3), b"c" * 3000)
    frame, found = zb.evict_lru(EPH)
    assert frame == 3
    assert [hd for _p, hd in found] == [h(1), h(2)]
    assert zb.counters[EPH].pageframes == 1
    assert zb.counters[EPH].evicted_pageframes == 1
    assert zb.lru_frames(EPH) == [4]
    assert zb.evict_lru(PERS) == (-1, [])


def test_zombie_frames_keep_data_and_take_no_new_buddies() -> None:
    zb = make()
    a = zb.create(PERS, 0, h(1), b"a" * 1000)
    frame, found = zb.zombify_lru(PERS)
    assert frame == 0 and [p for p, _ in found] == [a]
    assert zb.is_zombie(0)
    start, end = zb.span(a)
    assert bytes(zb.arena[start:end]) == b"a" * 1000
    assert zb.match(PERS, h(2), b"b" * 100) == -1  # not on the unbuddied lists
    assert zb.counters[PERS].zombie_count == 1
    assert zb.free(a) == 0  # the last page gone: frame handed back
    assert zb.counters[PERS].zombie_count == 0
    assert zb.counters[PERS].pageframes == 0


def test_unzombify_returns_frame_to_service() -> None:
    zb = make()
    zb.create(PERS, 0, h(1), b"a" * 1000)
    zb.zombify_lru(PERS)
    zb.unzombify(0)
    assert not zb.is_zombie(0)
    assert zb.lru_frames(PERS) == [0]
    assert zb.match(PERS, h(2), b"b" * 100) >> 1 == 0


def test_huge_page_fills_a_frame() -> None:
    zb = make()
    page = bytes(range(256)) * 16
    p = zb.create_huge(PERS, 5, h(9), page)
    assert zb.span(p) == (5 * PAGE_SIZE, 6 * PAGE_SIZE)
    assert zb.handles(5) == [(p, h(9))]
    assert zb.match(PERS, h(1), b"x" * 10) == -1
    assert zb.free(p) == 5


@pytest.mark.parametrize("cycles", [3000])
def test_stale_entries_are_compacted(cycles: int) -> None:
    zb = make(4)
    for n in range(cycles):
        a = zb.create(EPH, 0, h(n), b"a" * 700)
        b = zb.match(EPH, h(n), b"b" * 700)
        zb.free(b)
        zb.free(a)
    assert len(zb.lru[EPH]) < 2100
    assert sum(len(s) for s in zb.unbuddied[EPH]) < 2100
    assert zb.counters[EPH].pageframes == 0
