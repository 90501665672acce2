"""zsmalloc specifics: the class table, straddling objects, density, compaction."""

from __future__ import annotations

import collections
import itertools
import math

import lz4.block
import pytest

from tmem.allocator import EPH, PAGE_SIZE
from tmem.arena import Arena
from tmem.zsmalloc import CLASSES, HUGE_CLASS, SIZE_TO_CLASS, Zsmalloc


def _class_of(size: int) -> tuple[int, int, int]:
    return CLASSES[SIZE_TO_CLASS[(size + 15) >> 4]]


def test_class_table_picks_least_waste_and_merges() -> None:
    sizes = [s for s, _k, _o in CLASSES]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] == PAGE_SIZE
    assert all(s % 16 == 0 for s in sizes)
    for size, k, objs in CLASSES:
        assert objs == k * PAGE_SIZE // size
        waste = (k * PAGE_SIZE) % size / (k * PAGE_SIZE)
        for other in range(1, 5):  # no other span length wastes less (ties: smaller k)
            w = (other * PAGE_SIZE) % size / (other * PAGE_SIZE)
            assert w > waste or (w == waste and other >= k), (size, k, other)
    # merged: neighbours never share (k, objs); a merged size uses the larger slot
    for (_s0, k0, o0), (_s1, k1, o1) in itertools.pairwise(CLASSES):
        assert (k0, o0) != (k1, o1)
    assert _class_of(3000) == (3072, 3, 4)  # 12288 / 3072: no waste at all
    assert _class_of(48) == (48, 3, 256)  # 3 frames, 0 waste, beats 1 frame (16 B waste)
    assert len(CLASSES) < 256 // 2  # merging removed many classes


def test_huge_class_is_one_object_per_frame() -> None:
    assert CLASSES[HUGE_CLASS] == (PAGE_SIZE, 1, 1)
    first_huge = min(s for s in range(16, PAGE_SIZE + 1, 16) if _class_of(s)[0] == PAGE_SIZE)
    assert _class_of(first_huge - 16)[2] > 1  # just below it, spans hold several objects
    arena = Arena(16)
    zs = Zsmalloc(arena)
    h = zs.alloc(first_huge, EPH)
    small = zs.alloc(first_huge - 16, EPH)
    assert zs.span(h)[1] - zs.span(h)[0] == first_huge  # exact size remembered
    assert zs.stats()["zs_huge_objects"] == 1
    kinds = collections.Counter(zs.frames_held().values())
    assert kinds["zs-huge"] == 1 and kinds["zs"] == _class_of(first_huge - 16)[1]
    zs.free(small)
    zs.free(h)
    assert arena.frames_used == 0


