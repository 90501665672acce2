"""The arena: a store's pageframes, one anonymous mapping, RAM on demand.

The whole budget is mapped once (``MAP_NORESERVE``: a 1 TiB budget reserves nothing);
the kernel backs a frame with RAM at its first write. Frames are handed out by a small
buddy system (blocks of 1, 2 or 4 naturally aligned frames, coalesced when given back)
above a bump pointer ``top``: frames at or above it were never handed out, so they have
no metadata and cost nothing. Given-back frames are returned to the operating system
(``MADV_DONTNEED``) so that resident memory follows what is stored, except for a few
(``keep_resident``) kept mapped so that churn (free then put) costs no syscall and no
page fault: blocks holding resident frames are handed out first.

With ``prefault=True`` the whole budget is made resident up front (``MAP_POPULATE``) and
never handed back: no page fault on the put path, at the price of the full budget in RAM.

Metadata: one byte per frame below ``top`` plus a set entry per free block.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from array import array
from typing import Any, Final

PAGE_SIZE: Final = 4096
MAX_ORDER: Final = 2  # blocks of 1, 2, 4 frames

# Per-frame state (one byte). A frame below ``top`` is either used or in a free block;
# the first frame of a free block (its head) carries the block's order.
S_USED: Final = 1
S_FREE: Final = 2  # in a free block, not its head
S_HEAD: Final = 4  # head of a free block; order in bits 4-5
S_RES: Final = 8  # free and (maybe) resident: written since it was last released
ORDER_SHIFT: Final = 4

# Linux's value where the mmap module lacks the name (it has it from Python 3.13).
_MAP_NORESERVE: Final = int(
    getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
)
_MADV_DONTNEED: Final = int(getattr(mmap, "MADV_DONTNEED", -1))


def _find_mincore() -> Any:
    """libc's mincore(2), or None where there is none (then used frames are counted)."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    mincore.restype = ctypes.c_int
    return mincore


_MINCORE: Final = _find_mincore()

_LOW_BIT: Final = bytes(i & 1 for i in range(256))  # mincore's other bits are unspecified


