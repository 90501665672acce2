"""The event loop every tmem service runs on.

uvloop when installed (about half the per-request overhead of asyncio's own loop),
else asyncio's. ``TMEM_EVENT_LOOP=asyncio`` forces the standard loop, so benchmarks
and tests can compare both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


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
