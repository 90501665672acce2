"""zsmalloc: compressed objects packed by size class into spans of 1-4 frames, with a
shared tail area of *mixed* frames.

The layout follows the kernel's zsmalloc (Documentation/mm/zsmalloc.rst), in Python:

* Sizes are rounded up to 16 bytes. Each class size S keeps its objects in *spans* of k
  contiguous frames (k in 1..4, the k that wastes the least of ``k*4096 % S``); objects
  sit at ``slot * S`` from the span start and may straddle frame boundaries, which costs
  nothing here because the arena is one contiguous mapping. Classes with the same
  (k, objects per span) are merged into the largest of them (no extra waste, fewer
  half-empty spans); the last class, one object per frame, is the *huge* class.
* A span is only worth opening for a class that will fill it: a class holding fewer
  than ``TAIL_SPANS`` spans' worth of objects keeps them in *mixed frames* instead,
  one-frame spans where objects of any size are packed back to back at 16-byte
  granularity behind a bump pointer. A few mixed frames are *open* (first fit). Without
  that, the last, partly filled span of each of ~70 classes costs about 13 % at a few
  thousand pages. A mixed frame is also the fallback when no k contiguous frames are
  left (a nearly full budget still stores objects until it is full).
* Allocation goes to the class's *current* span until it is full; a span that gets a
  free slot while full is pushed on its class's stack of partial spans (entries are
  checked when popped, so no unlinking: a stale entry is skipped). An empty span or
  mixed frame goes back to the frame source at once.
* :meth:`Zsmalloc.compact` empties the least used spans of a class into its fullest,
  moves the objects of sparse mixed frames and of each class's last sparse span into
  mixed frames with room (a sparse multi-frame span may become a mixed frame itself),
  through reverse maps slot -> handle; handles stay valid.

Everything lives in ``array`` columns, no Python object per object or span: per handle
its location (arena offset / 16) and exact size; per span (class spans and mixed frames
share ids) its class, in-use count (mixed: live 16-byte units), free slot chain head
(mixed: bump pointer), start and the base of its slots in the shared slot array (an
int32 per slot: >= 0 the handle there, < 0 the next free slot; mixed frames have a
small handle array each instead); per frame the span holding it.
"""

from __future__ import annotations

import sys
from array import array
from typing import Final

from tmem.allocator import PAGE_SIZE, FrameSource

MAX_SPAN_FRAMES: Final = 4
UNIT_SHIFT: Final = 4  # sizes and locations in 16-byte units
FRAME_UNITS_SHIFT: Final = 8  # a frame is 256 units
FRAME_UNITS: Final = PAGE_SIZE >> UNIT_SHIFT
MIXED: Final = 255  # the class column's value for a mixed frame
# A class opens spans once it holds this many spans' worth of objects; below, its
# objects go to mixed frames (measured on the corpora: 2 beats 1 and 0.5 at 1x and 8x).
TAIL_SPANS: Final = 2
NOPEN: Final = 16  # open mixed frames (first fit among them); 16 beats 4 and 8 on the corpora
# Huge objects up to this many units go to a mixed frame of their own, whose rest takes
# small objects (a huge span wastes the rest of its frame).
HUGE_MIXED_UNITS: Final = 250
MAX_PLAN_MISSES: Final = 8  # compaction planning stops after this many sources that fit nowhere


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
assert len(CLASSES) < MIXED


