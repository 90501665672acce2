"""zbud: up to two compressed pages ("zbuds") per 4096-byte pageframe.

Behaviour follows the zcache2 zbud (kernel-zcache2.md section 3), adapted to Python:

* zbud never obtains or frees pageframes. The caller (zcache) owns the arena and hands
  a free frame number to :meth:`Zbud.create`; :meth:`Zbud.free` and
  :meth:`Zbud.evict_lru` hand frame numbers back when they empty.
* Frames are split into 64-byte chunks. Buddy 0 starts at the frame's first byte,
  buddy 1 is right-justified to the frame's end. Each buddy is stored as
  ``[32-byte tmem handle][compressed bytes]`` so a frame can be reclaimed (evicted,
  zombified) by reading the handles out of the frame, without walking tmem.
* Each class (0 = ephemeral, 1 = persistent) has its own unbuddied lists (list *i* =
  frames holding one zbud of *i* chunks) and its own LRU queue. Placement is best fit:
  the fullest unbuddied frame that still has room, found in O(1) through a bitmask of
  non-empty lists instead of the kernel's linear scan.
* A frame moves to the MRU end when a zbud is added to it, not when one is removed, so
  hard-to-buddy frames age out first (as in the kernel).
* Python runs a put or an eviction to completion without interleaving, so the kernel's
  "unevictable" hold and "dying" state are not needed. Zombie frames are kept: a
  zombified page stays readable while it is written back or sent to a peer.

Data structures, chosen for puts per second and bytes per page (measured, see
benchmarks/): per-frame columns in ``array`` (about 15 bytes per frame); the LRU is a
queue of ``stamp << 32 | frame`` entries where only the entry matching the frame's
current stamp counts (a touch appends, nothing is unlinked; stale entries are skipped
at the head and compacted away when they pile up); unbuddied lists are stacks with
the same lazy deletion (``where[frame]`` names the one list a frame is really on).

A pampd (the handle tmem stores) for a zbud is the int ``frame << 1 | buddy``.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Final

PAGE_SIZE: Final = 4096
CHUNK_SHIFT: Final = 6
CHUNK_SIZE: Final = 1 << CHUNK_SHIFT  # 64
NCHUNKS: Final = PAGE_SIZE >> CHUNK_SHIFT  # 64
MAX_CHUNK: Final = NCHUNKS - 1  # 63
HANDLE = struct.Struct("<QQQIHH")  # oid[0..2], index, pool id, client id
HANDLE_SIZE: Final = HANDLE.size  # 32
MAX_BUDDY_SIZE: Final = MAX_CHUNK * CHUNK_SIZE - HANDLE_SIZE  # 4000 bytes of compressed data

EPH: Final = 0
PERS: Final = 1

# frame flags
F_USED: Final = 1
F_ZOMBIE: Final = 2
F_HUGE: Final = 4  # one raw (uncompressed) page fills the whole frame; handle kept aside
F_STAGED: Final = 8  # with F_HUGE: a raw page not compressed yet (zcache's compress-behind)
# One-element columns that stage_run repeats to fill a run of frames.
_STAGED_FLAGS: Final = array("B", [F_USED | F_HUGE | F_STAGED])
_PERS_CLS: Final = array("B", [PERS])
_FULL_SIZE: Final = array("H", [PAGE_SIZE])

_FRAME_MASK: Final = (1 << 32) - 1
_NO_FRAMES: array[int] = array("i")
# _FITS[stored] = bitmask of the unbuddied lists i (one zbud of i chunks) that leave
# room for a zbud of ``stored`` bytes: i <= NCHUNKS - chunks(stored).
_FITS = tuple(
    (2 << (NCHUNKS - ((s + CHUNK_SIZE - 1) >> CHUNK_SHIFT))) - 1 for s in range(PAGE_SIZE + 1)
)

Handle = tuple[int, int, int, int, int, int]  # oid0, oid1, oid2, index, pool id, client


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
    huge_count: int = 0  # frames holding one raw page (staged ones included)
    staged_count: int = 0  # raw frames waiting for compression (compress-behind)
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


def chunks(stored_size: int) -> int:
    """Chunks needed for a zbud of ``stored_size`` bytes (handle included)."""
    return (stored_size + CHUNK_SIZE - 1) >> CHUNK_SHIFT


class Zbud:
    """The zbud allocator over a caller-owned arena of ``nframes`` pageframes."""

    def __init__(self, arena: memoryview, nframes: int) -> None:
        if len(arena) < nframes * PAGE_SIZE:
            raise ValueError("arena smaller than nframes pageframes")
        self.arena = arena
        self.nframes = nframes
        zeros2 = bytes(2 * nframes)
        self.size0 = array("H", zeros2)  # stored size incl. handle, 0 = empty
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
        self.huge_handles: dict[int, Handle] = {}
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

    def store(
        self,
        cls: int,
        data: bytes,
        free_frames: array[int],
        oid0: int,
        oid1: int,
        oid2: int,
        index: int,
        pool_id: int,
        client: int,
    ) -> int:
        """Place ``data`` (len <= MAX_BUDDY_SIZE) and return its pampd, or -1.

        Best fit first: the fullest partial frame of ``cls`` with room. Otherwise a frame
        zcache handed over on its ``free_frames`` stack becomes a new unbuddied frame.
        -1 when neither exists (zcache then reclaims a frame and calls :meth:`create`).
        This is the put hot path, so it is one flat function.
        """
        stored = len(data) + HANDLE_SIZE
        mask = self.unbuddied_mask[cls]
        fits = mask & _FITS[stored]
        if fits:
            i = fits.bit_length() - 1
            stack = self.unbuddied[cls][i]
            frame = stack.pop()
            if not stack:
                self.unbuddied_mask[cls] = mask & ~(1 << i)
            if self.where[frame] != i | cls << 6:
                frame = self._pop_fit(cls, stored)
        else:
            frame = -1
        if frame >= 0:  # second buddy of a partial frame
            self.where[frame] = 0
            if self.size0[frame] == 0:
                self.size0[frame] = stored
                off = frame * PAGE_SIZE
                pampd = frame << 1
            else:
                self.size1[frame] = stored
                off = (frame + 1) * PAGE_SIZE - ((stored + CHUNK_SIZE - 1) & -CHUNK_SIZE)
                pampd = frame << 1 | 1
        elif free_frames:  # first buddy of a fresh frame
            frame = free_frames.pop()  # an empty frame: both sizes are already 0
            self.flags[frame] = F_USED
            self.cls[frame] = cls
            self.size0[frame] = stored
            i = (stored + CHUNK_SIZE - 1) >> CHUNK_SHIFT
            self.unbuddied[cls][i].append(frame)
            self.where[frame] = i | cls << 6
            self.unbuddied_mask[cls] |= 1 << i
            self.counters[cls].pageframes += 1
            off = frame * PAGE_SIZE
            pampd = frame << 1
        else:
            return -1
        arena = self.arena
        HANDLE.pack_into(arena, off, oid0, oid1, oid2, index, pool_id, client)
        arena[off + HANDLE_SIZE : off + stored] = data
        seq = next(self._seq)
        self.stamp[frame] = seq  # adding a zbud makes the frame most recently used
        self.lru[cls].append(seq << 32 | frame)
        if not seq & 1023:
            self._maybe_compact()
        c = self.counters[cls]
        c.zpages += 1
        clen = stored - HANDLE_SIZE
        c.zbytes += clen
        c.cumul_zpages += 1
        c.cumul_zbytes += clen
        return pampd

    def match(self, cls: int, handle: Handle, data: bytes) -> int:
        """Place ``data`` into the fullest partial frame of ``cls`` with room, or -1."""
        return self.store(cls, data, _NO_FRAMES, *handle)

    def create(self, cls: int, frame: int, handle: Handle, data: bytes) -> int:
        """Start using the empty ``frame`` with ``data`` as buddy 0; return its pampd.

        The caller has found no partial frame with room (or wants a fresh frame).
        """
        mask = self.unbuddied_mask[cls]
        self.unbuddied_mask[cls] = 0  # hide partial frames for this one placement
        try:
            return self.store(cls, data, array("i", (frame,)), *handle)
        finally:
            self.unbuddied_mask[cls] |= mask

    def _pop_fit(self, cls: int, stored: int) -> int:
        """Pop the best-fitting live unbuddied frame, skipping stale stack entries."""
        where = self.where
        while True:
            mask = self.unbuddied_mask[cls]
            fits = mask & _FITS[stored]
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

    def create_huge(self, cls: int, frame: int, handle: Handle, page: bytes | memoryview) -> int:
        """Store an incompressible page raw in the whole ``frame`` (zram's "huge" page).

        The handle cannot share the frame with 4096 raw bytes, so it is kept aside.
        """
        c = self.counters[cls]
        self.flags[frame] = F_USED | F_HUGE
        self.cls[frame] = cls
        self.where[frame] = 0
        self.size0[frame] = PAGE_SIZE
        self.size1[frame] = 0
        start = frame * PAGE_SIZE
        self.arena[start : start + PAGE_SIZE] = page
        self.huge_handles[frame] = handle
        c.pageframes += 1
        c.huge_count += 1
        c.zpages += 1
        c.zbytes += PAGE_SIZE
        c.cumul_zpages += 1
        c.cumul_zbytes += PAGE_SIZE
        self._touch(cls, frame)
        return frame << 1

    def stage_run(self, free_frames: array[int], pages: memoryview, count: int) -> list[int]:
        """Store ``count`` persistent pages of ``pages`` raw, one per frame taken from
        ``free_frames``, until zcache compresses them (compress-behind); returns the
        frames, in page order.

        The write hot path of compress-behind, so it does the least it can: a staged
        frame is a huge frame on no LRU (zcache compacts staged pages before it would
        write anything back) whose handle zcache keeps per run, not here; the empty
        frame's other columns are already zero.
        """
        flags, cls, size0, arena = self.flags, self.cls, self.size0, self.arena
        # Take the frames off the top of the stack in one slice (pop() parses arguments
        # on every call), in ascending order: the stack often holds consecutive frames
        # (a fresh arena; a staged run rewritten or flushed before it was compacted),
        # and then the whole run is one memcpy and three column fills, not a loop.
        top = len(free_frames) - count
        frames = free_frames[top:].tolist()
        frames.sort()
        del free_frames[top:]
        first = frames[0] if count else 0
        if count > 1 and frames[count - 1] - first == count - 1:
            end = first + count
            arena[first * PAGE_SIZE : end * PAGE_SIZE] = pages[: count * PAGE_SIZE]
            flags[first:end] = _STAGED_FLAGS * count
            cls[first:end] = _PERS_CLS * count
            size0[first:end] = _FULL_SIZE * count
            done = count
        else:
            done = 0
        for i in range(done, count):
            frame = frames[i]
            flags[frame] = F_USED | F_HUGE | F_STAGED
            cls[frame] = PERS
            size0[frame] = PAGE_SIZE
            start = frame * PAGE_SIZE
            pos = i * PAGE_SIZE
            arena[start : start + PAGE_SIZE] = pages[pos : pos + PAGE_SIZE]
        c = self.counters[PERS]
        c.staged_count += count
        c.pageframes += count
        c.huge_count += count
        c.zpages += count
        c.zbytes += count * PAGE_SIZE
        c.cumul_zpages += count
        c.cumul_zbytes += count * PAGE_SIZE
        return frames

    def unstage(self, frame: int, handle: Handle) -> None:
        """A staged page stays raw for good: an ordinary huge page now, on the LRU."""
        if self.flags[frame] & F_STAGED:
            self.flags[frame] &= ~F_STAGED
            self.huge_handles[frame] = handle
            cls = self.cls[frame]
            self.counters[cls].staged_count -= 1
            self._touch(cls, frame)

    # ---- reading ---------------------------------------------------------------------

    def span(self, pampd: int) -> tuple[int, int]:
        """Arena byte range ``(start, end)`` of the stored data (handle excluded)."""
        frame = pampd >> 1
        if pampd & 1:
            stored = self.size1[frame]
            start = frame * PAGE_SIZE + PAGE_SIZE - ((stored + CHUNK_SIZE - 1) & -CHUNK_SIZE)
            return start + HANDLE_SIZE, start + stored
        start = frame * PAGE_SIZE
        if self.flags[frame] & F_HUGE:
            return start, start + PAGE_SIZE
        return start + HANDLE_SIZE, start + self.size0[frame]

    def is_huge(self, pampd: int) -> bool:
        return bool(self.flags[pampd >> 1] & F_HUGE)

    def handles(self, frame: int) -> list[tuple[int, Handle]]:
        """The (pampd, handle) of each occupied buddy of ``frame``."""
        if self.flags[frame] & F_HUGE:
            return [(frame << 1, self.huge_handles[frame])]
        out: list[tuple[int, Handle]] = []
        base = frame * PAGE_SIZE
        if self.size0[frame]:
            out.append((frame << 1, HANDLE.unpack_from(self.arena, base)))
        s1 = self.size1[frame]
        if s1:
            off = base + PAGE_SIZE - ((s1 + CHUNK_SIZE - 1) & -CHUNK_SIZE)
            out.append((frame << 1 | 1, HANDLE.unpack_from(self.arena, off)))
        return out

    # ---- freeing ---------------------------------------------------------------------

    def free(self, pampd: int) -> int:
        """Release the zbud ``pampd``. Returns its frame if the frame emptied, else -1.

        An emptied frame leaves every zbud list; the caller owns it again.
        """
        frame = pampd >> 1
        flags = self.flags[frame]
        cls = self.cls[frame]
        c = self.counters[cls]
        if pampd & 1:
            stored = self.size1[frame]
            self.size1[frame] = 0
            other = self.size0[frame]
        else:
            stored = self.size0[frame]
            self.size0[frame] = 0
            other = self.size1[frame]
        if c.zpages > c.zpages_max:
            c.zpages_max = c.zpages
            if c.pageframes > c.pageframes_max:
                c.pageframes_max = c.pageframes
        c.zpages -= 1
        if flags & F_HUGE:
            c.zbytes -= stored
        else:
            c.zbytes -= stored - HANDLE_SIZE
        if flags & F_ZOMBIE:
            c.zombie_zpages -= 1
        if other == 0:
            if flags & F_ZOMBIE:
                c.zombie_count -= 1
            if flags & F_HUGE:
                c.huge_count -= 1
                if flags & F_STAGED:
                    c.staged_count -= 1  # zcache keeps staged frames' handles
                else:
                    del self.huge_handles[frame]
            self.where[frame] = 0
            self.stamp[frame] = 0
            self.flags[frame] = 0
            c.pageframes -= 1
            return frame
        if not flags & F_ZOMBIE:
            self._push_unbuddied(cls, (other + CHUNK_SIZE - 1) >> CHUNK_SHIFT, frame)
        return -1

    def _detach(self, frame: int) -> None:
        """Take a live frame off the LRU and its unbuddied stack (both lazily)."""
        self.stamp[frame] = 0
        self.where[frame] = 0

    def evict_lru(self, cls: int = EPH) -> tuple[int, list[tuple[int, Handle]]]:
        """Evict the least recently used frame of ``cls`` (ephemeral, in the kernel).

        Returns ``(frame, [(pampd, handle)])``: the frame is empty and owned by the
        caller, who must drop the tmem entries named by the handles without freeing
        them again. ``(-1, [])`` if the class has no evictable frame.
        """
        frame = self._lru_head(cls)
        if frame < 0:
            return -1, []
        self.lru[cls].popleft()
        found = self.handles(frame)
        c = self.counters[cls]
        c.note_max()
        self._detach(frame)
        huge = self.flags[frame] & F_HUGE
        for pampd, _handle in found:
            stored = self.size1[frame] if pampd & 1 else self.size0[frame]
            c.zpages -= 1
            c.zbytes -= stored if huge else stored - HANDLE_SIZE
        self.size0[frame] = self.size1[frame] = 0
        if huge:  # staged frames are on no LRU, so never evicted
            c.huge_count -= 1
            del self.huge_handles[frame]
        self.flags[frame] = 0
        c.pageframes -= 1
        c.evicted_pageframes += 1
        return frame, found

    def zombify_lru(self, cls: int) -> tuple[int, list[tuple[int, Handle]]]:
        """Mark the LRU frame of ``cls`` zombie and return ``(frame, [(pampd, handle)])``.

        The data stays valid and readable. No new zbud is placed into a zombie frame;
        it is handed back by :meth:`free` once tmem has dropped all its entries, or
        returned to service by :meth:`unzombify`. ``(-1, [])`` if the LRU is empty.
        """
        frame = self._lru_head(cls)
        if frame < 0:
            return -1, []
        self.lru[cls].popleft()
        self._detach(frame)
        self.flags[frame] |= F_ZOMBIE
        found = self.handles(frame)
        c = self.counters[cls]
        c.zombie_count += 1
        c.zombie_zpages += len(found)
        return frame, found

    def unzombify(self, frame: int) -> None:
        """Return a zombie frame that still holds data to the LRU (MRU end) and lists."""
        if not self.flags[frame] & F_ZOMBIE:
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

    def is_zombie(self, frame: int) -> bool:
        return bool(self.flags[frame] & F_ZOMBIE)

    def lru_frames(self, cls: int) -> list[int]:
        """Live frames of ``cls`` from least to most recently used (tests, stats)."""
        stamp, flags = self.stamp, self.flags
        return [
            e & _FRAME_MASK
            for e in self.lru[cls]
            if stamp[e & _FRAME_MASK] == e >> 32 and flags[e & _FRAME_MASK] & F_USED
        ]

    # ---- accounting (tests and debugging; never on the put/get paths) ------------------

    def frames_held(self) -> dict[int, str]:
        """Every frame zbud holds, and as what: "unbuddied", "buddied", "huge", "zombie",
        or "staged" (a raw page compress-behind has not compressed yet).

        The allocator's side of :meth:`Zcache.check_frames`: read from the frame table
        alone, never from the counters, so a frame lost or handed out twice shows even
        when every counter was updated as usual. Any allocator behind zcache reports the
        frames it holds this way. Walks every frame.
        """
        flags, size0, size1 = self.flags, self.size0, self.size1
        out: dict[int, str] = {}
        for frame in range(self.nframes):
            f = flags[frame]
            if not f & F_USED:
                continue
            if f & F_ZOMBIE:
                kind = "zombie"
            elif f & F_STAGED:
                kind = "staged"
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
        huge frame without its handle (or a staged one with one); a live frame missing
        from its LRU queue, or an unbuddied one from the stack of its size (reclaim or
        best fit would then never find it). Walks every frame.
        """
        problems: list[str] = []
        flags, size0, size1 = self.flags, self.size0, self.size1
        where, stamp, cls_col = self.where, self.stamp, self.cls
        lru = (set(self.lru[EPH]), set(self.lru[PERS]))
        stacks = [[set(s) for s in c] for c in self.unbuddied]
        for frame in range(self.nframes):
            f, s0, s1 = flags[frame], size0[frame], size1[frame]
            has_handle = frame in self.huge_handles
            if not f & F_USED:
                if f or s0 or s1 or where[frame] or has_handle:
                    problems.append(f"frame {frame}: not held, but its columns are not clear")
                continue
            cls = cls_col[frame]
            if not (s0 or s1):
                problems.append(f"frame {frame}: held, but holds no zbud")
            if f & F_HUGE:
                if s0 != PAGE_SIZE or s1:
                    problems.append(f"frame {frame}: huge, but sized {s0} + {s1}")
                if bool(f & F_STAGED) == has_handle:
                    problems.append(f"frame {frame}: huge handle kept: {has_handle}, flags {f}")
            elif has_handle or f & F_STAGED:
                problems.append(f"frame {frame}: not huge, but flags {f} or a huge handle")
            if f & (F_ZOMBIE | F_STAGED):  # on no LRU and no stack
                if where[frame]:
                    problems.append(f"frame {frame}: zombie or staged, but on an unbuddied stack")
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
        total += 40 * sum(len(s) for c in self.unbuddied for s in c)
        return total + 200 * len(self.huge_handles)
