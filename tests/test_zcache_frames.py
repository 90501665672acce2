"""Zcache.check_frames: the frame accounting the stateful test relies on must catch a
broken store. Each test builds a real, consistent Zcache, breaks one structure through
its internals (only here), and expects the check to name the fault."""

from __future__ import annotations

import pytest

from tmem import Zcache
from tmem.zbud import EPH, PERS

PAGE = 4096
FRAMES = 32


def filled(anon_pages: list[bytes], *, behind: bool = False) -> tuple[Zcache, int]:
    """A Zcache with free frames, buddied and unbuddied frames of both classes, and
    (with ``behind``) staged frames."""
    zc = Zcache(memory=FRAMES * PAGE, compress_behind=behind, prefault=False)
    zc.stage_reserve = FRAMES // 2
    eph = zc.new_pool()
    pers = zc.new_pool(persistent=True)
    for i in range(12):
        zc.put(pers, (1, 0, 0), i, anon_pages[i])
        zc.put(eph, (2, 0, 0), i, anon_pages[100 + i])
    assert zc.frames_free > 0
    return zc, pers


def held_kinds(zc: Zcache) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for frame, kind in zc.zbud.frames_held().items():
        out.setdefault(kind, []).append(frame)
    return out


@pytest.mark.parametrize("behind", [False, True], ids=["at-put", "compress-behind"])
def test_a_consistent_store_passes(anon_pages: list[bytes], behind: bool) -> None:
    zc, _ = filled(anon_pages, behind=behind)
    assert zc.check_frames() == []
    owners = zc.frame_owners()
    assert len(owners) == FRAMES and all(len(o) == 1 for o in owners)
    # independent of the walk: what each class's puts stored, and which frames are free
    free = set(zc._free_frames)
    assert sum(o == ["free"] for o in owners) == len(free) == zc.frames_free
    kinds = held_kinds(zc)
    assert ("staged" in kinds) == behind
    assert "unbuddied" in kinds or "buddied" in kinds


def test_detects_a_frame_both_free_and_used(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    frame = next(iter(zc.zbud.frames_held()))
    zc._free_frames.append(frame)
    problems = zc.check_frames()
    assert any(p.startswith(f"frame {frame}: held 2 times: free, ") for p in problems)


def test_detects_a_leaked_frame(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    frame = zc._free_frames.pop()  # taken off the free stack, given to nobody
    assert zc.check_frames() == [f"frame {frame}: held by nobody (leaked)"]


def test_detects_a_frame_on_the_free_stack_twice(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    frame = zc._free_frames[0]
    zc._free_frames.append(frame)
    assert zc.check_frames() == [f"frame {frame}: held 2 times: free, free"]


def test_detects_a_free_stack_entry_outside_the_budget(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    zc._free_frames.append(FRAMES)
    assert zc.check_frames() == [f"free stack entry {FRAMES} is outside the budget of 32 frames"]


def test_detects_a_zbud_no_handle_maps(anon_pages: list[bytes]) -> None:
    zc, pers = filled(anon_pages)
    pages = zc.tmem.pool(pers).objects[(1, 0, 0)]
    index, pampd = next((i, p) for i, p in pages.items() if p >= 0)
    del pages[index]  # the zbud stays stored, unreachable: it can never be freed
    problems = zc.check_frames()
    assert len(problems) == 1 and f"zbud {pampd} mapped by no handle" in problems[0]


def test_detects_a_handle_to_a_zbud_not_held(anon_pages: list[bytes]) -> None:
    zc, pers = filled(anon_pages)
    free_frame = zc._free_frames[0]
    zc.tmem.pool(pers).objects[(1, 0, 0)][99] = free_frame << 1
    problems = zc.check_frames()
    assert len(problems) == 1 and problems[0].endswith(f"zbud {free_frame << 1}, which is not held")


def test_detects_two_handles_on_one_zbud(anon_pages: list[bytes]) -> None:
    zc, pers = filled(anon_pages)
    pages = zc.tmem.pool(pers).objects[(1, 0, 0)]
    pampd = next(p for p in pages.values() if p >= 0)
    pages[99] = pampd
    problems = zc.check_frames()
    assert len(problems) == 1 and problems[0].startswith(f"pampd {pampd}: mapped by ")


def test_detects_a_handle_written_in_the_frame_that_differs(anon_pages: list[bytes]) -> None:
    zc, pers = filled(anon_pages)
    pages = zc.tmem.pool(pers).objects[(1, 0, 0)]
    index = next(i for i, p in pages.items() if p >= 0)
    pages[index + 1000] = pages.pop(index)  # tmem moved the entry, the frame was not told
    problems = zc.check_frames()
    assert len(problems) == 1 and "frame names" in problems[0]


def test_detects_an_unbuddied_frame_lost_from_its_stack(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    frame = held_kinds(zc)["unbuddied"][0]
    zc.zbud.where[frame] = 0  # its stack entry now reads as stale: best fit never finds it
    problems = zc.check_frames()
    assert len(problems) == 1 and problems[0].startswith(f"zbud: frame {frame}: unbuddied, but")


def test_detects_a_live_frame_lost_from_the_lru(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    frame = zc.zbud.lru_frames(EPH)[0]
    zc.zbud.stamp[frame] = 0  # reclaim would never evict it
    problems = zc.check_frames()
    assert problems == [f"zbud: frame {frame}: live, but not on the LRU of class {EPH}"]


def test_detects_a_held_frame_that_holds_nothing(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages)
    free_frame = zc._free_frames.pop()
    zc.zbud.flags[free_frame] = 1  # F_USED, with no zbud in it
    zc.zbud.cls[free_frame] = PERS
    problems = zc.check_frames()
    assert f"zbud: frame {free_frame}: held, but holds no zbud" in problems


def test_detects_a_staged_frame_missing_from_the_queue(anon_pages: list[bytes]) -> None:
    zc, _ = filled(anon_pages, behind=True)
    staged = sorted(held_kinds(zc)["staged"])
    zc._staged.clear()  # compact() would never reach them
    problems = zc.check_frames()
    assert problems == [f"frame {f}: staged, but not on the compress-behind queue" for f in staged]
