"""zsmalloc: compressed objects packed by size class into spans of 1-4 frames.

The layout follows the kernel's zsmalloc (Documentation/mm/zsmalloc.rst), in Python:

* Sizes are rounded up to 16 bytes. Each class size S keeps its objects in *spans* of k
  contiguous frames (k in 1..4, the k that wastes the least of ``k*4096 % S``); objects
  sit at ``slot * S`` from the span start and may straddle frame boundaries, which costs
  nothing here because the arena is one contiguous mapping. Classes with the same
  (k, objects per span) are merged into the largest of them (no extra waste, fewer
  half-empty spans); the last class, one object per frame, is the *huge* class.
* Allocation fills the fullest non-full span of the class first: non-full spans are on
  per-class *fullness group* lists (8 groups by in-use ratio) found in O(1) through a
  bitmask, so sparse spans drain and can be given back. A span that empties goes back
  to the frame source at once.
* :meth:`Zsmalloc.compact` moves objects from the least used spans of a class into its
  fullest ones, through a reverse map slot -> handle; handles stay valid.

Everything lives in ``array`` columns, no Python object per object or span: per handle
its location (arena offset / 16) and exact size; per span its class, in-use count, free
slot chain head, start, fullness list links and the base of its slots in the class's
slot array (an int32 per slot: >= 0 the handle there, < 0 the next free slot); per frame
the span holding it. About 12-16 bytes per object in all, depending on the sizes.
"""

from __future__ import annotations

import sys
from array import array
from typing import Final

from tmem.allocator import PAGE_SIZE, FrameSource

MAX_SPAN_FRAMES: Final = 4
NGROUPS: Final = 8  # fullness groups of non-full spans; a full span is on none
FULL: Final = NGROUPS
GROUP_SHIFT: Final = 3  # list index = class << GROUP_SHIFT | group
UNIT_SHIFT: Final = 4  # sizes and locations in 16-byte units
FRAME_UNITS_SHIFT: Final = 8  # a frame is 256 units


def _best_span(size: int) -> tuple[int, int]:
    """(k frames, objects per span) wasting the least of a span, ties to smaller k."""
    best_k, best_waste = 1, PAGE_SIZE % size
    for k in range(2, MAX_SPAN_FRAMES + 1):
        waste = (k * PAGE_SIZE) % size
        # waste / (k*4096) < best_waste / (best_k*4096), without division
        if waste * best_k < best_waste * k:
            best_k, best_waste = k, waste
    return best_k, best_k * PAGE_SIZE // size


def class_table() -> list[tuple[int, int, int]]:
    """The size classes, smallest first: (size, frames per span, objects per span).

    Built from the largest size down: a size whose (k, objects) equals that of the class
    above it joins that class (its objects just use the bigger slot).
    """
    classes: list[tuple[int, int, int]] = []
    for size in range(PAGE_SIZE, 0, -(1 << UNIT_SHIFT)):
        k, objs = _best_span(size)
        if classes and classes[-1][1] == k and classes[-1][2] == objs:
            continue
        classes.append((size, k, objs))
    classes.reverse()
    return classes


def _size_to_class(classes: list[tuple[int, int, int]]) -> array[int]:
    """Class index for each size in 16-byte units (index 0 unused)."""
    out = array("B", bytes((PAGE_SIZE >> UNIT_SHIFT) + 1))
    c = 0
    for units in range(1, len(out)):
        while classes[c][0] < units << UNIT_SHIFT:
            c += 1
        out[units] = c
    return out


CLASSES: Final = class_table()
SIZE_TO_CLASS: Final = _size_to_class(CLASSES)
HUGE_CLASS: Final = len(CLASSES) - 1  # one object per frame (size 4096, k 1)


