"""The arena: buddy blocks of 1-4 frames over one mapping, RAM that follows use."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tmem.arena import PAGE_SIZE, Arena

MIB = 1 << 20


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fill(arena: Arena, first: int, count: int) -> None:
    start = first * PAGE_SIZE
    arena.memory[start : start + count * PAGE_SIZE] = b"\xa5" * (count * PAGE_SIZE)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_take_is_contiguous_aligned_and_counted(count: int) -> None:
    arena = Arena(64)
    firsts = [arena.take(count) for _ in range(5)]
    align = 1 if count == 1 else 2 if count == 2 else 4
    assert all(f % align == 0 for f in firsts)
    frames = [f + i for f in firsts for i in range(count)]
    assert len(set(frames)) == len(frames)
    assert arena.frames_used == 5 * count
    assert not set(frames) & set(arena.free_frames_list())
    assert arena.check() == []
    for f in firsts:
        arena.give(f, count)
    assert arena.frames_used == 0
    assert arena.check() == []


def test_coalescing_rebuilds_whole_blocks() -> None:
    arena = Arena(8)
    singles = [arena.take(1) for _ in range(8)]
    assert sorted(singles) == list(range(8))
    assert arena.take(1) == -1
    for f in (1, 2, 7, 4, 0, 6, 3, 5):
        arena.give(f, 1)
        assert arena.check() == []
    # two free blocks of four, nothing smaller left over
    blocks = arena.free_res[2] | arena.free_rel[2]
    assert blocks == {0, 4}
    assert not any(arena.free_res[o] or arena.free_rel[o] for o in (0, 1))
    assert sorted([arena.take(4), arena.take(4)]) == [0, 4]


def test_take_three_returns_the_fourth_frame() -> None:
    arena = Arena(8)
    first = arena.take(3)
    assert arena.frames_used == 3
    assert arena.free_frames_list() == [first + 3]
    assert arena.take(1) == first + 3
    assert arena.check() == []


def test_limit_and_frames_free() -> None:
    arena = Arena(32)
    arena.limit = 5
    assert arena.take(4) >= 0
    assert arena.take(2) == -1  # 4 + 2 > 5
    assert arena.take(1) >= 0
    assert arena.frames_free == 0
    arena.limit = 3  # below what is used: nothing free, never negative
    assert arena.frames_free == 0
    assert arena.take(1) == -1
    with pytest.raises(ValueError):
        arena.limit = 33
    with pytest.raises(ValueError):
        arena.take(5)


def test_bump_pointer_touches_only_what_is_used() -> None:
    arena = Arena(1 << 28)  # a 1 TiB budget: reserves nothing, no per-frame metadata
    assert arena.top == 0
    assert arena.metadata_bytes() < 4096
    assert arena.take(1) == 0
    assert arena.top == 4
    arena.take(4)
    assert arena.top == 8
    assert arena.metadata_bytes() < 4096
    assert arena.resident_bytes() <= 8 * PAGE_SIZE


def test_gives_are_checked() -> None:
    arena = Arena(8)
    f = arena.take(2)
    arena.give(f, 2)
    with pytest.raises(ValueError):
        arena.give(f, 1)  # already free
    with pytest.raises(ValueError):
        arena.give(100, 1)


def test_random_churn_stays_consistent() -> None:
    rng = random.Random(2)
    arena = Arena(200, keep_resident=8)
    held: list[tuple[int, int]] = []
    for step in range(3000):
        if held and rng.random() < 0.45:
            first, count = held.pop(rng.randrange(len(held)))
            arena.give(first, count)
        else:
            count = rng.randint(1, 4)
            first = arena.take(count)
            if first >= 0:
                held.append((first, count))
                _fill(arena, first, count)
        if step % 50 == 0:
            assert arena.check() == []
            assert arena.frames_used == sum(c for _f, c in held)
    for first, count in held:
        arena.give(first, count)
    assert arena.check() == []
    assert arena.frames_used == 0


def test_memory_follows_use_on_demand() -> None:
    frames = 64 * MIB // PAGE_SIZE
    arena = Arena(frames, keep_resident=256)
    assert arena.resident_bytes() == 0
    rss0 = _vm_rss()
    taken = [arena.take(4) for _ in range(frames // 4)]
    for f in taken:
        _fill(arena, f, 4)
    assert arena.resident_bytes() == 64 * MIB
    assert _vm_rss() - rss0 > 60 * MIB
    for f in taken:
        arena.give(f, 4)
    # everything beyond keep_resident went back to the OS
    assert arena.resident_bytes() <= 256 * PAGE_SIZE
    assert _vm_rss() - rss0 < 8 * MIB
    assert arena.check() == []
    # the kept frames serve the next takes without faulting fresh ones
    kept = arena.resident_free
    assert 0 < kept <= 256
    resident = arena.resident_bytes()
    f = arena.take(4)
    assert arena.resident_free == kept - 4
    _fill(arena, f, 4)
    assert arena.resident_bytes() == resident  # written without faulting a new page
    arena.give(f, 4)
    released = arena.release_free()
    assert released > 0
    assert arena.resident_bytes() == 0
    assert arena.resident_free == 0
    assert arena.check() == []


def test_churn_under_keep_resident_makes_no_syscalls() -> None:
    arena = Arena(4096, keep_resident=64)
    held = [arena.take(1) for _ in range(1000)]
    for f in held:
        _fill(arena, f, 1)
    for f in held[:32]:
        arena.give(f, 1)
    calls = arena.madvise_calls
    for _ in range(500):
        f = arena.take(2)
        _fill(arena, f, 2)
        arena.give(f, 2)
    assert arena.madvise_calls == calls


def test_prefault_keeps_everything_resident() -> None:
    arena = Arena(1024, prefault=True)
    assert arena.resident_bytes() == 1024 * PAGE_SIZE
    taken = [arena.take(4) for _ in range(256)]
    for f in taken:
        arena.give(f, 4)
    assert arena.release_free() == 0
    assert arena.resident_bytes() == 1024 * PAGE_SIZE
    assert arena.madvise_calls == 0


def test_resident_bytes_is_fast_on_a_gib() -> None:
    import time

    arena = Arena(1 << 18)  # 1 GiB
    f = arena.take(4)
    while f >= 0 and arena.top < (1 << 18):
        f = arena.take(4)
    t = time.perf_counter()
    arena.resident_bytes()
    assert time.perf_counter() - t < 0.05