class Zsmalloc:
    """The zsmalloc allocator over the frames of ``frames`` (an Allocator)."""

    name = "zsmalloc"
    max_size = PAGE_SIZE
    keeps_lru = False
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
        self._cls_free_segs = [array("I") for _ in range(n)]  # slot bases of dead spans
        self._cls_inuse = array("q", bytes(8 * n))  # objects in the class's spans
        self._cls_mixed = array("q", bytes(8 * n))  # objects of the class in mixed frames
        self._cls_spans = array("q", bytes(8 * n))
        self._cur = array("i", [-1]) * n  # the span allocations go to; -1: pick one
        self._partial = [array("i") for _ in range(n)]  # non-full spans (stale entries too)
        # span columns (span ids are recycled through _span_free); mixed frames too
        self._sp_class = array("B")
        self._sp_inuse = array("H")  # objects; mixed: live units
        self._sp_free = array("h")  # first free slot, -1: none; mixed: bump (units)
        self._sp_start = array(loc_code)  # arena offset / 16
        self._sp_base = array("I")  # slot 0's index in _slots; mixed: its _mx_rev index
        self._span_free = array("i")
        self._slots = array("i")  # per slot: >= 0 its handle, < 0: -2 - next free slot
        self._frame_span = array("i")  # -1: not ours; grows to the highest frame held
        # mixed frames: handles in placement (= address) order, -1 for freed ones
        self._mx_rev: list[array[int]] = []
        self._mx_rev_free = array("i")
        self._mixed: set[int] = set()
        self._open = array("i")
        # handle columns
        self._loc = array(loc_code)  # arena offset / 16
        self._size = array("H")  # exact size; 0: a free handle
        self._free_handles = array("i")
        # counters
        self.frames = 0
        self.spans = 0  # class spans (mixed frames not included)
        self.mixed_objects = 0
        self.pages_compacted = 0

    # ---- spans -----------------------------------------------------------------------

    def _new_span_id(self) -> int:
        if self._span_free:
            return self._span_free.pop()
        s = len(self._sp_class)
        self._sp_class.append(0)
        self._sp_inuse.append(0)
        self._sp_free.append(0)
        self._sp_start.append(0)
        self._sp_base.append(0)
        return s

    def _map_frames(self, first: int, k: int, s: int) -> None:
        fs = self._frame_span
        if len(fs) < first + k:
            fs.extend(array("i", [-1]) * (first + k - len(fs)))
        for f in range(first, first + k):
            fs[f] = s

    def _new_span(self, c: int) -> int:
        """A fresh empty span of class ``c``, or -1 (no k contiguous frames)."""
        k = self._cls_k[c]
        first = self._frames.take(k)
        if first < 0:
            return -1
        objs = self._cls_objs[c]
        slots = self._slots
        segs = self._cls_free_segs[c]
        if segs:
            base = segs.pop()
            slots[base : base + objs] = self._cls_chain[c]
        else:
            base = len(slots)
            slots.extend(self._cls_chain[c])
        s = self._new_span_id()
        self._sp_class[s] = c
        self._sp_inuse[s] = 0
        self._sp_free[s] = 0
        self._sp_start[s] = first << FRAME_UNITS_SHIFT
        self._sp_base[s] = base
        self._map_frames(first, k, s)
        self._cls_spans[c] += 1
        self.spans += 1
        self.frames += k
        return s

    def _drop_span(self, s: int, c: int) -> None:
        """Give an empty span's frames back (stale stack entries are skipped later)."""
        k = self._cls_k[c]
        first = self._sp_start[s] >> FRAME_UNITS_SHIFT
        fs = self._frame_span
        for f in range(first, first + k):
            fs[f] = -1
        if self._cur[c] == s:
            self._cur[c] = -1
        self._cls_free_segs[c].append(self._sp_base[s])
        if len(self._partial[c]) > 2 * self._cls_spans[c] + 16:  # stale entries pile up
            self._partial[c] = array("i", self._partials(c))
        self._sp_inuse[s] = 0
        self._span_free.append(s)
        self._cls_spans[c] -= 1
        self.spans -= 1
        self.frames -= k
        self._frames.give(first, k)

    def _push_partial(self, s: int, c: int) -> None:
        self._partial[c].append(s)

    def _partials(self, c: int) -> list[int]:
        """The class's non-full spans other than the current one, each once, as on its
        stack (bottom first)."""
        objs = self._cls_objs[c]
        cur = self._cur[c]
        seen: set[int] = set()
        out: list[int] = []
        sp_class, sp_inuse = self._sp_class, self._sp_inuse
        for s in self._partial[c]:
            if s == cur or s in seen or sp_class[s] != c or not 0 < sp_inuse[s] < objs:
                continue
            seen.add(s)
            out.append(s)
        return out

    # ---- the Allocator interface -------------------------------------------------------

    def alloc(self, size: int, cls: int) -> int:
        """A handle for ``size`` bytes, or -1 when the frame source has no room. The put
        hot path: the class's current span takes it, a few array operations (columns in
        locals, no method call)."""
        if size < 1 or size > PAGE_SIZE:
            raise ValueError(f"object size {size} outside 1..{PAGE_SIZE}")
        c = self._size_class[(size + 15) >> UNIT_SHIFT]
        s = self._cur[c]
        if s < 0:  # the current span filled up: a partial one (stale entries skipped)
            stack = self._partial[c]
            objs = self._cls_objs[c]
            while stack:
                s = stack.pop()
                if self._sp_class[s] == c and 0 < self._sp_inuse[s] < objs:
                    break
            else:
                return self._alloc_slow(size, c)
            self._cur[c] = s
        slots = self._slots
        sp_free = self._sp_free
        slot = sp_free[s]
        i = self._sp_base[s] + slot
        sp_free[s] = -2 - slots[i]
        sp_inuse = self._sp_inuse
        inuse = sp_inuse[s] + 1
        sp_inuse[s] = inuse
        if inuse == self._cls_objs[c]:
            self._cur[c] = -1
        free_handles = self._free_handles
        h = free_handles.pop() if free_handles else self._grow_handles()
        slots[i] = h
        self._loc[h] = self._sp_start[s] + slot * self._cls_size16[c]
        self._size[h] = size
        self._cls_inuse[c] += 1
        return h

    def _alloc_slow(self, size: int, c: int) -> int:
        """The class has no span with room: the tail area while the class is small, else a
        new span (the tail area when no k frames are left)."""
        objs = self._cls_objs[c]
        units = (size + 15) >> UNIT_SHIFT
        if objs > 1:
            if self._cls_inuse[c] + self._cls_mixed[c] < TAIL_SPANS * objs:
                return self._alloc_mixed(size, units)
        elif units <= HUGE_MIXED_UNITS:
            return self._alloc_mixed(size, units)
        s = self._new_span(c)
        if s < 0:
            return self._alloc_mixed(size, units)
        self._cur[c] = s
        return self.alloc(size, 0)

    def _grow_handles(self) -> int:
        """A handle never used before (the handle columns grow by one)."""
        self._size.append(0)
        self._loc.append(0)
        return len(self._size) - 1

    def _alloc_mixed(self, size: int, units: int) -> int:
        """A handle in the first open mixed frame with room, or in a new one."""
        opn = self._open
        sp_free = self._sp_free
        for m in opn:
            if sp_free[m] + units <= FRAME_UNITS:
                break
        else:
            m = self._new_mixed()
            if m < 0:  # no frame left: any mixed frame with room at its end will do
                for m in self._mixed:
                    if sp_free[m] + units <= FRAME_UNITS:
                        break
                else:
                    return -1
        h = self._free_handles.pop() if self._free_handles else self._grow_handles()
        self._loc[h] = self._attach_mixed(h, m, size)
        self._size[h] = size
        return h

    def _new_mixed(self) -> int:
        """A fresh mixed frame, open (closing the open one with the least room), or -1."""
        first = self._frames.take(1)
        if first < 0:
            return -1
        m = self._new_span_id()
        self._sp_class[m] = MIXED
        self._sp_inuse[m] = 0
        self._sp_free[m] = 0
        self._sp_start[m] = first << FRAME_UNITS_SHIFT
        if self._mx_rev_free:
            r = self._mx_rev_free.pop()
        else:
            r = len(self._mx_rev)
            self._mx_rev.append(array("i"))
        self._sp_base[m] = r
        self._map_frames(first, 1, m)
        self._mixed.add(m)
        self.frames += 1
        opn = self._open
        if len(opn) >= NOPEN:
            fullest = 0
            for j in range(1, len(opn)):
                if self._sp_free[opn[j]] > self._sp_free[opn[fullest]]:
                    fullest = j
            del opn[fullest]
        opn.append(m)
        return m

    def _attach_mixed(self, h: int, m: int, size: int) -> int:
        """Place handle ``h`` (``size`` bytes) at the bump pointer of mixed frame ``m``
        (which has room); returns its new location. Its bytes are the caller's to copy."""
        units = (size + 15) >> UNIT_SHIFT
        bump = self._sp_free[m]
        self._sp_free[m] = bump + units
        self._sp_inuse[m] += units
        self._mx_rev[self._sp_base[m]].append(h)
        self._cls_mixed[self._size_class[units]] += 1
        self.mixed_objects += 1
        if bump + units == FRAME_UNITS and m in self._open:
            self._open.remove(m)
        return self._sp_start[m] + bump

    def _detach_mixed(self, h: int, m: int, size: int) -> None:
        """Take handle ``h`` out of mixed frame ``m``; an emptied frame goes back."""
        units = (size + 15) >> UNIT_SHIFT
        rev = self._mx_rev[self._sp_base[m]]
        j = rev.index(h)
        if j == len(rev) - 1:  # the last object: the bump pointer comes back
            rev.pop()
            while rev and rev[-1] < 0:
                rev.pop()
            if rev:
                last = rev[-1]
                end = self._loc[last] + ((self._size[last] + 15) >> UNIT_SHIFT)
                self._sp_free[m] = end - self._sp_start[m]
            else:
                self._sp_free[m] = 0
        else:
            rev[j] = -1
        self._sp_inuse[m] -= units
        self._cls_mixed[self._size_class[units]] -= 1
        self.mixed_objects -= 1
        if not self._sp_inuse[m]:
            self._drop_mixed(m)

    def _drop_mixed(self, m: int) -> None:
        first = self._sp_start[m] >> FRAME_UNITS_SHIFT
        self._frame_span[first] = -1
        r = self._sp_base[m]
        del self._mx_rev[r][:]
        self._mx_rev_free.append(r)
        self._mixed.discard(m)
        if m in self._open:
            self._open.remove(m)
        self._sp_inuse[m] = 0
        self._sp_class[m] = 0
        self._span_free.append(m)
        self.frames -= 1
        self._frames.give(first, 1)

    def span(self, handle: int) -> tuple[int, int]:
        """The arena byte range of the object (the get hot path: two array reads)."""
        start = self._loc[handle] << UNIT_SHIFT
        return start, start + self._size[handle]

    def free(self, handle: int) -> None:
        """Release the object; an emptied span or mixed frame goes back at once."""
        sizes = self._size
        size = sizes[handle]
        if not size:
            raise ValueError(f"handle {handle} is not allocated")
        loc = self._loc[handle]
        s = self._frame_span[loc >> FRAME_UNITS_SHIFT]
        c = self._sp_class[s]
        sizes[handle] = 0
        self._free_handles.append(handle)
        if c == MIXED:
            self._detach_mixed(handle, s, size)
            return
        sp_free = self._sp_free
        slot = (loc - self._sp_start[s]) // self._cls_size16[c]
        self._slots[self._sp_base[s] + slot] = -2 - sp_free[s]
        sp_free[s] = slot
        sp_inuse = self._sp_inuse
        inuse = sp_inuse[s] - 1
        sp_inuse[s] = inuse
        self._cls_inuse[c] -= 1
        if inuse == 0:
            self._drop_span(s, c)
        elif inuse + 1 == self._cls_objs[c]:  # was full: has room again
            self._partial[c].append(s)

    def lru_victims(self, cls: int) -> list[int]:
        """zsmalloc keeps no LRU: its user reclaims by its own page LRU."""
        return []

    def note_evicted(self, cls: int) -> None:
        """No own LRU, so nothing to count."""

    def restore(self, handle: int) -> None:
        """Nothing to undo (no LRU)."""

    # ---- moving objects (compaction) ---------------------------------------------------

    def _detach_span(self, h: int, s: int, c: int, loc: int) -> None:
        """Take handle ``h`` out of class span ``s``; an emptied span goes back and counts
        as compacted."""
        slot = (loc - self._sp_start[s]) // self._cls_size16[c]
        self._slots[self._sp_base[s] + slot] = -2 - self._sp_free[s]
        self._sp_free[s] = slot
        inuse = self._sp_inuse[s] - 1
        self._sp_inuse[s] = inuse
        self._cls_inuse[c] -= 1
        if inuse == 0:
            self._drop_span(s, c)
            self.pages_compacted += self._cls_k[c]
        elif inuse + 1 == self._cls_objs[c]:
            self._push_partial(s, c)

    def _attach_span(self, h: int, s: int, c: int) -> int:
        """Put handle ``h`` in a free slot of class span ``s``; returns its location."""
        slots = self._slots
        slot = self._sp_free[s]
        i = self._sp_base[s] + slot
        self._sp_free[s] = -2 - slots[i]
        slots[i] = h
        self._sp_inuse[s] += 1
        self._cls_inuse[c] += 1
        return self._sp_start[s] + slot * self._cls_size16[c]

    def _relocate(self, h: int, new: int) -> None:
        """Copy the object's bytes to unit ``new`` and point the handle there (before
        detaching it: a frame given back may read as zeros)."""
        n = self._size[h]
        so = self._loc[h] << UNIT_SHIFT
        do = new << UNIT_SHIFT
        mem = self._mem
        mem[do : do + n] = mem[so : so + n]

    def _move_to_mixed(self, h: int, m: int) -> None:
        size = self._size[h]
        old = self._loc[h]
        new = self._attach_mixed(h, m, size)
        self._relocate(h, new)
        self._loc[h] = new
        s = self._frame_span[old >> FRAME_UNITS_SHIFT]
        c = self._sp_class[s]
        if c == MIXED:
            before = self.frames
            self._detach_mixed(h, s, size)
            self.pages_compacted += before - self.frames
        else:
            self._detach_span(h, s, c, old)

    def _defrag(self, m: int) -> None:
        """Slide the live objects of mixed frame ``m`` to its start (room at the end)."""
        rev = self._mx_rev[self._sp_base[m]]
        if self._sp_free[m] == self._sp_inuse[m]:
            return
        mem = self._mem
        loc, sizes = self._loc, self._size
        at = self._sp_start[m]
        live = array("i")
        for h in rev:
            if h < 0:
                continue
            live.append(h)
            old = loc[h]
            if old != at:
                n = sizes[h]
                mem[at << UNIT_SHIFT : (at << UNIT_SHIFT) + n] = bytes(
                    mem[old << UNIT_SHIFT : (old << UNIT_SHIFT) + n]
                )
                loc[h] = at
            at += (sizes[h] + 15) >> UNIT_SHIFT
        rev[:] = live
        self._sp_free[m] = at - self._sp_start[m]

    # ---- compaction ----------------------------------------------------------------------

    def _wasted_spans(self, c: int) -> int:
        """Whole spans' worth of free slots in class ``c`` (what compaction could free)."""
        objs = self._cls_objs[c]
        return (self._cls_spans[c] * objs - self._cls_inuse[c]) // objs

    def compactable_frames(self) -> int:
        """Frames compaction could give back, estimated cheaply (O(classes + mixed
        frames), no planning): whole spans' worth of free slots per class, plus the
        mixed frames' free room in whole frames. Its user asks often (after frees);
        :meth:`compact` plans for real."""
        gain = 0
        for c in range(len(CLASSES)):
            gain += self._wasted_spans(c) * self._cls_k[c]
        mixed = self._mixed
        if len(mixed) > 1:
            sp_inuse = self._sp_inuse
            used = 0
            for m in mixed:
                used += sp_inuse[m]
            gain += (len(mixed) * FRAME_UNITS - used) // FRAME_UNITS
        return gain

    def compact(self, max_moves: int) -> int:
        """Empty the least used spans of each class into its fullest ones (as zsmalloc's
        __zs_compact), then drain sparse mixed frames and sparse last spans into mixed
        frames with room, until nothing more is gained; returns the objects moved.
        Frames given back count in ``pages_compacted``."""
        moved = self._plan(max_moves)[1]  # what compactable_frames() promised, first
        for c in range(len(CLASSES)):
            if moved < max_moves and self._wasted_spans(c) > 0:
                moved += self._compact_class(c, max_moves - moved)
        while moved < max_moves:
            done = self._plan(max_moves - moved)[1]
            if done <= 0:
                break
            moved += done
        self._reopen()
        return moved

    def _compact_class(self, c: int, budget: int) -> int:
        """Drain the class's least used spans into its fullest while whole spans are to
        be gained; returns the objects moved."""
        cur = self._cur[c]
        if cur >= 0:
            self._cur[c] = -1
            self._partial[c].append(cur)
        spans = self._partials(c)
        sp_inuse = self._sp_inuse
        spans.sort(key=lambda s: sp_inuse[s])
        objs = self._cls_objs[c]
        slots = self._slots
        moved = 0
        i, j = 0, len(spans) - 1
        while i < j and moved < budget and self._wasted_spans(c) > 0:
            src, dst = spans[i], spans[j]
            if sp_inuse[dst] == objs:
                j -= 1
                continue
            base = self._sp_base[src]
            for slot in range(objs):
                h = slots[base + slot]
                if h >= 0:
                    break
            old = self._loc[h]
            new = self._attach_span(h, dst, c)
            self._relocate(h, new)
            self._loc[h] = new
            self._detach_span(h, src, c, old)  # drops src when it empties
            moved += 1
            if not sp_inuse[src]:
                i += 1
        self._partial[c] = array("i", [s for s in spans[i:] if 0 < sp_inuse[s] < objs])
        return moved

    def _tail_span(self, c: int) -> int:
        """The least used non-full span of class ``c`` when the class has no whole span to
        gain (its last sparse span), or -1."""
        objs = self._cls_objs[c]
        if objs == 1 or not self._cls_spans[c] or self._wasted_spans(c):
            return -1
        best = -1
        cur = self._cur[c]
        sp_inuse = self._sp_inuse
        if cur >= 0:
            best = cur
        for s in self._partial[c]:
            if (
                self._sp_class[s] == c
                and 0 < sp_inuse[s] < objs
                and (best < 0 or sp_inuse[s] < sp_inuse[best])
            ):
                best = s
        return best

    def _plan(self, budget: int) -> tuple[int, int]:
        """Choose sources to empty (sparse mixed frames, each class's last sparse span)
        and where their objects go (first fit into the fullest mixed frames with room;
        a sparse span of 2-4 frames whose objects fit one frame becomes a mixed frame).
        ``budget < 0``: only count; else also move, at most ``budget`` objects.
        Returns (frames gained, objects moved); both runs decide alike."""
        execute = budget >= 0
        sizes = self._size
        sp_inuse = self._sp_inuse
        mixed = sorted(self._mixed, key=lambda m: -sp_inuse[m])
        dst_ids = array("i", mixed)
        dst_room = array("i", [FRAME_UNITS - sp_inuse[m] for m in mixed])
        # sources, cheapest first: units to move per frame gained
        sources: list[tuple[int, int]] = [(sp_inuse[m], m) for m in mixed]
        for c in range(len(CLASSES)):
            s = self._tail_span(c)
            if s >= 0:
                k = self._cls_k[c]
                sources.append((sp_inuse[s] * self._cls_size16[c] // k, s))
        if not sources:
            return 0, 0
        sources.sort()
        locked: set[int] = set()  # mixed frames that took objects: not sources any more
        defragged: set[int] = set()
        gain = moved = misses = 0
        for _cost, src in sources:
            if src in locked:
                continue
            c = self._sp_class[src]
            objects = self._objects_of(src)
            if execute and moved + len(objects) > budget:
                break
            place = array("i")  # index into dst_ids per object
            taken: dict[int, int] = {}
            fits = True
            for h in objects:
                units = (sizes[h] + 15) >> UNIT_SHIFT
                for d in range(len(dst_ids)):
                    if dst_ids[d] != src and dst_room[d] - taken.get(d, 0) >= units:
                        taken[d] = taken.get(d, 0) + units
                        place.append(d)
                        break
                else:
                    fits = False
                    break
            if fits:
                for d, units in taken.items():
                    dst_room[d] -= units
                    locked.add(dst_ids[d])
                gain += 1 if c == MIXED else self._cls_k[c]
                if c == MIXED:
                    for d in range(len(dst_ids)):
                        if dst_ids[d] == src:
                            dst_room[d] = -1
                if execute:
                    for j, h in enumerate(objects):
                        m = dst_ids[place[j]]
                        if m not in defragged:
                            self._defrag(m)
                            defragged.add(m)
                        self._move_to_mixed(h, m)
                    moved += len(objects)
                continue
            total = 0
            for h in objects:
                total += (sizes[h] + 15) >> UNIT_SHIFT
            if c != MIXED and self._cls_k[c] > 1 and total <= FRAME_UNITS:
                gain += self._cls_k[c] - 1
                m = self._convert(src, c, objects) if execute else -2
                moved += len(objects) if execute else 0
                dst_ids.append(m)
                dst_room.append(FRAME_UNITS - total)
                locked.add(m)
                defragged.add(m)
                continue
            misses += 1
            if misses >= MAX_PLAN_MISSES:
                break
        return gain, moved

    def _objects_of(self, s: int) -> list[int]:
        """The handles in span or mixed frame ``s``, in address order."""
        if self._sp_class[s] == MIXED:
            return [h for h in self._mx_rev[self._sp_base[s]] if h >= 0]
        base = self._sp_base[s]
        slots = self._slots
        return [h for h in slots[base : base + self._cls_objs[self._sp_class[s]]] if h >= 0]

    def _convert(self, s: int, c: int, objects: list[int]) -> int:
        """Turn sparse span ``s`` (2-4 frames) into a mixed frame holding its objects:
        the span goes back, one frame comes straight back as a mixed frame."""
        mem = self._mem
        saved: list[bytes] = []
        for h in objects:
            start = self._loc[h] << UNIT_SHIFT
            saved.append(bytes(mem[start : start + self._size[h]]))
        for h in objects:
            self._detach_span(h, s, c, self._loc[h])  # the last one drops the span
        m = self._new_mixed()
        if m < 0:  # cannot happen: k frames just went back
            raise RuntimeError("no frame for a span being turned into a mixed frame")
        self.pages_compacted -= 1
        for h, data in zip(objects, saved, strict=True):
            new = self._attach_mixed(h, m, len(data))
            start = new << UNIT_SHIFT
            mem[start : start + len(data)] = data
            self._loc[h] = new
        return m

    def _reopen(self) -> None:
        """After compaction: the mixed frames with the most room are the open ones."""
        sp_free = self._sp_free
        roomy = sorted(
            (m for m in self._mixed if sp_free[m] < FRAME_UNITS), key=lambda m: sp_free[m]
        )
        self._open = array("i", roomy[:NOPEN])

    # ---- accounting (stats, tests) ---------------------------------------------------

    def frames_held(self) -> dict[int, str]:
        """Every frame held: "zs", "zs-huge" for the huge class, "zs-mixed"."""
        out: dict[int, str] = {}
        for s in range(len(self._sp_inuse)):
            if not self._sp_inuse[s]:
                continue
            c = self._sp_class[s]
            first = self._sp_start[s] >> FRAME_UNITS_SHIFT
            if c == MIXED:
                out[first] = "zs-mixed"
                continue
            kind = "zs-huge" if c == HUGE_CLASS else "zs"
            for f in range(first, first + self._cls_k[c]):
                out[f] = kind
        return out

    def stats(self) -> dict[str, int]:
        return {
            "zs_objects": int(sum(self._cls_inuse)) + self.mixed_objects,
            "zs_bytes": int(sum(self._size)),
            "zs_frames": self.frames,
            "zs_spans": self.spans,
            "zs_mixed_frames": len(self._mixed),
            "zs_mixed_objects": self.mixed_objects,
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
            self._cls_mixed,
            self._cls_spans,
            self._cur,
            self._sp_class,
            self._sp_inuse,
            self._sp_free,
            self._sp_start,
            self._sp_base,
            self._span_free,
            self._slots,
            self._frame_span,
            self._mx_rev_free,
            self._open,
            self._loc,
            self._size,
            self._free_handles,
        ]
        total = sum(sys.getsizeof(a) for a in cols)
        for group in (self._cls_chain, self._cls_free_segs, self._partial, self._mx_rev):
            total += sys.getsizeof(group) + sum(sys.getsizeof(a) for a in group)
        total += sys.getsizeof(self._mixed) + 28 * len(self._mixed)
        return total

    def check(self) -> list[str]:
        """Every way the columns disagree, as sentences (none: ``[]``). Walks everything."""
        problems: list[str] = []
        nspans = len(self._sp_class)
        named: dict[int, int] = {}  # handle -> span naming it
        ncls = len(CLASSES)
        cls_inuse = [0] * ncls
        cls_mixed = [0] * ncls
        cls_spans = [0] * ncls
        frames = nbytes = mixed_objects = 0
        free_spans = set(self._span_free)
        if len(free_spans) != len(self._span_free):
            problems.append("a span id is on the free span stack twice")
        mixed_seen: set[int] = set()
        partial_sets = [set(self._partial[c]) for c in range(ncls)]
        for c in range(ncls):
            s = self._cur[c]
            if s >= 0 and (
                s >= nspans
                or self._sp_class[s] != c
                or not 0 < self._sp_inuse[s] < self._cls_objs[c]
            ):
                problems.append(f"class {c}: current span {s} is not a non-full span of it")
        for s in range(nspans):
            inuse = self._sp_inuse[s]
            if not inuse:
                if s not in free_spans:
                    problems.append(f"span {s}: empty but not freed")
                continue
            if s in free_spans:
                problems.append(f"span {s}: in use but on the free span stack")
            start = self._sp_start[s]
            first = start >> FRAME_UNITS_SHIFT
            c = self._sp_class[s]
            if c == MIXED:
                mixed_seen.add(s)
                frames += 1
                if first >= len(self._frame_span) or self._frame_span[first] != s:
                    problems.append(f"mixed frame {s}: frame {first} not mapped to it")
                at = 0
                live = 0
                rev = self._mx_rev[self._sp_base[s]]
                if rev and rev[-1] < 0:
                    problems.append(f"mixed frame {s}: handle list ends in a freed entry")
                for h in rev:
                    if h < 0:
                        continue
                    if h >= len(self._size) or not self._size[h]:
                        problems.append(f"mixed frame {s}: names handle {h}, not allocated")
                        continue
                    if h in named:
                        problems.append(f"handle {h} named by spans {named[h]} and {s}")
                    named[h] = s
                    size = self._size[h]
                    units = (size + 15) >> UNIT_SHIFT
                    off = self._loc[h] - start
                    if off < at:
                        problems.append(f"mixed frame {s}: handle {h} overlaps or is out of order")
                    at = off + units
                    live += units
                    nbytes += size
                    mixed_objects += 1
                    cls_mixed[self._size_class[units]] += 1
                if at > FRAME_UNITS or at != self._sp_free[s]:
                    problems.append(
                        f"mixed frame {s}: objects end at {at}, bump {self._sp_free[s]}"
                    )
                if live != inuse:
                    problems.append(f"mixed frame {s}: {live} live units, counter {inuse}")
                continue
            if c >= ncls:
                problems.append(f"span {s}: class {c} out of range")
                continue
            size16, k, objs = self._cls_size16[c], self._cls_k[c], self._cls_objs[c]
            cls_inuse[c] += inuse
            cls_spans[c] += 1
            frames += k
            problems.extend(
                f"span {s}: frame {f} not mapped to it"
                for f in range(first, first + k)
                if f >= len(self._frame_span) or self._frame_span[f] != s
            )
            if inuse > objs:
                problems.append(f"span {s}: {inuse} objects in {objs} slots")
            if inuse < objs and s != self._cur[c] and s not in partial_sets[c]:
                problems.append(f"span {s}: has room but is neither current nor stacked")
            base = self._sp_base[s]
            slots = self._slots
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
        if mixed_seen != self._mixed:
            problems.append("the set of mixed frames disagrees with the span columns")
        if len(set(self._open)) != len(self._open) or not set(self._open) <= mixed_seen:
            problems.append(f"open mixed frames {list(self._open)} are not distinct live ones")
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
        if list(self._cls_mixed) != cls_mixed or self.mixed_objects != mixed_objects:
            problems.append("per-class mixed object counts disagree with the mixed frames")
        if sum(self._size) != nbytes:
            problems.append(f"handles hold {sum(self._size)} B, spans {nbytes} B")
        if self.frames != frames or self.spans != sum(cls_spans):
            problems.append(f"counters say {self.frames} frames, spans hold {frames}")
        return problems
