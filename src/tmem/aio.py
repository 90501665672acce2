"""The event loop every tmem service runs on, and how long work shares it.

uvloop when installed (about half the per-request overhead of asyncio's own loop),
else asyncio's. ``TMEM_EVENT_LOOP=asyncio`` forces the standard loop, so benchmarks
and tests can compare both.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tmem.zcache import Zcache

T = TypeVar("T")
log = logging.getLogger(__name__)

IDLE_BATCH = 32  # pages per step of idle work: a fraction of a millisecond
IDLE_POLL = 1.0  # seconds between looks when there is nothing to do
IDLE_RELEASE_MOVES = 256  # allocator moves when handing frames back (well under 1 ms)
IDLE_STUCK_STEPS = 256  # steps without visible progress before idle work pauses


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner(loop_factory=...)``; None means asyncio's loop."""
    if os.environ.get("TMEM_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def run_in_steps(steps: Iterator[T | None]) -> T:
    """Drive a step generator (None between steps, the result last) on the event loop,
    letting other tasks run between steps: e.g. ``Zcache.stats_steps()``, whose walk
    over millions of pages would otherwise stall every client for tens of ms."""
    for result in steps:
        if result is not None:
            return result
        await asyncio.sleep(0)
    raise ValueError("the step generator ended without a result")


class IdleWork:
    """A store's background work, in steps short enough to run between requests.

    :meth:`step` runs one batch of :meth:`tmem.Zcache.idle_work` (compress staged pages,
    recompress idle ones, compact the allocator). When that is done and the store has
    shrunk since the last look (a TRIM, pages dropped or compressed), it also hands
    sparse frames and the free frames the arena keeps resident for churn back to the OS
    (:meth:`tmem.Zcache.compact_allocator`), so an idle process's RSS follows what it
    stores. Work that keeps saying "more" but changes nothing visible (staged pages,
    frames in use, recompressions) for IDLE_STUCK_STEPS steps counts as done until the
    next look: a background helper must never spin the CPU.
    """

    def __init__(self, zc: Zcache, batch: int = IDLE_BATCH) -> None:
        self.zc = zc
        self.batch = batch
        self.steps = 0
        self.releases = 0  # times frames were handed back after the store shrank
        self._peak = zc.frames_used  # most frames in use since the last hand-back
        self._stuck = 0
        self._before = self._progress()

    def _progress(self) -> tuple[int, int, int]:
        zc = self.zc
        c = zc.counters
        return zc.staged_pages, zc.frames_used, c.recompressed_pages + c.recompress_skipped

    def step(self) -> bool:
        """One batch; True if there is more to do now (yield to the loop, then call
        again), False if the caller may sleep until something changes."""
        zc = self.zc
        self._peak = max(self._peak, zc.frames_used)
        self.steps += 1
        if zc.idle_work(self.batch):
            now = self._progress()
            self._stuck = self._stuck + 1 if now == self._before else 0
            self._before = now
            if self._stuck < IDLE_STUCK_STEPS:
                return True
            log.debug("idle work made no progress in %d steps; pausing", self._stuck)
            self._stuck = 0
            return False
        if zc.frames_used < self._peak:
            zc.compact_allocator(IDLE_RELEASE_MOVES)
            self.releases += 1
        self._peak = zc.frames_used
        return False