class Zsmalloc:
    """The zsmalloc allocator over the frames of ``frames`` (an Allocator)."""

    name = "zsmalloc"
    max_size = PAGE_SIZE
    max_mean_size = PAGE_SIZE  # nothing pairs: no limit on the mean stored size

    def __init__(self, frames: FrameSource) -> None:
        self._frames = frames
        self._mem = frames.memory
        arena_units = len(self._mem) >> UNIT_SHIFT
        loc_code = "I" if arena_units < 1 << 32 else "Q"
        n = len(CLASSES)
        # class columns
        self._size_class = SIZE_TO_CLASS
        self._cls_size16 = array("H", [s >> UNIT_SHIFT for s, _k, _o in CLASSES])
        self._cls_k = array("B", [k for _s, k, _o in CLASSES])
        self._cls_objs = array("H", [o for _s, _k, o in CLASSES])
        # a fresh span's free chain: slot i -> i+1, the last -> none (-1)
        self._cls_chain = [array("i", [*range(-3, -2 - o, -1), -1]) for _s, _k, o in CLASSES]
        self._cls_slots = [array("i") for _ in range(n)]  # reverse maps, span by span
        self._cls_free_segs = [array("i") for _ in range(n)]  # slot bases of dead spans
        self._cls_inuse = array("q", bytes(8 * n))
        self._cls_spans = array("q", bytes(8 * n))
        self._mask = array("B", bytes(n))  # bit g: fullness list g of the class non-empty
        self._heads = array("i", [-1]) * (n << GROUP_SHIFT)
        # span columns (span ids are recycled through _span_free)
        self._sp_class = array("B")
        self._sp_inuse = array("H")
        self._sp_free = array("h")  # first free slot, -1: none
        self._sp_start = array(loc_code)  # arena offset / 16
        self._sp_base = array("I")  # index of slot 0 in the class's slot array
        self._sp_next = array("i")
        self._sp_prev = array("i")
        self._span_free = array("i")
        self._frame_span = array("i")  # -1: not ours; grows to the highest frame held
        # handle columns
        self._loc = array(loc_code)  # arena offset / 16
        self._size = array("H")  # exact size; 0: a free handle
        self._free_handles = array("i")
        # counters
        self.objects = 0
        self.bytes = 0
        self.frames = 0
        self.spans = 0
        self.pages_compacted = 0

    # ---- fullness lists ------------------------------------------------------------

    def _link(self, s: int, c: int, g: int) -> None:
        i = c << GROUP_SHIFT | g
        head = self._heads[i]
        self._sp_next[s] = head
        self._sp_prev[s] = -1
        if head >= 0:
            self._sp_prev[head] = s
        self._heads[i] = s
        self._mask[c] |= 1 << g

    def _unlink(self, s: int, c: int, g: int) -> None:
        nxt = self._sp_next[s]
        prv = self._sp_prev[s]
        if prv >= 0:
            self._sp_next[prv] = nxt
        else:
            self._heads[c << GROUP_SHIFT | g] = nxt
            if nxt < 0:
                self._mask[c] &= ~(1 << g)
        if nxt >= 0:
            self._sp_prev[nxt] = prv

    # ---- spans -----------------------------------------------------------------------

    def _new_span(self, c: int) -> int:
        """A fresh empty span of class ``c`` on fullness list 0, or -1 (no frames)."""
        k = self._cls_k[c]
        first = self._frames.take(k)
        if first < 0:
            return -1
        objs = self._cls_objs[c]
        slots = self._cls_slots[c]
        segs = self._cls_free_segs[c]
        if segs:
            base = segs.pop()
            slots[base : base + objs] = self._cls_chain[c]
        else:
            base = len(slots)
            slots.extend(self._cls_chain[c])
        if self._span_free:
            s = self._span_free.pop()
            self._sp_class[s] = c
            self._sp_inuse[s] = 0
            self._sp_free[s] = 0
            self._sp_start[s] = first << FRAME_UNITS_SHIFT
            self._sp_base[s] = base
        else:
            s = len(self._sp_class)
            self._sp_class.append(c)
            self._sp_inuse.append(0)
            self._sp_free.append(0)
            self._sp_start.append(first << FRAME_UNITS_SHIFT)
            self._sp_base.append(base)
            self._sp_next.append(-1)
            self._sp_prev.append(-1)
        fs = self._frame_span
        if len(fs) < first + k:
            fs.extend(array("i", [-1]) * (first + k - len(fs)))
        for f in range(first, first + k):
            fs[f] = s
        self._link(s, c, 0)
        self._cls_spans[c] += 1
        self.spans += 1
        self.frames += k
        return s

    def _drop_span(self, s: int, c: int) -> None:
        """Give an empty span's frames back (it is on no fullness list)."""
        k = self._cls_k[c]
        first = self._sp_start[s] >> FRAME_UNITS_SHIFT
        fs = self._frame_span
        for f in range(first, first + k):
            fs[f] = -1
        self._cls_free_segs[c].append(self._sp_base[s])
        self._span_free.append(s)
        self._cls_spans[c] -= 1
        self.spans -= 1
        self.frames -= k
        self._frames.give(first, k)

    # ---- the Allocator interface -------------------------------------------------------

    def alloc(self, size: int, cls: int) -> int:
        """A handle for ``size`` bytes in the fullest non-full span of its class, or -1
        when a new span is needed and the frame source has no room. The put hot path:
        O(1), a few array operations."""
        if size < 1 or size > PAGE_SIZE:
            raise ValueError(f"object size {size} outside 1..{PAGE_SIZE}")
        c = self._size_class[(size + 15) >> UNIT_SHIFT]
        mask = self._mask[c]
        if mask:
            g = mask.bit_length() - 1
            s = self._heads[c << GROUP_SHIFT | g]
        else:
            s = self._new_span(c)
            if s < 0:
                return -1
            g = 0
        slots = self._cls_slots[c]
        base = self._sp_base[s]
        slot = self._sp_free[s]
        self._sp_free[s] = -2 - slots[base + slot]
        inuse = self._sp_inuse[s] + 1
        self._sp_inuse[s] = inuse
        objs = self._cls_objs[c]
        ng = inuse * NGROUPS // objs if inuse < objs else FULL
        if ng != g:
            self._unlink(s, c, g)
            if ng != FULL:
                self._link(s, c, ng)
        free_handles = self._free_handles
        if free_handles:
            h = free_handles.pop()
        else:
            h = len(self._size)
            self._size.append(0)
            self._loc.append(0)
        slots[base + slot] = h
        self._loc[h] = self._sp_start[s] + slot * self._cls_size16[c]
        self._size[h] = size
        self._cls_inuse[c] += 1
        self.objects += 1
        self.bytes += size
        return h

    def span(self, handle: int) -> tuple[int, int]:
        """The arena byte range of the object (the get hot path: two array reads)."""
        start = self._loc[handle] << UNIT_SHIFT
        return start, start + self._size[handle]

    def free(self, handle: int) -> None:
        """Release the object; an emptied span gives its frames back at once."""
        size = self._size[handle]
        if not size:
            raise ValueError(f"handle {handle} is not allocated")
        loc = self._loc[handle]
        s = self._frame_span[loc >> FRAME_UNITS_SHIFT]
        c = self._sp_class[s]
        slot = (loc - self._sp_start[s]) // self._cls_size16[c]
        slots = self._cls_slots[c]
        slots[self._sp_base[s] + slot] = -2 - self._sp_free[s]
        self._sp_free[s] = slot
        inuse = self._sp_inuse[s]
        objs = self._cls_objs[c]
        g = inuse * NGROUPS // objs if inuse < objs else FULL
        inuse -= 1
        self._sp_inuse[s] = inuse
        self._size[handle] = 0
        self._free_handles.append(handle)
        self._cls_inuse[c] -= 1
        self.objects -= 1
        self.bytes -= size
        if inuse == 0:
            if g != FULL:
                self._unlink(s, c, g)
            self._drop_span(s, c)
            return
        ng = inuse * NGROUPS // objs
        if ng != g:
            if g != FULL:
                self._unlink(s, c, g)
            self._link(s, c, ng)

    def lru_victims(self, cls: int) -> list[int]:
        """zsmalloc keeps no LRU: its user reclaims by its own page LRU."""
        return []

    def note_evicted(self, cls: int) -> None:
        """No own LRU, so nothing to count."""

    def restore(self, handle: int) -> None:
        """Nothing to undo (no LRU)."""

    # ---- compaction ----------------------------------------------------------------------

    def _wasted_spans(self, c: int) -> int:
        """Whole spans' worth of free slots in class ``c`` (what compaction could free)."""
        objs = self._cls_objs[c]
        return (self._cls_spans[c] * objs - self._cls_inuse[c]) // objs

    def compactable_frames(self) -> int:
        return sum(self._wasted_spans(c) * self._cls_k[c] for c in range(len(CLASSES)))

    def compact(self, max_moves: int) -> int:
        """Per class, empty the least used spans into the fullest ones (as zsmalloc's
        __zs_compact); returns the objects moved. Emptied spans go back to the source
        and count in ``pages_compacted``."""
        moved = 0
        for c in range(len(CLASSES)):
            while moved < max_moves and self._wasted_spans(c) > 0:
                done = self._drain_one(c, max_moves - moved)
                if done <= 0:
                    break
                moved += done
        return moved

    def _drain_one(self, c: int, budget: int) -> int:
        """Move up to ``budget`` objects out of the least used span of class ``c`` into
        the fullest other spans; -1 when there is nowhere to move them."""
        mask = self._mask[c]
        if not mask:
            return -1
        lo = (mask & -mask).bit_length() - 1
        src = self._heads[c << GROUP_SHIFT | lo]
        objs = self._cls_objs[c]
        unit = self._cls_size16[c]
        sizes, locs, mem = self._size, self._loc, self._mem
        sp_free, sp_inuse, sp_start = self._sp_free, self._sp_inuse, self._sp_start
        slots = self._cls_slots[c]
        self._unlink(src, c, lo)  # isolated: never its own destination
        src_base = self._sp_base[src]
        moved = 0
        dst = -1
        dst_g = FULL
        for i in range(objs):
            if moved >= budget:
                break
            h = slots[src_base + i]
            if h < 0:
                continue
            if dst < 0:
                dmask = self._mask[c]
                if not dmask:
                    break
                dst_g = dmask.bit_length() - 1
                dst = self._heads[c << GROUP_SHIFT | dst_g]
                self._unlink(dst, c, dst_g)
            dbase = self._sp_base[dst]
            dslot = sp_free[dst]
            sp_free[dst] = -2 - slots[dbase + dslot]
            slots[dbase + dslot] = h
            new = sp_start[dst] + dslot * unit
            n = sizes[h]
            so = locs[h] << UNIT_SHIFT
            do = new << UNIT_SHIFT
            mem[do : do + n] = mem[so : so + n]
            locs[h] = new
            slots[src_base + i] = -2 - sp_free[src]
            sp_free[src] = i
            sp_inuse[src] -= 1
            inuse = sp_inuse[dst] + 1
            sp_inuse[dst] = inuse
            moved += 1
            if inuse == objs:
                dst = -1
        if dst >= 0:
            self._link(dst, c, sp_inuse[dst] * NGROUPS // objs)
        left = sp_inuse[src]
        if left == 0:
            self._drop_span(src, c)
            self.pages_compacted += self._cls_k[c]
        else:
            self._link(src, c, left * NGROUPS // objs)
        return moved if moved or left == 0 else -1

    # ---- accounting (stats, tests) ---------------------------------------------------

    def _live_spans(self) -> list[int]:
        return [s for s in range(len(self._sp_inuse)) if self._sp_inuse[s]]

    def frames_held(self) -> dict[int, str]:
        """Every frame of every span: "zs", or "zs-huge" for the huge class."""
        out: dict[int, str] = {}
        for s in self._live_spans():
            c = self._sp_class[s]
            kind = "zs-huge" if c == HUGE_CLASS else "zs"
            first = self._sp_start[s] >> FRAME_UNITS_SHIFT
            for f in range(first, first + self._cls_k[c]):
                out[f] = kind
        return out

    def stats(self) -> dict[str, int]:
        return {
            "zs_objects": self.objects,
            "zs_bytes": self.bytes,
            "zs_frames": self.frames,
            "zs_spans": self.spans,
            "zs_huge_objects": self._cls_inuse[HUGE_CLASS],
            "zs_compactable_frames": self.compactable_frames(),
            "pages_compacted": self.pages_compacted,
        }

    def metadata_bytes(self) -> int:
        """Every column and list at its allocated size (sys.getsizeof counts capacity)."""
        cols: list[array[int]] = [
            self._cls_size16,
            self._cls_k,
            self._cls_objs,
            self._cls_inuse,
            self._cls_spans,
            self._mask,
            self._heads,
            self._sp_class,
            self._sp_inuse,
            self._sp_free,
            self._sp_start,
            self._sp_base,
            self._sp_next,
            self._sp_prev,
            self._span_free,
            self._frame_span,
            self._loc,
            self._size,
            self._free_handles,
        ]
        total = sum(sys.getsizeof(a) for a in cols)
        for group in (self._cls_chain, self._cls_slots, self._cls_free_segs):
            total += sys.getsizeof(group) + sum(sys.getsizeof(a) for a in group)
        return total

    def check(self) -> list[str]:
        """Every way the columns disagree, as sentences (none: ``[]``). Walks everything."""
        problems: list[str] = []
        nspans = len(self._sp_class)
        listed: dict[int, int] = {}  # span -> group it is linked in
        for c in range(len(CLASSES)):
            for g in range(NGROUPS):
                s = self._heads[c << GROUP_SHIFT | g]
                prev = -1
                seen = 0
                while s >= 0 and seen <= nspans:
                    if s in listed:
                        problems.append(f"span {s} is on two fullness lists (or a cycle)")
                        break
                    listed[s] = c << GROUP_SHIFT | g
                    if self._sp_prev[s] != prev:
                        problems.append(f"span {s}: back link {self._sp_prev[s]}, not {prev}")
                    prev = s
                    s = self._sp_next[s]
                    seen += 1
                if bool(self._mask[c] >> g & 1) != (self._heads[c << GROUP_SHIFT | g] >= 0):
                    problems.append(f"class {c}: mask bit {g} disagrees with its list")
        named: dict[int, int] = {}  # handle -> span naming it
        cls_inuse = [0] * len(CLASSES)
        cls_spans = [0] * len(CLASSES)
        frames = nbytes = 0
        free_spans = set(self._span_free)
        if len(free_spans) != len(self._span_free):
            problems.append("a span id is on the free span stack twice")
        for s in range(nspans):
            inuse = self._sp_inuse[s]
            if not inuse:
                if s not in free_spans:
                    problems.append(f"span {s}: empty but not freed")
                if s in listed:
                    problems.append(f"span {s}: freed but on a fullness list")
                continue
            if s in free_spans:
                problems.append(f"span {s}: in use but on the free span stack")
            c = self._sp_class[s]
            size16, k, objs = self._cls_size16[c], self._cls_k[c], self._cls_objs[c]
            cls_inuse[c] += inuse
            cls_spans[c] += 1
            frames += k
            start = self._sp_start[s]
            first = start >> FRAME_UNITS_SHIFT
            problems.extend(
                f"span {s}: frame {f} not mapped to it"
                for f in range(first, first + k)
                if f >= len(self._frame_span) or self._frame_span[f] != s
            )
            want = inuse * NGROUPS // objs if inuse < objs else FULL
            got = listed.get(s, c << GROUP_SHIFT | FULL)
            if got != c << GROUP_SHIFT | want:
                problems.append(f"span {s}: {inuse}/{objs} used, listed as {got}, not {want}")
            base = self._sp_base[s]
            slots = self._cls_slots[c]
            used = 0
            for i in range(objs):
                h = slots[base + i]
                if h < 0:
                    continue
                used += 1
                if h >= len(self._size) or not self._size[h]:
                    problems.append(f"span {s} slot {i}: names handle {h}, not allocated")
                    continue
                if h in named:
                    problems.append(f"handle {h} named by spans {named[h]} and {s}")
                named[h] = s
                size = self._size[h]
                nbytes += size
                if self._size_class[(size + 15) >> UNIT_SHIFT] != c:
                    problems.append(f"handle {h}: size {size} is not of class {c}")
                if self._loc[h] != start + i * size16:
                    problems.append(f"handle {h}: location disagrees with span {s} slot {i}")
            if used != inuse:
                problems.append(f"span {s}: {used} slots used, in-use count {inuse}")
            chain = 0
            i = self._sp_free[s]
            while i >= 0 and chain <= objs:
                if slots[base + i] >= 0:
                    problems.append(f"span {s}: free chain reaches used slot {i}")
                    break
                chain += 1
                i = -2 - slots[base + i]
            if chain != objs - inuse:
                problems.append(f"span {s}: free chain has {chain} slots, {objs - inuse} free")
        for f, s in enumerate(self._frame_span):
            if s >= 0 and (s >= nspans or not self._sp_inuse[s]):
                problems.append(f"frame {f}: mapped to dead span {s}")
        free_handles = set(self._free_handles)
        if len(free_handles) != len(self._free_handles):
            problems.append("a handle is on the free handle stack twice")
        for h in range(len(self._size)):
            if self._size[h]:
                if h not in named:
                    problems.append(f"handle {h}: allocated but in no slot")
                if h in free_handles:
                    problems.append(f"handle {h}: allocated and on the free stack")
            elif h not in free_handles:
                problems.append(f"handle {h}: free but not on the free stack (leaked)")
        if list(self._cls_inuse) != cls_inuse or list(self._cls_spans) != cls_spans:
            problems.append("per-class object or span counts disagree with the spans")
        if (self.objects, self.bytes) != (len(named), nbytes):
            problems.append(
                f"counters say {self.objects} objects / {self.bytes} B, "
                f"spans hold {len(named)} / {nbytes}"
            )
        if self.frames != frames or self.spans != sum(cls_spans):
            problems.append(f"counters say {self.frames} frames, spans hold {frames}")
        return problems
