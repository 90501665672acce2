"""``tmem serve --cluster FILE --node NAME``: a cluster node that also serves NBD.

The NBD server of :mod:`tmem.nbd` is built from the same options as a plain
``tmem serve`` (``--listen``, ``--size``, ``--memory``, ``--backing``...), but its
block device lives on the node's Zcache, so the node's remotify worker moves the
device's cold frames to peers and a read of a remote page is fetched back
(:attr:`BlockDevice.remote_fetch` -> :meth:`PageEngine.fetch_remote`).

Writes are held while the node makes room (remotifies) instead of failing for
lack of local memory, as long as a peer can take pages: the device asks the
engine for room before each request (:class:`ClusterBlockDevice`).  Only this
module imports :mod:`tmem.nbd`; plain ``tmem serve`` never imports tmem.ramster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from tmem.compress import PAGE_SIZE
from tmem.errors import ConfigError, RemotePageError
from tmem.nbd.blockdev import OBJ_MASK, OBJ_SHIFT, PAGE_SHIFT, BlockDevice
from tmem.nbd.config import ServeConfig
from tmem.nbd.server import serve_async

from .config import load_config
from .node import Node
from .remotify import PageEngine

log = logging.getLogger("tmem.ramster.export")
T = TypeVar("T")


class NeedRoom(RemotePageError):
    """Raised by the synchronous write path when RAM is short: the NBD server then
    serves the request on its async path (as for a remote page), where the write
    is held until the node has made room."""

    def __init__(self) -> None:
        super().__init__(None)


class ClusterBlockDevice(BlockDevice):
    """A BlockDevice whose requests first make room on the node (hold, don't fail)."""

    def __init__(self, engine: PageEngine, size: int, *, backing: str | None = None) -> None:
        super().__init__(size, backing=backing, zcache=engine.zc)
        self.engine = engine
        engine.adopt_pool(self.pool, persistent=True)
        if self.cache_pool is not None:
            engine.adopt_pool(self.cache_pool, persistent=False)
        self.remote_fetch = engine.fetch_remote
        self._repatriating = asyncio.Lock()

    async def _room(self, length: int) -> None:
        """Frames for ``length`` bytes of pages (capped: big requests get a quarter
        of RAM up front, the worker keeps refilling headroom behind them)."""
        want = self._want(length)
        if self.engine.zc.frames_free < want:
            await self.engine.make_room(want)

    def _want(self, length: int) -> int:
        zc = self.engine.zc
        return min(length // PAGE_SIZE + 1, max(1, zc.frames_total // 4))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.engine.zc.frames_free < self._want(len(data)):
            raise NeedRoom()  # -> the server retries on the async path (awrite)
        super().write(offset, data)

    async def awrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._room(len(data))
        await super().awrite(offset, data)

    def _remote_pages(self, offset: int, length: int) -> int:
        """How many pages of the range live on peers (the read brings them home)."""
        zc, pool = self.engine.zc, self.pool
        first, last = offset >> PAGE_SHIFT, (offset + max(length, 1) - 1) >> PAGE_SHIFT
        n = 0
        for page in range(first, last + 1):
            pampd = zc.lookup(pool, (page >> OBJ_SHIFT, 0, 0), page & OBJ_MASK)
            n += pampd is not None and type(pampd) is not int
        return n

    async def _read(self, offset: int, length: int, read: Callable[[], Awaitable[T]]) -> T:
        """Reads that repatriate pages go one at a time, each with room made first, so
        parallel readers cannot bring home more than RAM holds at once."""
        if not self.engine.remote or not self._remote_pages(offset, length):
            return await read()
        async with self._repatriating:
            need = self._remote_pages(offset, length)
            if need and self.engine.zc.frames_free < need + 1:
                await self.engine.make_room(need + 1)
            return await read()

    async def aread(self, offset: int, length: int) -> bytes:
        return await self._read(offset, length, partial(super().aread, offset, length))

    async def aread_extents(self, offset: int, length: int) -> list[bytes | int]:
        return await self._read(offset, length, partial(super().aread_extents, offset, length))


def serve_cluster_export(
    config: ServeConfig,
    cluster_file: str | Path,
    node_name: str,
    *,
    control: str | Path | None = None,
    metrics: tuple[str, int] | None = None,
) -> None:
    """Run a cluster node and its NBD export until SIGTERM/SIGINT (SIGHUP reloads)."""
    cfg = load_config(cluster_file)

    async def main() -> None:
        node = Node(
            cfg,
            node_name,
            memory=config.memory,
            compressor=config.compressor,
            huge_pages=config.backing is None,
            control=control,
            metrics=metrics,
            # the serve options given (file or command line) win over the cluster file
            allocator=config.allocator if "allocator" in config.given else None,
            prefault=config.arena_prefault if {"prefault", "mlock"} & config.given else None,
            recompress=config.recompress if "recompress" in config.given else None,
            recompress_after=(
                config.recompress_after if "recompress_after" in config.given else None
            ),
        )
        device = ClusterBlockDevice(node.engine, config.size, backing=config.backing)
        node.attach_export(device)
        loop = asyncio.get_running_loop()

        def hup() -> None:
            try:
                node.reload()
            except ConfigError as exc:
                log.error("reload refused: %s", exc)

        await node.start()
        loop.add_signal_handler(signal.SIGHUP, hup)
        try:
            await serve_async(config, device=device)  # returns on SIGTERM/SIGINT
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            await node.stop()

    asyncio.run(main())
