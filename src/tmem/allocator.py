"""The allocator interface: how zcache stores compressed bytes (the kernel's zpool).

zcache owns the pageframes (an :class:`~tmem.arena.Arena`, lent to the allocator as a
:class:`FrameSource`) and everything it knows about a stored page: its tmem handle, its
codec, its place in the per-class LRU of pages (as zswap keeps it since Linux 6.5). An
allocator owns only the bytes: it turns a size into a *handle* (a small int, dense from 0
so its user can keep per-handle columns in arrays), says where the bytes are for a moment
(:meth:`Allocator.span`, the kernel's map), and frees, compacts and counts.

Handles stay valid while the allocator moves objects (compaction); a span does not:
read it again after any call that may compact or allocate.

Two allocators implement it: :mod:`tmem.zbud` (the seed's, at most two objects per
frame, with its own frame LRU) and :mod:`tmem.zsmalloc` (size classes, spans of 1-4
frames, objects straddling frame boundaries, compaction), the default.
"""

from __future__ import annotations

from typing import Final, Protocol

PAGE_SIZE: Final = 4096
EPH: Final = 0  # the class of ephemeral pages (cleancache): may be dropped at any time
PERS: Final = 1  # persistent pages (frontswap, block devices): kept until flushed


class FrameSource(Protocol):
    """The pageframes an allocator may use, lent by their owner (zcache's arena)."""

    @property
    def frames_total(self) -> int:
        """Frames in the arena (the most there can ever be)."""
        ...

    @property
    def memory(self) -> memoryview:
        """The whole arena, writable; frame ``f`` is bytes ``f*4096 .. (f+1)*4096``."""
        ...

    def take(self, count: int) -> int:
        """The first of ``count`` (1..4) contiguous free frames, now the caller's; -1
        when the budget has no room (the allocator then fails the allocation and its
        user reclaims)."""
        ...

    def give(self, first: int, count: int) -> None:
        """Return ``count`` contiguous frames starting at ``first`` (the owner may hand
        them back to the operating system)."""
        ...


class Allocator(Protocol):
    """What zcache asks of an allocator. One conformance suite tests every one
    (tests/test_allocators.py)."""

    name: str
    max_size: int  # the largest object it stores (4096: a raw page)
    # zbud pairs pages, so zcache refuses a persistent page when the mean stored size
    # would pass this (the seed's rule); allocators that do not pair say max_size.
    max_mean_size: int
    # True: it keeps its own LRU of reclaim units that free frames (lru_victims);
    # False: its user reclaims by its page LRU and compacts to get frames back.
    keeps_lru: bool

    def alloc(self, size: int, cls: int) -> int:
        """A handle for ``size`` (1..max_size) bytes of class ``cls`` (EPH or PERS), or
        -1 when that needs frames the source refused. The bytes are not initialised:
        write them through :meth:`span`."""
        ...

    def free(self, handle: int) -> None:
        """Release the object; its frames go back to the source once empty."""
        ...

    def span(self, handle: int) -> tuple[int, int]:
        """The arena byte range ``(start, end)`` holding exactly the object's bytes."""
        ...

    def lru_victims(self, cls: int) -> list[int]:
        """For allocators that keep their own LRU (zbud's frame LRU): take the least
        recently used reclaim unit of ``cls`` off the LRU and return its handles; it
        takes no new objects until they are freed or :meth:`restore` puts it back.
        ``[]``: no own LRU (or nothing left); the user reclaims by its page LRU."""
        ...

    def restore(self, handle: int) -> None:
        """Undo :meth:`lru_victims` for the unit holding ``handle`` (e.g. a peer refused
        the page): it is on the LRU again."""
        ...

    def note_evicted(self, cls: int) -> None:
        """Its user evicted (freed) one unit :meth:`lru_victims` handed out (counters)."""
        ...

    def compact(self, max_moves: int) -> int:
        """Move up to ``max_moves`` objects out of sparse frames so that whole frames go
        back to the source; returns the objects moved."""
        ...

    def compactable_frames(self) -> int:
        """Frames a full compaction would give back (0: nothing to gain)."""
        ...

    def frames_held(self) -> dict[int, str]:
        """Every frame the allocator holds, with a word for what it holds (tests)."""
        ...

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping outside the frames (columns, lists), capacity included."""
        ...

    def stats(self) -> dict[str, int]:
        """The allocator's own counters, under its own prefix (``zbud_``, ``zs_``) plus
        ``pages_compacted`` (zram's name: frames compaction gave back)."""
        ...

    def check(self) -> list[str]:
        """Every way the allocator's own structures disagree, as sentences (tests)."""
        ...
