"""zbud: up to two compressed pages ("zbuds") per 4096-byte pageframe.

Behaviour follows the zcache2 zbud (kernel-zcache2.md section 3), behind the allocator
interface (:mod:`tmem.allocator`):

* zbud never owns pageframes: it takes one from its :class:`FrameSource` (zcache's
  arena) when no partial frame has room, and gives it back when it empties. When the
  source refuses, :meth:`Zbud.alloc` fails and zcache reclaims.
* Frames are split into 64-byte chunks. Buddy 0 starts at the frame's first byte,
  buddy 1 is right-justified to the frame's end. zcache keeps each page's tmem handle
  in its own per-page columns, so a frame holds only data: up to 4032 bytes a buddy.
  An object of more than 4032 bytes takes a frame alone ("huge").
* Each class (0 = ephemeral, 1 = persistent) has its own unbuddied lists (list *i* =
  frames holding one zbud of *i* chunks) and its own frame LRU, the seed's reclaim unit:
  :meth:`Zbud.lru_victims` hands out both buddies of the LRU frame. Placement is best
  fit: the fullest unbuddied frame that still has room, found in O(1) through a bitmask
  of non-empty lists instead of the kernel's linear scan.
* A frame moves to the MRU end when a zbud is added to it, not when one is removed, so
  hard-to-buddy frames age out first (as in the kernel).
* A frame handed out by :meth:`lru_victims` is a zombie: its data stays readable while
  it is written back or sent to a peer, nothing new lands in it, and it goes back to the
  source once its last zbud is freed (or to the LRU through :meth:`restore`).

Data structures, chosen for puts per second and bytes per page: per-frame columns in
``array`` (about 15 bytes per frame); the LRU is a queue of ``stamp << 32 | frame``
entries where only the entry matching the frame's current stamp counts (a touch
appends, nothing is unlinked; stale entries are skipped at the head and compacted away
when they pile up); unbuddied lists are stacks with the same lazy deletion
(``where[frame]`` names the one list a frame is really on).

A handle for a zbud is the int ``frame << 1 | buddy``.
"""

from __future__ import annotations

import itertools
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Final

from tmem.allocator import EPH, PAGE_SIZE, PERS, FrameSource

__all__ = ["EPH", "MAX_BUDDY_SIZE", "PERS", "Zbud", "chunks"]

CHUNK_SHIFT: Final = 6
CHUNK_SIZE: Final = 1 << CHUNK_SHIFT  # 64
NCHUNKS: Final = PAGE_SIZE >> CHUNK_SHIFT  # 64
MAX_CHUNK: Final = NCHUNKS - 1  # 63
MAX_BUDDY_SIZE: Final = MAX_CHUNK * CHUNK_SIZE  # 4032: two buddies need one chunk apart

# frame flags
F_USED: Final = 1
F_ZOMBIE: Final = 2
F_HUGE: Final = 4  # one object fills the whole frame

_FRAME_MASK: Final = (1 << 32) - 1
# _FITS[size] = bitmask of the unbuddied lists i (one zbud of i chunks) that leave room
# for a zbud of ``size`` bytes: i <= NCHUNKS - chunks(size).
_FITS = tuple(
    (2 << (NCHUNKS - ((s + CHUNK_SIZE - 1) >> CHUNK_SHIFT))) - 1 for s in range(PAGE_SIZE + 1)
)


@dataclass(slots=True)
class ClassCounters:
    """zbud's per-class counters, named as in the kernel's debugfs (section 3.7)."""

    pageframes: int = 0
    zpages: int = 0
    zbytes: int = 0
    cumul_zpages: int = 0
    cumul_zbytes: int = 0
    evicted_pageframes: int = 0
    zombie_count: int = 0  # zombie frames
    zombie_zpages: int = 0  # zpages inside zombie frames
    huge_count: int = 0  # frames holding one object alone
    zpages_max: int = 0  # high-water marks, noted whenever a count is about to drop
    pageframes_max: int = 0

    # A normal (not zombie, not huge) frame holds one or two zbuds, so the buddied and
    # unbuddied counts follow from frames and zpages; the hot path keeps neither.
    @property
    def buddied_count(self) -> int:
        frames = self.pageframes - self.zombie_count - self.huge_count
        return self.zpages - self.zombie_zpages - self.huge_count - frames

    @property
    def unbuddied_count(self) -> int:
        frames = self.pageframes - self.zombie_count - self.huge_count
        return 2 * frames - (self.zpages - self.zombie_zpages - self.huge_count)

    def note_max(self) -> None:
        if self.zpages > self.zpages_max:
            self.zpages_max = self.zpages
        if self.pageframes > self.pageframes_max:
            self.pageframes_max = self.pageframes


