"""A RAMster node: Zcache + transport + membership + remotify worker + control API.

``Node.run()`` is the whole process: it listens for peers on its configured
address, dials lower-numbered peers, sends heartbeats, declares silent peers
down (and re-replicates what they held), remotifies LRU pages when local free
frames fall under the low watermark, repatriates when memory frees up, and
serves its local clients.

Local clients reach the node through its NBD export (``tmem serve --cluster``,
see :mod:`tmem.ramster.export`, which builds the device on the node's Zcache)
and through the *control API*: length-prefixed msgpack requests on a unix
socket (``--control PATH``) for pools, pages, counters and reload.

Control frames are bounded (``MAX_CONTROL_FRAME``) before anything is buffered;
a malformed request gets an error reply, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

from tmem.aio import IDLE_POLL, IdleWork, loop_factory, run_in_steps
from tmem.errors import ConfigError, TmemError
from tmem.zcache import Oid, Zcache

from . import wire
from .config import ClusterConfig, NodeSpec, diff, load_config
from .membership import Event, EventKind, Membership
from .policy import make_policy
from .remotify import PageEngine
from .transport import Transport

log = logging.getLogger("tmem.ramster.node")

MAX_CONTROL_FRAME = 64 << 20
_LEN = struct.Struct(">I")
_U64 = (1 << 64) - 1


class ControlError(TmemError, ValueError):
    """A control request that does not make sense."""


def _oid(v: Any) -> Oid:
    if not (isinstance(v, list | tuple) and len(v) == 3):
        raise ControlError(f"oid must be 3 integers, got {v!r}")
    a, b, c = v
    for w in (a, b, c):
        if not isinstance(w, int) or not 0 <= w <= _U64:
            raise ControlError(f"oid word out of range: {w!r}")
    return (a, b, c)


class Node:
    """One cluster member (see module docstring)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        name: str,
        *,
        memory: int | str = "64MiB",
        compressor: str = "lz4",
        huge_pages: bool = False,
        listen: tuple[str, int] | None = None,
        control: str | Path | None = None,
        metrics: tuple[str, int] | None = None,
        allocator: str | None = None,
        prefault: bool | None = None,
        recompress: str | None = None,
        recompress_after: float | None = None,
    ) -> None:
        """The store options (``allocator``, ``prefault``, ``recompress``,
        ``recompress_after``): None takes the cluster file's value, which defaults to
        what a plain Zcache does."""
        self.cfg = cfg
        self.metrics_addr = metrics
        self._metrics_server: asyncio.Server | None = None
        self.spec: NodeSpec = cfg.node(name)
        if listen is not None:
            self.spec = replace(self.spec, host=listen[0], port=listen[1])
        self.zc = Zcache(
            memory,
            compressor,
            huge_pages=huge_pages,
            allocator=cfg.allocator if allocator is None else allocator,
            prefault=cfg.prefault if prefault is None else prefault,
            recompress=cfg.recompress if recompress is None else recompress,
            recompress_after=cfg.recompress_after if recompress_after is None else recompress_after,
        )
        self.idle_work = IdleWork(self.zc)
        self.incarnation = time.time_ns() & _U64
        self.hb_seq = 0
        self.control_path = Path(control) if control is not None else None
        self.membership = Membership(self.spec, cfg.nodes, cfg.dead_after, on_event=self._on_event)
        self.transport = Transport(cfg, self.spec, self, compressor=compressor)
        self.transport.on_connect = self._on_connect
        self.engine = PageEngine(
            self.zc,
            node_number=self.spec.number,
            peers=self.transport,
            policy=make_policy(cfg.policy, cfg.target_number),
            live_peers=self.live_peers,
            replicas=cfg.replicas,
            low_watermark=cfg.low_watermark,
            high_watermark=cfg.high_watermark,
            batch=cfg.remotify_batch,
            remotify_ephemeral=cfg.remotify_ephemeral,
            remotify_persistent=cfg.remotify_persistent,
        )
        self.down_times: dict[int, float] = {}
        self.worker_errors = 0
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._control_server: asyncio.Server | None = None
        self.exports: list[object] = []

    # ------------------------------------------------------------ membership
    def live_peers(self) -> dict[int, int]:
        """Connected, heartbeating peers and the room they advertise."""
        free = self.membership.free_frames()
        return {n: f for n, f in free.items() if self.transport.is_connected(n)}

    def _on_event(self, ev: Event) -> None:
        if ev.kind is EventKind.DOWN:
            self.down_times[ev.node] = ev.at
            self.engine.node_lost(ev.node, restarted=False)
        elif ev.kind is EventKind.RESTARTED or ev.kind is EventKind.REMOVED:
            self.engine.node_lost(ev.node, restarted=True)
        self._wake.set()

    def _on_connect(self, node: int) -> None:
        self._send_heartbeat(node)

    def heartbeat(self, hb: wire.Heartbeat, peer: int) -> None:
        if hb.node != peer:
            return  # a peer may only speak for itself
        self.membership.heard(peer, hb.incarnation, hb.free_frames, hb.total_frames)

    def _send_heartbeat(self, node: int) -> None:
        self.hb_seq += 1
        self.transport.send_oneway(
            node,
            wire.Heartbeat(
                node=self.spec.number,
                incarnation=self.incarnation,
                seq=self.hb_seq,
                free_frames=self.engine.room(),
                total_frames=self.zc.frames_total,
            ),
        )

    # ------------------------------------------------- RequestHandler (peers)
    def store_foreign(self, client: int, persistent: bool, items: Any) -> list[int]:
        return self.engine.store_foreign(client, persistent, items)

    def get_foreign(self, client: int, keys: Any, free: bool) -> list[tuple[bytes, bool] | None]:
        return self.engine.get_foreign(client, keys, free)

    def flush_foreign(self, client: int, keys: Any) -> int:
        return self.engine.flush_foreign(client, keys)

    def flush_foreign_objects(self, client: int, objs: Any) -> int:
        return self.engine.flush_foreign_objects(client, objs)

    def destroy_foreign_pools(self, client: int, pools: Any) -> int:
        return self.engine.destroy_foreign_pools(client, pools)

    # ------------------------------------------------------------- loops
    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                for n in self.transport.connected():
                    self._send_heartbeat(n)
                self.membership.tick()
            except Exception:  # keep heartbeating whatever one event handler did
                self.worker_errors += 1
                log.exception("heartbeat loop failed; continuing")
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _worker_loop(self) -> None:
        """The kernel's ramster_remotify work item, plus replication and selfshrink."""
        eng = self.engine
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.remotify_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await eng.drain_flushes()
                while eng.need_remotify():
                    if await eng.remotify_once() == 0:
                        break
                await eng.rereplicate()
                if eng.c.remote_pers_pages and self.zc.frames_free > eng.high_frames:
                    await eng.repatriate()
            except TmemError as exc:
                log.warning("remotify worker: %s", exc)
            except Exception:  # a bug must not silently stop remotify for good
                self.worker_errors += 1
                log.exception("remotify worker failed; continuing")

    async def _idle_loop(self) -> None:
        """The store's background work (recompression, compaction, handing frames back)
        for a node without an NBD export, whose server would run it between requests.
        Steps are short (a batch of pages), so peers' requests are served in between."""
        work = self.idle_work
        while True:
            try:
                more = work.step()
            except Exception:  # a bug must not stop the node; look again later
                self.worker_errors += 1
                log.exception("idle work failed; retrying in %.0f s", IDLE_POLL)
                more = False
            await asyncio.sleep(0 if more else IDLE_POLL)

    async def start(self) -> None:
        await self.transport.start(self.spec.host, self.spec.port)
        if self.control_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
            self._control_server = await asyncio.start_unix_server(
                self._control_client, str(self.control_path)
            )
        if self.metrics_addr is not None:
            self._metrics_server = await asyncio.start_server(
                self._metrics_client, self.metrics_addr[0], self.metrics_addr[1]
            )
        self._tasks = [
            asyncio.ensure_future(self._heartbeat_loop()),
            asyncio.ensure_future(self._worker_loop()),
        ]
        if not self.exports:  # an NBD export's server runs idle work between requests
            self._tasks.append(asyncio.ensure_future(self._idle_loop()))
        log.info(
            "node %s (%d) of cluster %s listening on %s:%d",
            self.spec.name,
            self.spec.number,
            self.cfg.name,
            self.spec.host,
            self.spec.port,
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        for server in (self._control_server, self._metrics_server):
            if server is not None:
                server.close()
        await self.transport.stop()
        if self.control_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()

    def reload(self, cfg: ClusterConfig | None = None) -> None:
        """Re-read the cluster file (SIGHUP): connect to new nodes, drop removed ones."""
        if cfg is None:
            if self.cfg.path is None:
                raise ConfigError("no cluster file to reload")
            cfg = load_config(self.cfg.path)
        d = diff(self.cfg, cfg)
        cfg.node(self.spec.name)  # we must still be in it
        self.cfg = cfg
        self.membership.set_nodes(cfg.nodes)
        self.transport.update_nodes(cfg)
        log.info(
            "reloaded: +%s -%s",
            [n.name for n in d.added],
            [n.name for n in d.removed],
        )

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the cluster file."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        def hup() -> None:
            try:
                self.reload()
            except ConfigError as exc:
                log.error("reload refused: %s", exc)

        loop.add_signal_handler(signal.SIGHUP, hup)
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def attach_export(self, export: object) -> None:
        """Keep a reference to a front end (e.g. the NBD export) serving this node."""
        self.exports.append(export)

    # -------------------------------------------------------------- stats
    async def stats(self) -> dict[str, Any]:
        """Zcache counters plus the node's; zcache's page walk runs in steps, so a scrape
        of a node holding millions of pages does not stall its peers' requests."""
        s: dict[str, Any] = dict(await run_in_steps(self.zc.stats_steps()))
        s.update(self._node_stats())
        return s

    def _node_stats(self) -> dict[str, Any]:
        """Everything but the Zcache counters: RAMster engine, membership, transport, peers."""
        s: dict[str, Any] = {}
        s["frames_total"] = self.zc.frames_total
        s["frames_free"] = self.zc.frames_free
        s.update(self.engine.stats())
        s.update(self.membership.stats())
        s.update(self.transport.stats())
        s["node"] = self.spec.name
        s["node_number"] = self.spec.number
        s["incarnation"] = self.incarnation
        s["worker_errors"] = self.worker_errors
        net = self.transport.peer_table()
        peers = []
        for row in self.membership.peer_table():
            num = row["number"]
            assert isinstance(num, int)
            row = dict(row)
            row.update(net.get(num, {}))
            peers.append(row)
        s["peers"] = peers
        return s

    async def stats_sections(self) -> dict[str, Any]:
        """``/stats`` JSON, in the sections ``tmem stats --url`` prints as tables."""
        zcache = await run_in_steps(self.zc.stats_steps())
        ramster = self._node_stats()
        peers = {
            str(p["node"]): {k: v for k, v in p.items() if k != "node"}
            for p in ramster.pop("peers")
        }
        return {"zcache": zcache, "ramster": ramster, "peers": peers}

    def metrics_text(self, stats: dict[str, Any]) -> bytes:
        """Prometheus exposition of :meth:`stats`' result (counters, gauges, peer state)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily

        class _Collector:
            def collect(self) -> Any:
                for k, v in sorted(stats.items()):
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        continue
                    yield GaugeMetricFamily(f"tmem_ramster_{k}", k, value=v)
                up = GaugeMetricFamily(
                    "tmem_ramster_peer_up", "1 if the peer is up", labels=["peer"]
                )
                free = GaugeMetricFamily(
                    "tmem_ramster_peer_free_frames", "advertised free frames", labels=["peer"]
                )
                conn = GaugeMetricFamily(
                    "tmem_ramster_peer_connected", "1 if connected", labels=["peer"]
                )
                for p in stats["peers"]:
                    name = str(p["node"])
                    up.add_metric([name], 1.0 if p["state"] == "up" else 0.0)
                    free.add_metric([name], float(p["free_frames"]))
                    conn.add_metric([name], 1.0 if p.get("connected") else 0.0)
                yield up
                yield free
                yield conn

        reg = CollectorRegistry()
        reg.register(_Collector())
        out: bytes = generate_latest(reg)
        return out

    async def _metrics_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A minimal HTTP/1.0 responder: GET /metrics and /stats, answered on the event loop."""
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].split()
            path = line[1].split(b"?")[0] if len(line) >= 2 and line[0] == b"GET" else b""
            if path == b"/metrics":
                body = self.metrics_text(await self.stats())
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            elif path == b"/stats":
                body = json.dumps(await self.stats_sections(), default=str).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
            else:
                body = b"not found\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    # ---------------------------------------------------------- control API
    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    hdr = await reader.readexactly(_LEN.size)
                except asyncio.IncompleteReadError:
                    return
                (n,) = _LEN.unpack(hdr)
                if n > MAX_CONTROL_FRAME:
                    writer.write(_frame(["err", f"control frame of {n} bytes is too big"]))
                    return
                body = await reader.readexactly(n)
                try:
                    req = msgpack.unpackb(body, raw=False, strict_map_key=False)
                    if not isinstance(req, list) or not req or not isinstance(req[0], str):
                        raise ControlError("a request is [op, args...]")
                    result = await self._control(req[0], req[1:])
                    reply: Any = ["ok", result]
                except (TmemError, ValueError, TypeError, KeyError) as exc:
                    reply = ["err", f"{type(exc).__name__}: {exc}"]
                writer.write(_frame(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _control(self, op: str, args: list[Any]) -> Any:
        eng = self.engine
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "new_pool": self._c_new_pool,
            "put_many": self._c_put_many,
            "get_many": self._c_get_many,
            "flush_many": self._c_flush_many,
        }
        if op in handlers:
            return await handlers[op](*args)
        if op == "flush_object":
            pool, oid = args
            return eng.flush_object(pool, _oid(oid))
        if op == "destroy_pool":
            (pool,) = args
            return eng.destroy_pool(pool)
        if op == "stats":
            return await self.stats()
        if op == "remotify":
            (limit,) = args
            return await eng.remotify_once(int(limit))
        if op == "sync":
            # Drain queued flushes and finish replication (tests, shutdown).
            await eng.drain_flushes()
            await eng.rereplicate()
            return True
        if op == "reload":
            self.reload()
            return True
        raise ControlError(f"unknown control op {op!r}")

    async def _c_new_pool(self, persistent: bool) -> int:
        return self.engine.new_pool(bool(persistent))

    async def _c_put_many(self, pool: int, items: list[Any]) -> list[bool]:
        out = []
        for oid, index, page in items:
            out.append(await self.engine.put(pool, _oid(oid), index, page))
        return out

    async def _c_get_many(
        self, pool: int, items: list[Any], free: bool | None = None
    ) -> list[bytes | None]:
        return [await self.engine.get(pool, _oid(oid), index, free) for oid, index in items]

    async def _c_flush_many(self, pool: int, items: list[Any]) -> int:
        return sum(self.engine.flush_page(pool, _oid(oid), index) for oid, index in items)


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class ControlClient:
    """Blocking client of a node's control socket (tests, CLI, benchmarks)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def call(self, op: str, *args: Any) -> Any:
        self.sock.sendall(_frame([op, *args]))
        (n,) = _LEN.unpack(self._read(_LEN.size))
        if n > MAX_CONTROL_FRAME:
            raise ControlError(f"reply of {n} bytes is too big")
        status, value = msgpack.unpackb(self._read(n), raw=False, strict_map_key=False)
        if status != "ok":
            raise ControlError(str(value))
        return value

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("node closed the control connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_node(
    cluster: str | Path,
    name: str,
    *,
    memory: int | str = "64MiB",
    compressor: str = "lz4",
    huge_pages: bool = False,
    listen: tuple[str, int] | None = None,
    control: str | Path | None = None,
    metrics: tuple[str, int] | None = None,
    allocator: str | None = None,
    prefault: bool | None = None,
    recompress: str | None = None,
    recompress_after: float | None = None,
) -> None:
    """Build a node from its cluster file and run it (the ``tmem cluster serve`` body);
    store options left None come from the cluster file."""
    cfg = load_config(cluster)
    node = Node(
        cfg,
        name,
        memory=memory,
        compressor=compressor,
        huge_pages=huge_pages,
        listen=listen,
        control=control,
        metrics=metrics,
        allocator=allocator,
        prefault=prefault,
        recompress=recompress,
        recompress_after=recompress_after,
    )
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(node.run())


__all__ = ["ControlClient", "ControlError", "Node", "serve_node"]