class Arena:
    """``frames_total`` pageframes in one mapping; a :class:`~tmem.allocator.FrameSource`."""

    def __init__(self, frames_total: int, *, prefault: bool = False, keep_resident: int = 256):
        if frames_total < 1:
            raise ValueError("an arena needs at least one frame")
        self.frames_total = frames_total
        self.prefault = prefault
        self.keep_resident = keep_resident
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if prefault:
            flags |= int(getattr(mmap, "MAP_POPULATE", 0))
        try:
            self._mm = mmap.mmap(-1, frames_total * PAGE_SIZE, flags=flags)
        except OSError:
            # A budget past what the kernel's overcommit heuristic allows: reserve no
            # swap for it (pages are still only touched on demand). Not the default:
            # some kernels account a NORESERVE mapping's page tables as file RSS.
            if prefault:
                raise
            flags |= _MAP_NORESERVE
            self._mm = mmap.mmap(-1, frames_total * PAGE_SIZE, flags=flags)
        self._memory = memoryview(self._mm)
        self._limit = frames_total
        self.frames_used = 0
        self.top = 0  # frames >= top were never handed out (no state, not resident)
        self.state = array("B")  # one byte per frame below top
        # Free blocks by order: those holding resident frames (handed out first) and
        # those released to the OS (or never touched).
        self.free_res: list[set[int]] = [set(), set(), set()]
        self.free_rel: list[set[int]] = [set(), set(), set()]
        self.resident_free = 0  # free frames with S_RES
        self.frames_released = 0  # frames handed back to the OS (counter)
        self.madvise_calls = 0

    # ---- the FrameSource interface ----------------------------------------------------

    @property
    def memory(self) -> memoryview:
        """The whole arena, writable."""
        return self._memory

    @property
    def limit(self) -> int:
        """Frames that may be in use at once (the store lowers it to pay for metadata)."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if not 0 <= value <= self.frames_total:
            raise ValueError(f"limit {value} outside 0..{self.frames_total}")
        self._limit = value

    @property
    def frames_free(self) -> int:
        return max(0, self._limit - self.frames_used)

    def take(self, count: int) -> int:
        """The first of ``count`` (1..4) contiguous frames, or -1 beyond the limit.

        A block with resident frames is preferred (no page fault when written); then a
        released one; then fresh frames from ``top``. Three frames are a block of four
        whose last frame goes straight back.
        """
        if count < 1 or count > 4:
            raise ValueError(f"take({count}): count must be 1..4")
        if self.frames_used + count > self._limit:
            return -1
        order = 0 if count == 1 else 1 if count == 2 else 2
        first = self._take_block(order)
        if first < 0:
            return -1
        state = self.state
        if count == 3:
            last = first + 3
            self._free_block(last, 0, state[last] & S_RES)
        for f in range(first, first + count):
            state[f] = S_USED
        self.frames_used += count
        return first

    def give(self, first: int, count: int) -> None:
        """Take back ``count`` frames from ``first`` (any aligned pieces of a take)."""
        state = self.state
        if count < 1 or first < 0 or first + count > self.top:
            raise ValueError(f"give({first}, {count}): not frames of this arena")
        for f in range(first, first + count):
            if state[f] != S_USED:
                raise ValueError(f"give: frame {f} is not in use")
        self.frames_used -= count
        f = first
        end = first + count
        while f < end:  # split the range into naturally aligned blocks
            order = MAX_ORDER
            while order and (f & ((1 << order) - 1) or f + (1 << order) > end):
                order -= 1
            self._free_block(f, order, S_RES)
            f += 1 << order

    # ---- the buddy system -------------------------------------------------------------

    def _take_block(self, order: int) -> int:
        """Remove a free block of ``order`` (splitting a bigger one) and return it."""
        for sets in (self.free_res, self.free_rel):
            for o in range(order, MAX_ORDER + 1):
                if sets[o]:
                    first = sets[o].pop()
                    self._claim(first, o)
                    # Split: the upper halves go back, low part is the caller's.
                    while o > order:
                        o -= 1
                        half = first + (1 << o)
                        self._push(half, o, self._res_bits(half, 1 << o))
                    return first
        if not self._grow():
            return -1
        return self._take_block(order)

    def _grow(self) -> bool:
        """Carve the next block above ``top`` into the free lists (untouched frames)."""
        top = self.top
        if top >= self.frames_total:
            return False
        order = MAX_ORDER
        while order and (top & ((1 << order) - 1) or top + (1 << order) > self.frames_total):
            order -= 1
        size = 1 << order
        self.state.frombytes(bytes(size))
        self.top = top + size
        self._push(top, order, 0)
        return True

    def _res_bits(self, first: int, size: int) -> int:
        """S_RES if any of the frames is resident, else 0."""
        state = self.state
        for f in range(first, first + size):
            if state[f] & S_RES:
                return S_RES
        return 0

    def _claim(self, first: int, order: int) -> None:
        """Mark a block just taken off a free list as the caller's (not free)."""
        state = self.state
        for f in range(first, first + (1 << order)):
            if state[f] & S_RES:
                self.resident_free -= 1
            state[f] = S_USED | (state[f] & S_RES)  # keep S_RES until the split is done

    def _push(self, first: int, order: int, res: int) -> None:
        """Put a block on a free list; its frames' S_RES bits are kept (or ``res`` set
        on all of them when ``res`` and they are being given back)."""
        state = self.state
        size = 1 << order
        nres = 0
        for f in range(first, first + size):
            bit = state[f] & S_RES
            if bit:
                nres += 1
            state[f] = S_FREE | bit
        state[first] = S_HEAD | order << ORDER_SHIFT | (state[first] & S_RES)
        self.resident_free += nres
        if nres or res:
            self.free_res[order].add(first)
        else:
            self.free_rel[order].add(first)

    def _free_block(self, first: int, order: int, res: int) -> None:
        """Free one aligned block (``res``: its frames were written), coalescing with
        free buddies, then release memory beyond ``keep_resident``."""
        state = self.state
        for f in range(first, first + (1 << order)):
            state[f] = S_USED | res if res else state[f] & S_RES | S_USED
        while order < MAX_ORDER:
            buddy = first ^ (1 << order)
            if buddy >= self.top or state[buddy] & ~S_RES != S_HEAD | order << ORDER_SHIFT:
                break
            self.free_res[order].discard(buddy)
            self.free_rel[order].discard(buddy)
            self._claim(buddy, order)
            first = min(first, buddy)
            order += 1
        self._push(first, order, self._res_bits(first, 1 << order))
        if self.resident_free > self.keep_resident and not self.prefault:
            self._release(first, order)

    def _release(self, first: int, order: int) -> None:
        """Hand a free block's memory back to the OS; it reads as zeros afterwards."""
        if _MADV_DONTNEED < 0 or first not in self.free_res[order]:
            return
        size = 1 << order
        self._mm.madvise(_MADV_DONTNEED, first * PAGE_SIZE, size * PAGE_SIZE)
        self.madvise_calls += 1
        self.free_res[order].discard(first)
        self.free_rel[order].add(first)
        state = self.state
        for f in range(first, first + size):
            if state[f] & S_RES:
                self.resident_free -= 1
                self.frames_released += 1
                state[f] &= ~S_RES

    def release_free(self) -> int:
        """Hand every resident free frame back to the OS (an idle store, after a trim);
        returns the frames released. Adjacent blocks go in one call."""
        if self.prefault or _MADV_DONTNEED < 0:
            return 0
        before = self.frames_released
        blocks = sorted((f, o) for o in range(MAX_ORDER + 1) for f in self.free_res[o])
        run_start = run_end = -1
        for first, order in blocks:
            if first != run_end:
                if run_start >= 0:
                    self._madvise_run(run_start, run_end)
                run_start = first
            run_end = first + (1 << order)
            self.free_res[order].discard(first)
            self.free_rel[order].add(first)
        if run_start >= 0:
            self._madvise_run(run_start, run_end)
        return self.frames_released - before

    def _madvise_run(self, start: int, end: int) -> None:
        self._mm.madvise(_MADV_DONTNEED, start * PAGE_SIZE, (end - start) * PAGE_SIZE)
        self.madvise_calls += 1
        state = self.state
        for f in range(start, end):
            if state[f] & S_RES:
                self.resident_free -= 1
                self.frames_released += 1
                state[f] &= ~S_RES

    # ---- accounting --------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes of the mapping resident in RAM, asked of the kernel (mincore).

        Only frames below ``top`` can have been written, so only they are asked about
        (a huge untouched budget costs nothing here either). Without mincore: the frames
        in use, or the whole budget when prefaulted.
        """
        size = self.top * PAGE_SIZE
        if self.prefault:
            size = len(self._mm)
        if _MINCORE is None:
            return size if self.prefault else self.frames_used * PAGE_SIZE
        if not size:
            return 0
        npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = bytearray(npages)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        out = (ctypes.c_ubyte * npages).from_buffer(vec)
        if _MINCORE(addr, size, out) != 0:
            return self.frames_used * PAGE_SIZE
        return vec.translate(_LOW_BIT).count(1) * mmap.PAGESIZE

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping: the state column (capacity) and the free sets with their
        int objects."""
        total = sys.getsizeof(self.state)
        for sets in (self.free_res, self.free_rel):
            total += sys.getsizeof(sets)
            for s in sets:
                total += sys.getsizeof(s) + 32 * len(s)
        return total

    def free_frames_list(self) -> list[int]:
        """Every free frame below ``top``, ascending (tests)."""
        return [f for f in range(self.top) if not self.state[f] & S_USED]

    def check(self) -> list[str]:
        """Every way the buddy structures disagree, as sentences (none: ``[]``)."""
        problems: list[str] = []
        state = self.state
        if len(state) != self.top or self.top > self.frames_total:
            problems.append(f"state column has {len(state)} frames, top is {self.top}")
            return problems
        listed: dict[int, tuple[int, bool]] = {}
        for res, sets in ((True, self.free_res), (False, self.free_rel)):
            for order, s in enumerate(sets):
                for first in s:
                    if first in listed:
                        problems.append(f"block {first} is on two free lists")
                    listed[first] = (order, res)
        used = resident = 0
        f = 0
        while f < self.top:
            st = state[f]
            if st == S_USED:
                used += 1
                f += 1
                continue
            if not st & S_HEAD:
                problems.append(f"frame {f}: state {st}, neither used nor a free block head")
                f += 1
                continue
            order = st >> ORDER_SHIFT & 3
            size = 1 << order
            if order > MAX_ORDER or f & (size - 1) or f + size > self.top:
                problems.append(f"frame {f}: free block of order {order} misplaced")
                f += 1
                continue
            anyres = False
            for g in range(f, f + size):
                if g > f and state[g] & ~S_RES != S_FREE:
                    problems.append(f"frame {g}: inside free block {f} but state {state[g]}")
                if state[g] & S_RES:
                    resident += 1
                    anyres = True
            entry = listed.pop(f, None)
            if entry is None:
                problems.append(f"free block {f} (order {order}) is on no free list")
            elif entry[0] != order:
                problems.append(f"free block {f} has order {order}, listed as {entry[0]}")
            elif anyres and not entry[1]:
                problems.append(f"free block {f} holds resident frames but is listed released")
            buddy = f ^ size
            if (
                order < MAX_ORDER
                and buddy < self.top
                and state[buddy] & ~S_RES == S_HEAD | order << ORDER_SHIFT
            ):
                problems.append(f"free blocks {f} and {buddy} are buddies, not coalesced")
            f += size
        for first, (order, _res) in listed.items():
            problems.append(f"free list entry {first} (order {order}) is not a free block")
        if used != self.frames_used:
            problems.append(f"{used} frames marked used, frames_used says {self.frames_used}")
        if resident != self.resident_free:
            problems.append(f"{resident} resident free frames, counter says {self.resident_free}")
        return problems
