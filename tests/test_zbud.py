"""zbud layout, best-fit placement, LRU order, eviction units and zombies (the seed's
allocator, behind the allocator interface)."""

from __future__ import annotations

from tmem.arena import Arena
from tmem.zbud import EPH, MAX_BUDDY_SIZE, PAGE_SIZE, PERS, Zbud, chunks


def make(nframes: int = 8) -> tuple[Arena, Zbud]:
    arena = Arena(nframes)
    return arena, Zbud(arena)


def put(zb: Zbud, cls: int, data: bytes) -> int:
    h = zb.alloc(len(data), cls)
    if h >= 0:
        start, end = zb.span(h)
        zb.arena[start:end] = data
    return h


def test_constants_match_the_kernel() -> None:
    assert MAX_BUDDY_SIZE == 63 * 64  # two buddies keep one chunk apart
    assert chunks(1) == 1 and chunks(65) == 2
    assert chunks(4032) == 63


def test_buddy_layout_first_left_second_right() -> None:
    _, zb = make()
    a = put(zb, EPH, b"A" * 1000)
    b = put(zb, EPH, b"B" * 2000)
    assert a >> 1 == b >> 1 and (a & 1, b & 1) == (0, 1)  # one frame, buddies 0 and 1
    frame = a >> 1
    assert zb.span(a) == (frame * PAGE_SIZE, frame * PAGE_SIZE + 1000)
    start, end = zb.span(b)
    assert (frame + 1) * PAGE_SIZE - 64 < end <= (frame + 1) * PAGE_SIZE  # right-justified
    assert bytes(zb.arena[start:end]) == b"B" * 2000
    assert zb.handles(frame) == [a, b]


def test_two_buddies_that_do_not_fit_take_two_frames() -> None:
    arena, zb = make()
    a = put(zb, EPH, b"A" * 2100)
    b = put(zb, EPH, b"B" * 2100)
    assert a >> 1 != b >> 1 and arena.frames_used == 2


def test_best_fit_prefers_the_fullest_frame_with_room() -> None:
    _, zb = make()
    f0 = put(zb, PERS, b"a" * 500) >> 1  # 8 chunks used
    filler0 = put(zb, PERS, b"x" * 3500)  # 55 chunks: pairs with it
    f1 = put(zb, PERS, b"b" * 2500) >> 1  # 40 chunks used
    filler1 = put(zb, PERS, b"y" * 1500)  # 24 chunks: pairs with it
    put(zb, PERS, b"c" * 3100)  # 49 chunks used, alone
    assert filler0 >> 1 == f0 and filler1 >> 1 == f1
    zb.free(filler0)
    zb.free(filler1)
    # 1000 bytes = 16 chunks: fits f0 (8) and f1 (40), not the third (49)
    assert put(zb, PERS, b"d" * 1000) >> 1 == f1
    assert put(zb, PERS, b"e" * 1000) >> 1 == f0


def test_classes_never_share_frames() -> None:
    arena, zb = make()
    a = put(zb, EPH, b"a" * 100)
    b = put(zb, PERS, b"b" * 100)
    assert a >> 1 != b >> 1 and arena.frames_used == 2


def test_free_returns_frame_when_empty_and_reopens_room() -> None:
    arena, zb = make()
    a = put(zb, EPH, b"a" * 1000)
    b = put(zb, EPH, b"b" * 1000)
    assert zb.counters[EPH].buddied_count == 1
    zb.free(a)
    assert zb.counters[EPH].unbuddied_count == 1 and arena.frames_used == 1
    c = put(zb, EPH, b"c" * 2000)  # the freed half is usable again
    assert c >> 1 == b >> 1
    zb.free(b)
    zb.free(c)
    assert arena.frames_used == 0  # the emptied frame went back to the arena
    assert (zb.counters[EPH].pageframes, zb.counters[EPH].zpages) == (0, 0)
    assert zb.counters[EPH].zbytes == 0
    assert zb.check() == []


def test_alloc_fails_when_the_arena_refuses_a_frame() -> None:
    _arena, zb = make(2)
    assert put(zb, EPH, b"a" * 3000) >= 0
    assert put(zb, EPH, b"b" * 3000) >= 0
    assert zb.alloc(3000, EPH) == -1
    assert zb.alloc(1000, EPH) >= 0  # still fits beside the first


def test_lru_moves_frame_on_add_not_on_remove() -> None:
    _, zb = make()
    a = put(zb, EPH, b"a" * 1000)
    b = put(zb, EPH, b"b" * 3500)  # too big to pair with anything here
    c = put(zb, EPH, b"c" * 3500)
    f0, f1, f2 = a >> 1, b >> 1, c >> 1
    assert zb.lru_frames(EPH) == [f0, f1, f2]
    d = put(zb, EPH, b"d" * 1000)  # lands in f0 -> MRU
    assert d >> 1 == f0 and zb.lru_frames(EPH) == [f1, f2, f0]
    zb.free(d)
    assert zb.lru_frames(EPH) == [f1, f2, f0]


def test_lru_victims_zombify_the_lru_frame() -> None:
    arena, zb = make()
    a = put(zb, EPH, b"a" * 1000)
    b = put(zb, EPH, b"b" * 1000)
    c = put(zb, EPH, b"c" * 3000)
    assert zb.lru_victims(EPH) == [a, b]  # both buddies of the LRU frame
    assert zb.is_zombie(a) and zb.lru_frames(EPH) == [c >> 1]
    assert bytes(zb.arena[slice(*zb.span(a))]) == b"a" * 1000  # still readable
    assert put(zb, EPH, b"x" * 100) >> 1 != a >> 1  # takes no new buddy
    zb.free(a)
    zb.free(b)
    zb.note_evicted(EPH)
    assert zb.counters[EPH].evicted_pageframes == 1
    assert arena.frames_used == len(zb.frames_held()) == 1  # x went beside c
    assert zb.lru_victims(PERS) == []
    assert zb.check() == []


def test_restore_returns_a_zombie_frame_to_service() -> None:
    _, zb = make()
    a = put(zb, PERS, b"a" * 1000)
    assert zb.lru_victims(PERS) == [a]
    zb.restore(a)
    assert not zb.is_zombie(a)
    assert zb.lru_frames(PERS) == [a >> 1]
    assert put(zb, PERS, b"b" * 100) >> 1 == a >> 1
    assert zb.check() == []


def test_huge_object_fills_a_frame() -> None:
    arena, zb = make()
    page = bytes(range(256)) * 16
    p = put(zb, PERS, page)
    frame = p >> 1
    assert zb.span(p) == (frame * PAGE_SIZE, (frame + 1) * PAGE_SIZE)
    assert zb.frames_held() == {frame: "huge"}
    assert put(zb, PERS, b"x" * 10) >> 1 != frame
    zb.free(p)
    assert frame not in zb.frames_held() and arena.frames_used == 1


def test_stale_entries_are_compacted() -> None:
    _, zb = make(4)
    for _ in range(3000):
        a = put(zb, EPH, b"a" * 700)
        b = put(zb, EPH, b"b" * 700)
        zb.free(b)
        zb.free(a)
    assert len(zb.lru[EPH]) < 2100
    assert sum(len(s) for s in zb.unbuddied[EPH]) < 2100
    assert zb.counters[EPH].pageframes == 0
