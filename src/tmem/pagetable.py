"""What zcache knows about each page it stores, by allocator handle: the page's tmem
handle (object number and index), its codec and class, and its place on an LRU list.

Handles are small dense ints (:mod:`tmem.allocator`), so every fact is a column of an
``array``: about 21 bytes a page and no Python object per page. The LRU lists are
doubly linked through the ``prev``/``next`` columns (as zswap keeps its LRU in its
entries since Linux 6.5): O(1) append, unlink and replace.

Lists: :data:`L_EPH` and :data:`L_PERS` (pages in put order, oldest first: reclaim takes
the head), and :data:`L_STAGED` (raw pages compress-behind has not compressed yet).
A zombie page (handed out for writeback or to a peer) is on no list.
"""

from __future__ import annotations

import time
from array import array
from typing import Final

L_EPH: Final = 0
L_PERS: Final = 1
L_STAGED: Final = 2
NIL: Final = -1

# flags column
P_LIVE: Final = 1  # the handle holds a page zcache stored
P_PERS: Final = 2  # class: persistent (else ephemeral)
P_STAGED: Final = 4  # raw, on L_STAGED, waiting for compress-behind
P_ZOMBIE: Final = 8  # on no list: being written back or sent to a peer
CODEC_SHIFT: Final = 4
CODEC_MASK: Final = 3 << CODEC_SHIFT
C_MAIN: Final = 0  # the Zcache's compressor
C_RAW: Final = 1 << CODEC_SHIFT  # stored uncompressed (huge or staged)
C_STRONG: Final = 2 << CODEC_SHIFT  # recompressed with the strong codec


class PageTable:
    """Per-handle columns and the LRU lists (one owner: the Zcache)."""

    def __init__(self, stamps: bool) -> None:
        self.cap = 0
        self.obj = array("i")  # object number (Tmem.obj), -1 when not live
        self.idx = array("I")  # page index within the object
        self.flags = array("B")
        self.prev = array("i")
        self.next = array("i")
        # put time, whole seconds since start (only with recompression: it picks pages
        # by idle age); otherwise empty.
        self.stamp = array("I")
        self.stamps = stamps
        self.t0 = time.monotonic()
        self.head = [NIL, NIL, NIL]
        self.tail = [NIL, NIL, NIL]
        self.count = [0, 0, 0]
        # recompression walks L_EPH/L_PERS from the head; cursor = next page to look at
        self.cursor = [NIL, NIL, NIL]

    def grow(self, handle: int) -> None:
        """Make the columns cover ``handle`` (amortised: by an eighth, 64 at least)."""
        if handle < self.cap:
            return
        new = max(handle + 1, self.cap + self.growth())
        extra = new - self.cap
        self.obj.extend(array("i", [NIL]) * extra)
        self.idx.extend(array("I", bytes(4 * extra)))
        self.flags.extend(bytes(extra))
        self.prev.extend(array("i", [NIL]) * extra)
        self.next.extend(array("i", [NIL]) * extra)
        if self.stamps:
            self.stamp.extend(array("I", bytes(4 * extra)))
        self.cap = new

    def growth(self) -> int:
        """Entries the next growth adds."""
        return max(64, self.cap >> 3)

    def next_growth_bytes(self) -> int:
        return self.growth() * (17 + 4 * self.stamps)

    def now(self) -> int:
        return int(time.monotonic() - self.t0)

    def append(self, h: int, lst: int) -> None:
        """Link ``h`` at the tail (most recent end) of list ``lst``."""
        tail = self.tail[lst]
        self.prev[h] = tail
        self.next[h] = NIL
        if tail == NIL:
            self.head[lst] = h
        else:
            self.next[tail] = h
        self.tail[lst] = h
        self.count[lst] += 1
        if self.cursor[lst] == NIL:
            self.cursor[lst] = h

    def unlink(self, h: int, lst: int) -> None:
        p = self.prev[h]
        n = self.next[h]
        if p == NIL:
            self.head[lst] = n
        else:
            self.next[p] = n
        if n == NIL:
            self.tail[lst] = p
        else:
            self.prev[n] = p
        if self.cursor[lst] == h:
            self.cursor[lst] = n
        self.count[lst] -= 1

    def substitute(self, old: int, new: int, lst: int) -> None:
        """Put ``new`` where ``old`` is on list ``lst`` (a page moved to a new handle)."""
        p = self.prev[old]
        n = self.next[old]
        self.prev[new] = p
        self.next[new] = n
        if p == NIL:
            self.head[lst] = new
        else:
            self.next[p] = new
        if n == NIL:
            self.tail[lst] = new
        else:
            self.prev[n] = new
        if self.cursor[lst] == old:
            self.cursor[lst] = new

    def list_of(self, h: int) -> int:
        """The list a live, non-zombie handle is on."""
        f = self.flags[h]
        if f & P_STAGED:
            return L_STAGED
        return L_PERS if f & P_PERS else L_EPH

    def walk(self, lst: int) -> list[int]:
        """The handles of a list, head first (tests and checks)."""
        out: list[int] = []
        h = self.head[lst]
        while h != NIL and len(out) <= self.cap:
            out.append(h)
            h = self.next[h]
        return out

    def metadata_bytes(self) -> int:
        cols = (self.obj, self.idx, self.flags, self.prev, self.next, self.stamp)
        return sum(a.buffer_info()[1] * a.itemsize for a in cols) + 400