def chunks(size: int) -> int:
    """Chunks needed for a zbud of ``size`` bytes."""
    return (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT


class Zbud:
    """The zbud allocator over the frames of a :class:`FrameSource`."""

    name = "zbud"
    max_size = PAGE_SIZE
    keeps_lru = True
    max_mean_size = PAGE_SIZE * 5 // 8  # 2560: past it, pages stop pairing

    def __init__(self, frames: FrameSource) -> None:
        self.frames = frames
        self.arena = frames.memory
        nframes = self.nframes = frames.frames_total
        zeros2 = bytes(2 * nframes)
        self.size0 = array("H", zeros2)  # zbud size in bytes, 0 = empty
        self.size1 = array("H", zeros2)
        self.flags = array("B", bytes(nframes))
        self.cls = array("B", bytes(nframes))
        # the unbuddied stack a frame really is on: i | cls << 6 (i >= 1), 0 = none
        self.where = array("B", bytes(nframes))
        self.stamp = array("Q", bytes(8 * nframes))  # LRU stamp of the frame's last touch
        self._seq = itertools.count(1)  # LRU stamps; 0 marks "no valid entry"
        # Per-class pairs are variable-length tuples on purpose: mypyc boxes a fixed-size
        # tuple into a new object on every self.x[cls], a cost on each put.
        self.lru: tuple[deque[int], ...] = (deque(), deque())
        self.unbuddied: tuple[list[list[int]], ...] = (
            [[] for _ in range(NCHUNKS)],
            [[] for _ in range(NCHUNKS)],
        )
        self.unbuddied_mask = [0, 0]  # bit i set <=> unbuddied stack i may hold entries
        self.counters: tuple[ClassCounters, ...] = (ClassCounters(), ClassCounters())

    # ---- LRU and unbuddied stacks ----------------------------------------------------

    def _touch(self, cls: int, frame: int) -> None:
        """Make ``frame`` the most recently used frame of its class."""
        seq = next(self._seq)
        self.stamp[frame] = seq
        self.lru[cls].append(seq << 32 | frame)
        if not seq & 1023:
            self._maybe_compact()

    def _compact_lru(self, cls: int) -> None:
        stamp, flags = self.stamp, self.flags
        keep = [
            e
            for e in self.lru[cls]
            if stamp[e & _FRAME_MASK] == e >> 32 and flags[e & _FRAME_MASK] & F_USED
        ]
        self.lru[cls].clear()
        self.lru[cls].extend(keep)

    def _lru_head(self, cls: int) -> int:
        """The least recently used live, non-zombie frame of ``cls`` (not removed), or -1."""
        lru = self.lru[cls]
        stamp, flags = self.stamp, self.flags
        while lru:
            e = lru[0]
            frame = e & _FRAME_MASK
            if stamp[frame] == e >> 32 and flags[frame] & (F_USED | F_ZOMBIE) == F_USED:
                return frame
            lru.popleft()
        return -1

    def _push_unbuddied(self, cls: int, i: int, frame: int) -> None:
        self.unbuddied[cls][i].append(frame)
        self.where[frame] = i | cls << 6
        self.unbuddied_mask[cls] |= 1 << i

    def _maybe_compact(self) -> None:
        """Drop stale LRU and stack entries once they outnumber live ones (amortized O(1)).

        Called every 1024 touches; stale entries appear when frames are touched again,
        freed, evicted or zombified, and are otherwise only skipped lazily.
        """
        for cls in (EPH, PERS):
            if len(self.lru[cls]) > 1024 + 2 * self.counters[cls].pageframes:
                self._compact_lru(cls)
        entries = sum(len(s) for c in self.unbuddied for s in c)
        live = self.counters[EPH].unbuddied_count + self.counters[PERS].unbuddied_count
        if entries > 1024 + 2 * live:
            self._compact_stacks()

    def _compact_stacks(self) -> None:
        where = self.where
        for cls in (EPH, PERS):
            for i, stack in enumerate(self.unbuddied[cls]):
                seen: set[int] = set()
                keep = []
                code = i | cls << 6
                for f in stack:
                    if where[f] == code and f not in seen:
                        seen.add(f)
                        keep.append(f)
                stack[:] = keep
                if not keep:
                    self.unbuddied_mask[cls] &= ~(1 << i)

    # ---- placement -------------------------------------------------------------------

    def alloc(self, size: int, cls: int) -> int:
        """A handle for ``size`` bytes of class ``cls``, or -1 (no frame to be had).

        Best fit first: the fullest partial frame of ``cls`` with room. Otherwise a new
        frame from the source becomes an unbuddied frame (or a huge one, over 4032 B).
        This is the put hot path, so it is one flat function.
        """
        if size > MAX_BUDDY_SIZE:
            if size > PAGE_SIZE or size < 1:
                raise ValueError(f"zbud stores 1..{PAGE_SIZE} bytes, not {size}")
            return self._alloc_huge(size, cls)
        if size < 1:
            raise ValueError(f"zbud stores 1..{PAGE_SIZE} bytes, not {size}")
        mask = self.unbuddied_mask[cls]
        fits = mask & _FITS[size]
        if fits:
            i = fits.bit_length() - 1
            stack = self.unbuddied[cls][i]
            frame = stack.pop()
            if not stack:
                self.unbuddied_mask[cls] = mask & ~(1 << i)
            if self.where[frame] != i | cls << 6:
                frame = self._pop_fit(cls, size)
        else:
            frame = -1
        if frame >= 0:  # second buddy of a partial frame
            self.where[frame] = 0
            if self.size0[frame] == 0:
                self.size0[frame] = size
                handle = frame << 1
            else:
                self.size1[frame] = size
                handle = frame << 1 | 1
        else:  # first buddy of a fresh frame
            frame = self.frames.take(1)
            if frame < 0:
                return -1
            self.flags[frame] = F_USED
            self.cls[frame] = cls
            self.size0[frame] = size
            i = (size + CHUNK_SIZE - 1) >> CHUNK_SHIFT
            self.unbuddied[cls][i].append(frame)
            self.where[frame] = i | cls << 6
            self.unbuddied_mask[cls] |= 1 << i
            self.counters[cls].pageframes += 1
            handle = frame << 1
        seq = next(self._seq)
        self.stamp[frame] = seq  # adding a zbud makes the frame most recently used
        self.lru[cls].append(seq << 32 | frame)
        if not seq & 1023:
            self._maybe_compact()
        c = self.counters[cls]
        c.zpages += 1
        c.zbytes += size
        c.cumul_zpages += 1
        c.cumul_zbytes += size
        return handle

    def _pop_fit(self, cls: int, size: int) -> int:
        """Pop the best-fitting live unbuddied frame, skipping stale stack entries."""
        where = self.where
        while True:
            mask = self.unbuddied_mask[cls]
            fits = mask & _FITS[size]
            if not fits:
                return -1
            i = fits.bit_length() - 1
            stack = self.unbuddied[cls][i]
            code = i | cls << 6
            while stack:
                f = stack.pop()
                if where[f] == code:
                    if not stack:
                        self.unbuddied_mask[cls] = mask & ~(1 << i)
                    return f
            self.unbuddied_mask[cls] = mask & ~(1 << i)

    def _alloc_huge(self, size: int, cls: int) -> int:
        """A whole frame for one object (zram's "huge" page: stored raw, mostly)."""
        frame = self.frames.take(1)
        if frame < 0:
            return -1
        c = self.counters[cls]
        self.flags[frame] = F_USED | F_HUGE
        self.cls[frame] = cls
        self.where[frame] = 0
        self.size0[frame] = size
        self.size1[frame] = 0
        c.pageframes += 1
        c.huge_count += 1
        c.zpages += 1
        c.zbytes += size
        c.cumul_zpages += 1
        c.cumul_zbytes += size
        self._touch(cls, frame)
        return frame << 1

    # ---- reading ---------------------------------------------------------------------

    def span(self, handle: int) -> tuple[int, int]:
        """Arena byte range ``(start, end)`` of the zbud's bytes."""
        frame = handle >> 1
        if handle & 1:
            size = self.size1[frame]
            start = frame * PAGE_SIZE + PAGE_SIZE - ((size + CHUNK_SIZE - 1) & -CHUNK_SIZE)
            return start, start + size
        start = frame * PAGE_SIZE
        return start, start + self.size0[frame]

    def handles(self, frame: int) -> list[int]:
        """The handle of each occupied buddy of ``frame``."""
        out: list[int] = []
        if self.size0[frame]:
            out.append(frame << 1)
        if self.size1[frame]:
            out.append(frame << 1 | 1)
        return out

    # ---- freeing ---------------------------------------------------------------------

    def free(self, handle: int) -> None:
        """Release the zbud; an emptied frame leaves every list and goes back to the
        source."""
        frame = handle >> 1
        flags = self.flags[frame]
        cls = self.cls[frame]
        c = self.counters[cls]
        if handle & 1:
            size = self.size1[frame]
            self.size1[frame] = 0
            other = self.size0[frame]
        else:
            size = self.size0[frame]
            self.size0[frame] = 0
            other = self.size1[frame]
        if c.zpages > c.zpages_max:
            c.zpages_max = c.zpages
            if c.pageframes > c.pageframes_max:
                c.pageframes_max = c.pageframes
        c.zpages -= 1
        c.zbytes -= size
        if flags & F_ZOMBIE:
            c.zombie_zpages -= 1
        if other == 0:
            if flags & F_ZOMBIE:
                c.zombie_count -= 1
            if flags & F_HUGE:
                c.huge_count -= 1
            self.where[frame] = 0
            self.stamp[frame] = 0
            self.flags[frame] = 0
            c.pageframes -= 1
            self.frames.give(frame, 1)
            return
        if not flags & F_ZOMBIE:
            self._push_unbuddied(cls, (other + CHUNK_SIZE - 1) >> CHUNK_SHIFT, frame)

    def lru_victims(self, cls: int) -> list[int]:
        """Zombify the least recently used frame of ``cls``: its handles, or [].

        The data stays valid and readable. No new zbud is placed into a zombie frame;
        it goes back to the source once all its zbuds are freed, or to the LRU through
        :meth:`restore`.
        """
        frame = self._lru_head(cls)
        if frame < 0:
            return []
        self.lru[cls].popleft()
        self.stamp[frame] = 0
        self.where[frame] = 0
        self.flags[frame] |= F_ZOMBIE
        found = self.handles(frame)
        c = self.counters[cls]
        c.zombie_count += 1
        c.zombie_zpages += len(found)
        return found

    def restore(self, handle: int) -> None:
        """Return the zombie frame holding ``handle`` to the LRU (MRU end) and lists."""
        frame = handle >> 1
        if self.flags[frame] & (F_ZOMBIE | F_USED) != F_ZOMBIE | F_USED:
            return
        cls = self.cls[frame]
        c = self.counters[cls]
        self.flags[frame] &= ~F_ZOMBIE
        s0, s1 = self.size0[frame], self.size1[frame]
        c.zombie_count -= 1
        c.zombie_zpages -= (s0 > 0) + (s1 > 0)
        if not self.flags[frame] & F_HUGE and not (s0 and s1):
            self._push_unbuddied(cls, (s0 + s1 + CHUNK_SIZE - 1) >> CHUNK_SHIFT, frame)
        self._touch(cls, frame)

    def note_evicted(self, cls: int) -> None:
        """zcache evicted (freed) the zbuds of one frame lru_victims handed out."""
        self.counters[cls].evicted_pageframes += 1

    def is_zombie(self, handle: int) -> bool:
        return bool(self.flags[handle >> 1] & F_ZOMBIE)

    def lru_frames(self, cls: int) -> list[int]:
        """Live frames of ``cls`` from least to most recently used (tests, stats)."""
        stamp, flags = self.stamp, self.flags
        return [
            e & _FRAME_MASK
            for e in self.lru[cls]
            if stamp[e & _FRAME_MASK] == e >> 32 and flags[e & _FRAME_MASK] & F_USED
        ]

    def compact(self, max_moves: int) -> int:
        """zbud moves nothing: a frame empties when both its buddies are freed."""
        return 0

    def compactable_frames(self) -> int:
        return 0

    # ---- accounting (tests and debugging; never on the put/get paths) ------------------

    def frames_held(self) -> dict[int, str]:
        """Every frame zbud holds, and as what: "unbuddied", "buddied", "huge", "zombie".

        Read from the frame table alone, never from the counters, so a frame lost or
        handed out twice shows even when every counter was updated as usual.
        """
        flags, size0, size1 = self.flags, self.size0, self.size1
        out: dict[int, str] = {}
        for frame in range(self.nframes):
            f = flags[frame]
            if not f & F_USED:
                continue
            if f & F_ZOMBIE:
                kind = "zombie"
            elif f & F_HUGE:
                kind = "huge"
            elif size0[frame] and size1[frame]:
                kind = "buddied"
            else:
                kind = "unbuddied"
            out[frame] = kind
        return out

    def check(self) -> list[str]:
        """Inconsistencies in zbud's own structures (none: ``[]``), for tests.

        A held frame that holds nothing; a free frame with data or a list mark left; a
        live frame missing from its LRU queue, or an unbuddied one from the stack of its
        size (reclaim or best fit would then never find it). Walks every frame.
        """
        problems: list[str] = []
        flags, size0, size1 = self.flags, self.size0, self.size1
        where, stamp, cls_col = self.where, self.stamp, self.cls
        lru = (set(self.lru[EPH]), set(self.lru[PERS]))
        stacks = [[set(s) for s in c] for c in self.unbuddied]
        for frame in range(self.nframes):
            f, s0, s1 = flags[frame], size0[frame], size1[frame]
            if not f & F_USED:
                if f or s0 or s1 or where[frame]:
                    problems.append(f"frame {frame}: not held, but its columns are not clear")
                continue
            cls = cls_col[frame]
            if not (s0 or s1):
                problems.append(f"frame {frame}: held, but holds no zbud")
            if f & F_HUGE and (s0 <= MAX_BUDDY_SIZE or s1):
                problems.append(f"frame {frame}: huge, but sized {s0} + {s1}")
            if chunks(s0) + chunks(s1) > NCHUNKS:
                problems.append(f"frame {frame}: buddies of {s0} and {s1} bytes overlap")
            if f & F_ZOMBIE:  # on no LRU and no stack
                if where[frame]:
                    problems.append(f"frame {frame}: zombie, but on an unbuddied stack")
                continue
            if not stamp[frame] or stamp[frame] << 32 | frame not in lru[cls]:
                problems.append(f"frame {frame}: live, but not on the LRU of class {cls}")
            if f & F_HUGE or (s0 and s1):
                if where[frame]:
                    problems.append(f"frame {frame}: full, but marked on an unbuddied stack")
                continue
            i = chunks(s0 + s1)
            if (
                where[frame] != i | cls << 6
                or frame not in stacks[cls][i]
                or not self.unbuddied_mask[cls] >> i & 1
            ):
                problems.append(f"frame {frame}: unbuddied, but not on stack {i} of class {cls}")
        return problems

    def metadata_bytes(self) -> int:
        """Bytes of zbud bookkeeping outside the arena (columns, queues, stacks)."""
        cols = (self.size0, self.size1, self.flags, self.cls, self.where, self.stamp)
        total = sum(a.buffer_info()[1] * a.itemsize for a in cols)
        # deque: 8-byte slot + a 36-byte int per entry; stacks: 8-byte slot (+ the int)
        total += 44 * (len(self.lru[0]) + len(self.lru[1]))
        return total + 40 * sum(len(s) for c in self.unbuddied for s in c)

    def stats(self) -> dict[str, int]:
        """The kernel's zbud debugfs counters, per class, plus zcache's frame counts."""
        out: dict[str, int] = {}
        for cls, prefix in ((EPH, "zbud_eph_"), (PERS, "zbud_pers_")):
            c = self.counters[cls]
            c.note_max()
            out[prefix + "zbytes"] = c.zbytes
            out[prefix + "cumul_zbytes"] = c.cumul_zbytes
            out[prefix + "zpages"] = c.zpages
            out[prefix + "cumul_zpages"] = c.cumul_zpages
            out[prefix + "pageframes"] = c.pageframes
            out[prefix + "evicted_pageframes"] = c.evicted_pageframes
            out[prefix + "buddied_count"] = c.buddied_count
            out[prefix + "unbuddied_count"] = c.unbuddied_count
            out[prefix + "zombie_count"] = c.zombie_count
            out[prefix + "huge_count"] = c.huge_count
        for cls, name in ((EPH, "eph"), (PERS, "pers")):
            c = self.counters[cls]
            out[name + "_pageframes"] = c.pageframes
            out[name + "_pageframes_max"] = c.pageframes_max
        out["pages_compacted"] = 0
        return out
