"""One conformance suite for every allocator behind zcache (tmem.allocator.Allocator).

Written against the Protocol only: each entry of ALLOCATORS builds an arena and an
allocator over it; the suite must pass for all of them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import lz4.block
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tmem.allocator import EPH, PAGE_SIZE, PERS, Allocator
from tmem.arena import Arena
from tmem.zbud import Zbud
from tmem.zsmalloc import Zsmalloc

Factory = Callable[[int], tuple[Arena, Allocator]]


def _zsmalloc(frames: int) -> tuple[Arena, Allocator]:
    arena = Arena(frames)
    return arena, Zsmalloc(arena)


def _zbud(frames: int) -> tuple[Arena, Allocator]:
    arena = Arena(frames)
    return arena, Zbud(arena)


ALLOCATORS: dict[str, Factory] = {"zsmalloc": _zsmalloc, "zbud": _zbud}


@pytest.fixture(params=sorted(ALLOCATORS))
def make(request: pytest.FixtureRequest) -> Factory:
    factory: Factory = ALLOCATORS[request.param]
    return factory


def _payload(handle: int, size: int) -> bytes:
    """Bytes that differ between objects, so a misplaced object reads wrong."""
    return random.Random(handle * 7919 + size).randbytes(size)


def _write(arena: Arena, alloc: Allocator, handle: int, data: bytes) -> None:
    start, end = alloc.span(handle)
    assert end - start == len(data)
    arena.memory[start:end] = data


def _read(arena: Arena, alloc: Allocator, handle: int) -> bytes:
    start, end = alloc.span(handle)
    return bytes(arena.memory[start:end])


def _held_consistent(arena: Arena, alloc: Allocator) -> None:
    held = alloc.frames_held()
    assert len(held) == arena.frames_used
    assert not set(held) & set(arena.free_frames_list())


EDGE_SIZES = sorted(
    {1, 2, 15, 16, 17, 31, 32, 33, 100, 500, 1000, 2047, 2048, 2049, 3000, 3264, 3265, 4095, 4096}
)


def test_every_size_round_trips(make: Factory) -> None:
    arena, alloc = make(4096)
    sizes = [*EDGE_SIZES, *range(1, PAGE_SIZE + 1, 37)]
    stored: dict[int, bytes] = {}
    for size in sizes:
        h = alloc.alloc(size, EPH if size % 2 else PERS)
        assert h >= 0
        assert h not in stored
        data = _payload(h, size)
        _write(arena, alloc, h, data)
        stored[h] = data
    for h, data in stored.items():
        assert _read(arena, alloc, h) == data
    assert alloc.check() == []
    assert arena.check() == []
    _held_consistent(arena, alloc)
    for h in stored:
        alloc.free(h)
    assert arena.frames_used == 0
    assert alloc.frames_held() == {}
    assert alloc.check() == []


def test_spans_do_not_overlap(make: Factory) -> None:
    arena, alloc = make(1024)
    rng = random.Random(3)
    spans = [alloc.span(alloc.alloc(rng.randint(1, PAGE_SIZE), EPH)) for _ in range(500)]
    spans.sort()
    for (_s0, e0), (s1, _e1) in itertools.pairwise(spans):
        assert e0 <= s1
    assert all(0 <= s < e <= len(arena.memory) for s, e in spans)


@pytest.mark.parametrize("size", [0, -1, PAGE_SIZE + 1])
def test_bad_sizes_raise(make: Factory, size: int) -> None:
    _arena, alloc = make(16)
    with pytest.raises(ValueError):
        alloc.alloc(size, EPH)


def test_freeing_everything_returns_every_frame(make: Factory) -> None:
    arena, alloc = make(2048)
    rng = random.Random(5)
    handles = [alloc.alloc(rng.randint(1, PAGE_SIZE), EPH) for _ in range(1500)]
    assert min(handles) >= 0
    assert arena.frames_used > 0
    rng.shuffle(handles)
    for i, h in enumerate(handles):
        alloc.free(h)
        if i % 97 == 0:
            assert alloc.check() == []
            _held_consistent(arena, alloc)
    assert arena.frames_used == 0
    assert arena.check() == []
    assert alloc.stats()["pages_compacted"] == 0


def test_full_arena_fails_then_recovers(make: Factory) -> None:
    arena, alloc = make(64)
    handles = []
    while True:
        h = alloc.alloc(PAGE_SIZE, PERS)
        if h < 0:
            break
        handles.append(h)
        assert len(handles) <= 64
    assert arena.frames_used + 1 > arena.limit
    assert alloc.check() == []
    alloc.free(handles.pop())
    h = alloc.alloc(PAGE_SIZE, PERS)
    assert h >= 0
    data = _payload(h, PAGE_SIZE)
    _write(arena, alloc, h, data)
    assert _read(arena, alloc, h) == data


def test_lowered_limit_is_respected(make: Factory) -> None:
    arena, alloc = make(64)
    arena.limit = 10
    while alloc.alloc(1000, EPH) >= 0:
        pass
    assert 0 < arena.frames_used <= 10
    assert alloc.check() == []


def test_tiny_budget_fills_to_the_last_frame(make: Factory) -> None:
    arena, alloc = make(8)
    rng = random.Random(17)
    stored: dict[int, bytes] = {}
    for size in [2100] * 12 + [rng.randint(1, PAGE_SIZE) for _ in range(40)]:
        h = alloc.alloc(size, PERS)
        if h < 0:  # refused only when no single frame is left
            assert arena.frames_used == arena.limit
            continue
        stored[h] = _payload(h, size)
        _write(arena, alloc, h, stored[h])
    assert arena.frames_used == 8 and len(stored) >= 8
    for h, data in stored.items():
        assert _read(arena, alloc, h) == data
    assert alloc.check() == []
    _held_consistent(arena, alloc)


def test_churn_keeps_frames_near_the_live_bytes(make: Factory) -> None:
    arena, alloc = make(4096)
    rng = random.Random(19)
    live: dict[int, bytes] = {}
    for step in range(6000):
        if live and rng.random() < 0.45:
            h = rng.choice(list(live))
            alloc.free(h)
            del live[h]
        else:
            size = rng.choice((rng.randint(1, 600), rng.randint(600, 3000)))
            h = alloc.alloc(size, EPH)
            live[h] = _payload(h, size)
            _write(arena, alloc, h, live[h])
        if step % 1000 == 999:
            assert alloc.check() == []
    alloc.compact(1 << 30)
    for h, data in live.items():
        assert _read(arena, alloc, h) == data
    assert alloc.check() == []
    _held_consistent(arena, alloc)
    used = sum(len(d) for d in live.values())
    # zbud: at most two objects per frame, whatever their sizes
    assert arena.frames_used * PAGE_SIZE <= used * (1.1 if alloc.name == "zsmalloc" else 2.5)


def test_compaction_keeps_handles_and_data(make: Factory) -> None:
    arena, alloc = make(4096)
    rng = random.Random(11)
    stored: dict[int, bytes] = {}
    for _ in range(3000):
        size = rng.choice((rng.randint(1, 300), rng.randint(300, 2500)))
        h = alloc.alloc(size, EPH)
        stored[h] = _payload(h, size)
        _write(arena, alloc, h, stored[h])
    for h in list(stored)[::2]:
        alloc.free(h)
        del stored[h]
    before = arena.frames_used
    gain = alloc.compactable_frames()
    moved = alloc.compact(1 << 30)
    assert alloc.check() == []
    assert arena.check() == []
    for h, data in stored.items():
        assert _read(arena, alloc, h) == data
    assert before - arena.frames_used == alloc.stats()["pages_compacted"]
    if gain:  # an allocator that can compact must free what it promised
        assert moved > 0
        assert arena.frames_used <= before - gain
    assert alloc.compactable_frames() == 0
    _held_consistent(arena, alloc)


def test_compaction_budget_is_honoured(make: Factory) -> None:
    _arena, alloc = make(1024)
    handles = [alloc.alloc(100, EPH) for _ in range(2000)]
    for h in handles[::3]:
        alloc.free(h)
    assert alloc.compact(5) <= 5
    assert alloc.check() == []


def test_metadata_per_object_is_bounded(make: Factory) -> None:
    _arena, alloc = make(1 << 16)
    rng = random.Random(13)
    empty = alloc.metadata_bytes()
    for _ in range(100_000):
        assert alloc.alloc(rng.randint(1, 2048), EPH) >= 0
    per_object = (alloc.metadata_bytes() - empty) / 100_000
    # zbud's frame LRU queue holds stale entries until it compacts them
    assert per_object < (24 if alloc.name == "zsmalloc" else 48), per_object


def test_real_page_sizes(make: Factory, anon_pages: list[bytes]) -> None:
    arena, alloc = make(len(anon_pages))
    stored: dict[int, bytes] = {}
    for page in anon_pages:
        data = lz4.block.compress(page, store_size=False)
        if len(data) >= PAGE_SIZE:
            data = page
        h = alloc.alloc(len(data), EPH)
        assert h >= 0
        _write(arena, alloc, h, data)
        stored[h] = page
    assert arena.frames_used < len(anon_pages)  # compression saved frames
    for h, page in stored.items():
        data = _read(arena, alloc, h)
        assert data == page or lz4.block.decompress(data, uncompressed_size=PAGE_SIZE) == page
    assert alloc.check() == []
    _held_consistent(arena, alloc)


class AllocatorMachine(RuleBasedStateMachine):
    """alloc/free/write/compact against a dict model; every structure checked after each step."""

    factory: Factory = staticmethod(_zsmalloc)  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.arena, self.alloc = self.factory(48)
        self.model: dict[int, bytes] = {}

    @rule(size=st.one_of(st.integers(1, 64), st.integers(1, PAGE_SIZE)), seed=st.integers(0, 255))
    def put(self, size: int, seed: int) -> None:
        h = self.alloc.alloc(size, seed & 1)
        if h < 0:  # only when the arena has no frame left
            assert self.arena.take(1) == -1
            return
        assert h not in self.model
        data = bytes([seed]) * size
        _write(self.arena, self.alloc, h, data)
        self.model[h] = data

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1 << 30))
    def free(self, pick: int) -> None:
        h = sorted(self.model)[pick % len(self.model)]
        self.alloc.free(h)
        del self.model[h]

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 1 << 30), seed=st.integers(0, 255))
    def overwrite(self, pick: int, seed: int) -> None:
        h = sorted(self.model)[pick % len(self.model)]
        data = bytes([seed ^ 0x5A]) * len(self.model[h])
        _write(self.arena, self.alloc, h, data)
        self.model[h] = data

    @rule(budget=st.integers(0, 50))
    def compact(self, budget: int) -> None:
        frames = self.arena.frames_used
        moved = self.alloc.compact(budget)
        assert 0 <= moved <= budget
        assert self.arena.frames_used <= frames

    @invariant()
    def consistent(self) -> None:
        assert self.alloc.check() == []
        assert self.arena.check() == []
        _held_consistent(self.arena, self.alloc)
        for h, data in self.model.items():
            assert _read(self.arena, self.alloc, h) == data
        if not self.model:
            assert self.arena.frames_used == 0


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_stateful(name: str) -> None:
    factory = staticmethod(ALLOCATORS[name])
    machine = type(f"{name}Machine", (AllocatorMachine,), {"factory": factory})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=150, stateful_step_count=60, deadline=None)
    )
