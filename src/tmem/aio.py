"""The event loop every tmem service runs on, and how long work shares it.

uvloop when installed (about half the per-request overhead of asyncio's own loop),
else asyncio's. ``TMEM_EVENT_LOOP=asyncio`` forces the standard loop, so benchmarks
and tests can compare both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


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