def test_objects_straddle_frame_boundaries() -> None:
    arena = Arena(8)
    zs = Zsmalloc(arena)
    _size, k, objs = _class_of(3000)
    handles = [zs.alloc(3000, EPH) for _ in range(objs)]
    assert arena.frames_used == k
    spans = [zs.span(h) for h in handles]
    straddling = [(s, e) for s, e in spans if s // PAGE_SIZE != (e - 1) // PAGE_SIZE]
    assert straddling  # 3072-byte slots in 3 frames: 3 of 4 cross a boundary
    for i, h in enumerate(handles):
        s, e = zs.span(h)
        arena.memory[s:e] = bytes([i + 1]) * 3000
    for i, h in enumerate(handles):
        s, e = zs.span(h)
        assert bytes(arena.memory[s:e]) == bytes([i + 1]) * 3000
    assert zs.check() == []


def test_fullest_span_is_filled_first() -> None:
    arena = Arena(64)
    zs = Zsmalloc(arena)
    _size, k, objs = _class_of(1000)
    handles = [zs.alloc(1000, EPH) for _ in range(3 * objs)]
    assert arena.frames_used == 3 * k
    # span 0 loses one object, span 1 loses all but one: the next object goes to span 0
    spans = [handles[i * objs : (i + 1) * objs] for i in range(3)]
    zs.free(spans[0][0])
    for h in spans[1][1:]:
        zs.free(h)
    start0 = zs.span(spans[0][1])[0] // PAGE_SIZE // k
    h = zs.alloc(1000, EPH)
    assert zs.span(h)[0] // PAGE_SIZE // k == start0
    assert zs.check() == []


def test_density_on_real_pages(anon_pages: list[bytes]) -> None:
    sizes = [min(len(lz4.block.compress(p, store_size=False)), PAGE_SIZE) for p in anon_pages]
    arena = Arena(len(sizes))
    zs = Zsmalloc(arena)
    for size in sizes:
        assert zs.alloc(size, EPH) >= 0
    used = arena.frames_used * PAGE_SIZE
    ideal = sum((s + 15) // 16 * 16 for s in sizes)
    # What the class table allows: each object's share of its span...
    shares = sum(_class_of(s)[1] * PAGE_SIZE / _class_of(s)[2] for s in sizes)
    # ...plus at most one partly filled span per class.
    per_class = collections.Counter(_class_of(s) for s in sizes)
    bound = sum(math.ceil(n / c[2]) * c[1] for c, n in per_class.items()) * PAGE_SIZE
    print(
        f"\n{len(sizes)} pages: {used} B in frames, ideal {ideal} B (+{used / ideal - 1:.1%}), "
        f"class-table shares {shares:.0f} B (+{shares / ideal - 1:.1%})"
    )
    assert used == bound  # no class ever holds two partly filled spans after pure puts
    assert shares <= ideal * 1.05  # spans of 1-4 frames waste under 5 % in themselves
    # Many objects per class: the partly filled spans no longer count.
    arena2 = Arena(8 * len(sizes))
    zs2 = Zsmalloc(arena2)
    for size in sizes * 8:
        assert zs2.alloc(size, EPH) >= 0
    used8 = arena2.frames_used * PAGE_SIZE
    print(f"the same pages 8 times: +{used8 / (8 * ideal) - 1:.1%} over ideal")
    assert used8 <= 8 * ideal * 1.07


def test_compaction_after_freeing_every_other_object() -> None:
    arena = Arena(4096)
    zs = Zsmalloc(arena)
    handles = [zs.alloc(200 + (i % 7) * 150, EPH) for i in range(6000)]
    for i, h in enumerate(handles):
        s, e = zs.span(h)
        arena.memory[s:e] = i.to_bytes(4, "little") * ((e - s) // 4) + bytes((e - s) % 4)
    for h in handles[::2]:
        zs.free(h)
    before = arena.frames_used
    gain = zs.compactable_frames()
    assert gain > before // 3  # half the objects gone: close to half the frames to gain
    assert zs.stats()["zs_compactable_frames"] == gain
    moved = zs.compact(1 << 30)
    assert moved > 0
    assert zs.stats()["pages_compacted"] == gain == before - arena.frames_used
    assert zs.compactable_frames() == 0
    for i, h in enumerate(handles[1::2]):
        s, e = zs.span(h)
        n = 2 * i + 1
        assert bytes(arena.memory[s:e]) == n.to_bytes(4, "little") * ((e - s) // 4) + bytes(
            (e - s) % 4
        )
    assert zs.check() == []
    assert arena.check() == []


def test_double_free_and_bad_size_raise() -> None:
    zs = Zsmalloc(Arena(4))
    h = zs.alloc(10, EPH)
    zs.free(h)
    with pytest.raises(ValueError):
        zs.free(h)
    with pytest.raises(ValueError):
        zs.alloc(PAGE_SIZE + 1, EPH)


def test_metadata_at_many_objects() -> None:
    arena = Arena(1 << 17)
    zs = Zsmalloc(arena)
    for i in range(200_000):
        zs.alloc(16 + (i * 7919) % 2000, EPH)
    per_object = zs.metadata_bytes() / 200_000
    assert per_object < 16, per_object
