"""asyncio shell around the sans-IO wire Connection: the kernel's r2net sockets.

One TCP connection per node pair: the higher-numbered node dials, the lower one
accepts (as r2net), so there is never a race between two simultaneous dials;
an accepted connection from a peer that already has one replaces it (the peer
restarted or reconnected).  Every connection authenticates with the HMAC
handshake before any data frame; a peer that fails it, or sends a malformed
frame, is dropped and counted.

Requests carry a cookie; replies are matched by cookie with a per-request
timeout; when a connection dies every waiting request fails at once with
:class:`~tmem.ramster.remotify.PeerError` (the kernel's -EHOSTDOWN), and a
request to an unconnected peer fails fast (-ENOTCONN).  Silence longer than
``keepalive`` sends a Ping; longer than ``idle_timeout`` closes the connection.
The dialer reconnects with exponential backoff (``reconnect_min`` doubling up
to ``reconnect_max``, with jitter).

Incoming requests are handed to a synchronous :class:`RequestHandler` in
arrival order on each connection, which is what keeps per-handle ordering
(a flush queued before a put is applied before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tmem.zcache import Oid

from . import fastpath, wire
from .config import ClusterConfig, NodeSpec
from .handshake import Handshake
from .remotify import Blob, Key, PeerError, PutStatus

log = logging.getLogger("tmem.ramster.transport")

_STATUS_TO_ERRNO = {
    PutStatus.STORED: 0,
    PutStatus.FULL: -errno.ENOSPC,
    PutStatus.POOR: -errno.E2BIG,
    PutStatus.BAD: -errno.EINVAL,
}
_ERRNO_TO_STATUS = {v: k for k, v in _STATUS_TO_ERRNO.items()}
# A batch travels as a few frames of about this size, all sent at once: the peer
# works on the first while the sender still encodes (or decodes) the next, so the
# two processes overlap a little instead of strictly taking turns. Measured on
# benchmarks/ramster_vs_redis.py: 128 KiB/32 pages was no better (more per-frame
# work), 1 MiB no better either.
PUT_FRAME_BYTES = 512 << 10
GET_FRAME_PAGES = 128
REPLY_FLUSH = 16 << 10  # a reply this big is written at once (the requester can start on it)


class RequestHandler(Protocol):
    """What a node does with its peers' requests (``client`` = authenticated peer)."""

    def store_foreign(
        self, client: int, persistent: bool, items: Iterable[tuple[Key, bytes, bool]]
    ) -> list[int]: ...

    def get_foreign(self, client: int, keys: Iterable[Key], free: bool) -> list[Blob | None]: ...

    def flush_foreign(self, client: int, keys: Iterable[Key]) -> int: ...

    def flush_foreign_objects(self, client: int, objs: Iterable[tuple[int, Oid]]) -> int: ...

    def destroy_foreign_pools(self, client: int, pools: Iterable[int]) -> int: ...

    def heartbeat(self, hb: wire.Heartbeat, peer: int) -> None: ...


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    dial_failures: int = 0
    handshake_failures: int = 0
    protocol_errors: int = 0
    request_timeouts: int = 0
    requests_sent: int = 0
    requests_received: int = 0
    pings_sent: int = 0
    idle_closes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(slots=True)
class _Conn:
    """One live, authenticated connection."""

    peer: int
    conn: wire.Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_rx: float
    pending: dict[int, asyncio.Future[wire.Message]] = field(default_factory=dict)
    closed: bool = False
    proto: _FrameProtocol | None = None  # receives the frames once authenticated


class _FrameProtocol(asyncio.Protocol):
    """The socket's protocol after the handshake: received bytes go straight into the
    sans-IO Connection and are handled in the same callback (no StreamReader buffer
    and task wake-up in between: two fewer copies of every page, fewer loop turns)."""

    def __init__(self, owner: Transport, link: Link, c: _Conn) -> None:
        self.owner = owner
        self.link = link
        self.c = c
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        c = self.c
        if c.closed:
            return
        self.link.stats.bytes_received += len(data)
        c.last_rx = self.owner.clock()
        c.conn.receive_data(data)
        self.owner._process(self.link, c)

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool | None:
        self.feed(b"")
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._close(self.c, f"connection lost: {exc}" if exc else "connection ended")
        self._paused = False
        self._wake()
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        if self._paused and not self.c.closed:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained


@dataclass(slots=True)
class Link:
    """Everything the transport knows about one peer."""

    spec: NodeSpec
    live: _Conn | None = None
    dialer: asyncio.Task[None] | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    backoff: float = 0.0


class Transport:
    """Connections to every configured peer of ``local``; implements PeerClient."""

    def __init__(
        self,
        cfg: ClusterConfig,
        local: NodeSpec,
        handler: RequestHandler,
        *,
        compressor: str = "lz4",
        clock: Callable[[], float] = time.monotonic,
        max_payload: int = wire.DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.cfg = cfg
        self.local = local
        self.handler = handler
        self.compressor = compressor
        self.clock = clock
        self.max_payload = max_payload
        self.links: dict[int, Link] = {
            n.number: Link(n) for n in cfg.nodes if n.number != local.number
        }
        self.server: asyncio.Server | None = None
        self.cookie = 0
        self.rejected = LinkStats()  # failures before we knew who the peer was
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.on_connect: Callable[[int], None] | None = None

    # -------------------------------------------------------------- lifecycle
    async def start(self, host: str | None = None, port: int | None = None) -> None:
        self.server = await asyncio.start_server(
            self._accepted,
            host or self.local.host,
            self.local.port if port is None else port,
            reuse_address=True,
            backlog=64,
        )
        for link in self.links.values():
            self._maybe_dial(link)
        self._spawn(self._keepalive_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _maybe_dial(self, link: Link) -> None:
        if link.spec.number < self.local.number and link.dialer is None:
            link.dialer = self._spawn(self._dial_loop(link))

    async def stop(self) -> None:
        self._stopping = True
        if self.server is not None:
            self.server.close()
        for link in self.links.values():
            if link.live is not None:
                self._close(link.live, "shutdown")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    def update_nodes(self, cfg: ClusterConfig) -> None:
        """Adopt a reloaded config: dial new peers, drop removed ones."""
        self.cfg = cfg
        wanted = {n.number: n for n in cfg.nodes if n.number != self.local.number}
        for num in [n for n in self.links if n not in wanted]:
            link = self.links.pop(num)
            if link.dialer is not None:
                link.dialer.cancel()
            if link.live is not None:
                self._close(link.live, "removed from the cluster")
        for num, spec in wanted.items():
            old = self.links.get(num)
            if old is None:
                link = self.links[num] = Link(spec)
            else:
                link = old
            if link.spec != spec:
                link.spec = spec
                if link.live is not None:
                    self._close(link.live, "re-addressed")
            self._maybe_dial(link)

    def is_connected(self, node: int) -> bool:
        link = self.links.get(node)
        return link is not None and link.live is not None and not link.live.closed

    def connected(self) -> list[int]:
        return sorted(n for n in self.links if self.is_connected(n))

    # ------------------------------------------------------------ handshakes
    def _handshake(self, initiator: bool, expected: int | None) -> Handshake:
        links = self.links

        def known(number: int, name: str) -> bool:
            link = links.get(number)
            return link is not None and link.spec.name == name

        return Handshake(
            cluster=self.cfg.name,
            secret=self.cfg.secret,
            node=self.local.number,
            name=self.local.name,
            compressor=self.compressor,
            initiator=initiator,
            known_nodes=known,
            expected_peer=expected,
        )

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: wire.Connection,
        stats: LinkStats,
    ) -> int | None:
        """Run the handshake; the authenticated peer number, or None (counted)."""
        writer.write(conn.data_to_send())
        deadline = self.cfg.request_timeout
        try:
            async with asyncio.timeout(deadline):
                while True:
                    data = await reader.read(4096)
                    conn.receive_data(data)
                    out = conn.data_to_send()
                    if out:
                        writer.write(out)
                    while (ev := conn.next_event()) is not wire.NEED_DATA:
                        if isinstance(ev, wire.Authenticated):
                            return ev.peer_node
                        if isinstance(ev, wire.HandshakeFailed):
                            stats.handshake_failures += 1
                            log.warning("handshake failed: %s %s", ev.reason, ev.detail)
                            return None
                        if isinstance(ev, wire.ProtocolError | wire.ConnectionClosed):
                            stats.protocol_errors += isinstance(ev, wire.ProtocolError)
                            stats.handshake_failures += 1
                            return None
                    if not data:
                        stats.handshake_failures += 1
                        return None
        except (TimeoutError, OSError):
            stats.handshake_failures += 1
            return None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = wire.Connection(max_payload=self.max_payload, handshake=self._handshake(False, None))
        peer = await self._authenticate(reader, writer, conn, self.rejected)
        if peer is None or peer not in self.links:
            writer.close()
            return
        link = self.links[peer]
        if link.live is not None:
            self._close(link.live, "replaced by a new connection")
        await self._run(link, conn, reader, writer, buffered=True)

    async def _dial_loop(self, link: Link) -> None:
        rng = random.Random()
        while not self._stopping:
            spec = link.spec
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(spec.host, spec.port), self.cfg.request_timeout
                )
            except (OSError, TimeoutError):
                link.stats.dial_failures += 1
                await self._backoff(link, rng)
                continue
            conn = wire.Connection(
                max_payload=self.max_payload,
                handshake=self._handshake(True, spec.number),
            )
            peer = await self._authenticate(reader, writer, conn, link.stats)
            if peer != spec.number:
                writer.close()
                await self._backoff(link, rng)
                continue
            link.backoff = 0.0
            await self._run(link, conn, reader, writer, buffered=True)
            if not self._stopping:
                await asyncio.sleep(self.cfg.reconnect_min * (0.5 + rng.random()))

    async def _backoff(self, link: Link, rng: random.Random) -> None:
        cfg = self.cfg
        link.backoff = min(cfg.reconnect_max, max(cfg.reconnect_min, link.backoff * 2))
        await asyncio.sleep(link.backoff * (0.5 + rng.random() / 2))

    # ------------------------------------------------------------- data path
    async def _run(
        self,
        link: Link,
        conn: wire.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        buffered: bool,
    ) -> None:
        c = _Conn(link.spec.number, conn, reader, writer, self.clock())
        link.live = c
        link.stats.connects += 1
        log.info("connected to node %s (%d)", link.spec.name, link.spec.number)
        # From here on the socket feeds the Connection directly. Bytes the handshake's
        # StreamReader already buffered go first (asyncio keeps them in ``_buffer``).
        proto = c.proto = _FrameProtocol(self, link, c)
        transport = writer.transport
        buffered_bytes = getattr(reader, "_buffer", None)
        early = bytes(buffered_bytes) if buffered_bytes else b""
        if buffered_bytes:
            buffered_bytes.clear()
        transport.set_protocol(proto)
        resume: Callable[[], None] | None = getattr(transport, "resume_reading", None)
        if resume is not None:  # (uvloop's transports are not asyncio.ReadTransport)
            resume()  # the StreamReader may have paused reading while it was full
        if self.on_connect is not None:
            self.on_connect(link.spec.number)
        try:
            # Events the handshake read may have buffered behind Authenticated.
            self._process(link, c)
            if early:
                proto.feed(early)
            if reader.at_eof() or transport.is_closing():
                proto.feed(b"")
                self._close(c, "peer closed")
            await proto.done
        finally:
            self._close(c, "connection ended")

    def _process(self, link: Link, c: _Conn) -> None:
        conn = c.conn
        out: list[bytes] = []
        while (ev := conn.next_event()) is not wire.NEED_DATA:
            if isinstance(ev, wire.Message):
                reply = self._dispatch(link, c, ev)
                if reply is not None and not conn.closed:
                    out.append(conn.send(reply))
                    if len(out[-1]) >= REPLY_FLUSH and not c.closed:
                        data = b"".join(out)
                        out.clear()
                        link.stats.bytes_sent += len(data)
                        c.writer.write(data)
            elif isinstance(ev, wire.ProtocolError | wire.HandshakeFailed):
                link.stats.protocol_errors += 1
                log.warning("node %d: %s %s: dropping", c.peer, ev.reason, ev.detail)
                self._close(c, ev.reason)
            elif isinstance(ev, wire.ConnectionClosed):
                self._close(c, "peer closed")
        if out and not c.closed:
            data = b"".join(out)
            link.stats.bytes_sent += len(data)
            c.writer.write(data)

    def _dispatch(self, link: Link, c: _Conn, msg: wire.Message) -> wire.Message | None:
        h = self.handler
        peer = c.peer
        cookie = msg.cookie
        if isinstance(msg, wire.Status | wire.GetBatchReply | wire.GetReply | wire.Error):
            fut = c.pending.pop(cookie, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return None
        if isinstance(msg, wire.Heartbeat):
            h.heartbeat(msg, peer)
            return None
        if isinstance(msg, wire.Ping):
            return wire.Pong(cookie=cookie)
        if isinstance(msg, wire.Pong):
            return None
        link.stats.requests_received += 1
        if isinstance(msg, wire.PutBatch):
            items, persistent, same = fastpath.put_entries(msg.items)
            if not same:
                return wire.Status(cookie=cookie, status=-errno.EINVAL)
            res = h.store_foreign(peer, persistent, items)
            return wire.Status(cookie=cookie, results=tuple([_STATUS_TO_ERRNO[r] for r in res]))
        if isinstance(msg, wire.GetBatch):
            pages = h.get_foreign(peer, fastpath.key_tuples(msg.keys), msg.free)
            return wire.GetBatchReply(cookie=cookie, items=fastpath.get_results(msg.keys, pages))
        if isinstance(msg, wire.FlushBatch):
            n = 0
            for item in msg.items:
                k = item.key
                if item.whole_object:
                    n += h.flush_foreign_objects(peer, [(k.pool_id, k.oid)])
                else:
                    n += h.flush_foreign(peer, [(k.pool_id, k.oid, k.index)])
            return wire.Status(cookie=cookie, results=(n,))
        if isinstance(msg, wire.DestroyPool):
            n = h.destroy_foreign_pools(peer, [msg.pool_id])
            return wire.Status(cookie=cookie, results=(n,))
        if isinstance(msg, wire.Put):
            k = msg.key
            res = h.store_foreign(
                peer, k.persistent, [((k.pool_id, k.oid, k.index), bytes(msg.data), msg.compressed)]
            )
            return wire.Status(cookie=cookie, status=_STATUS_TO_ERRNO[res[0]])
        if isinstance(msg, wire.Get):
            k = msg.key
            got = h.get_foreign(peer, [(k.pool_id, k.oid, k.index)], msg.free)[0]
            if got is None:
                return wire.GetReply(cookie=cookie, key=k, data=None)
            return wire.GetReply(cookie=cookie, key=k, data=got[0], compressed=got[1])
        if isinstance(msg, wire.FlushPage):
            k = msg.key
            n = h.flush_foreign(peer, [(k.pool_id, k.oid, k.index)])
            return wire.Status(cookie=cookie, results=(n,))
        if isinstance(msg, wire.FlushObject):
            k = msg.key
            n = h.flush_foreign_objects(peer, [(k.pool_id, k.oid)])
            return wire.Status(cookie=cookie, results=(n,))
        return wire.Error(cookie=cookie, status=-errno.ENOPROTOOPT, reason="no handler")

    def _close(self, c: _Conn, why: str) -> None:
        if c.closed:
            return
        c.closed = True
        c.conn.close()
        with contextlib.suppress(Exception):
            c.writer.close()
        if c.proto is not None:
            c.proto.connection_lost(None)
        link = self.links.get(c.peer)
        if link is not None and link.live is c:
            link.live = None
            link.stats.disconnects += 1
            log.info("disconnected from node %d: %s", c.peer, why)
        for fut in c.pending.values():
            if not fut.done():
                fut.set_exception(PeerError(f"node {c.peer}: {why}"))
        c.pending.clear()

    async def _keepalive_loop(self) -> None:
        cfg = self.cfg
        tick = min(cfg.keepalive, cfg.idle_timeout) / 2
        while True:
            await asyncio.sleep(tick)
            now = self.clock()
            for link in list(self.links.values()):
                c = link.live
                if c is None or c.closed:
                    continue
                silent = now - c.last_rx
                if silent > cfg.idle_timeout:
                    link.stats.idle_closes += 1
                    self._close(c, f"idle for {silent:.1f}s")
                elif silent > cfg.keepalive:
                    link.stats.pings_sent += 1
                    self._write(link, c, wire.Ping(cookie=self._cookie()))

    # ------------------------------------------------------------ requests
    def _cookie(self) -> int:
        self.cookie = (self.cookie + 1) & 0xFFFFFFFFFFFFFFFF
        return self.cookie

    def _live(self, node: int) -> tuple[Link, _Conn]:
        link = self.links.get(node)
        if link is None:
            raise PeerError(f"node {node} is not in the cluster")
        c = link.live
        if c is None or c.closed:
            raise PeerError(f"node {node} ({link.spec.name}) is not connected")
        return link, c

    def _write(self, link: Link, c: _Conn, msg: wire.Message) -> None:
        try:
            data = c.conn.send(msg)
        except wire.ConnectionClosedError:
            raise PeerError(f"node {c.peer}: connection closed") from None
        link.stats.bytes_sent += len(data)
        c.writer.write(data)

    def send_oneway(self, node: int, msg: wire.Message) -> bool:
        """Fire-and-forget (heartbeats); False if the peer is not connected."""
        try:
            link, c = self._live(node)
            self._write(link, c, msg)
        except PeerError:
            return False
        return True

    async def request(
        self, node: int, make: Callable[..., wire.Message], **fields: Any
    ) -> wire.Message:
        """Send a request and wait for the reply with the same cookie."""
        link, c = self._live(node)
        cookie = self._cookie()
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        c.pending[cookie] = fut
        link.stats.requests_sent += 1
        try:
            self._write(link, c, make(cookie=cookie, **fields))
            if c.proto is not None and c.writer.transport.get_write_buffer_size() > (1 << 22):
                await c.proto.drain()
            async with asyncio.timeout(self.cfg.request_timeout):
                reply = await fut
        except TimeoutError:
            link.stats.request_timeouts += 1
            raise PeerError(f"node {node}: request timed out") from None
        except (OSError, ConnectionError) as exc:
            self._close(c, str(exc))
            raise PeerError(f"node {node}: {exc}") from None
        finally:
            c.pending.pop(cookie, None)
        if isinstance(reply, wire.Error):
            raise PeerError(f"node {node} refused: {reply.reason} ({reply.status})")
        return reply

    # ------------------------------------------------------ PeerClient API
    def _pkey(self, key: Key, persistent: bool) -> wire.PageKey:
        pool_id, oid, index = key
        return wire.PageKey(self.local.number, pool_id, persistent, oid, index)

    async def put_pages(
        self, node: int, persistent: bool, items: list[tuple[Key, bytes, bool]]
    ) -> list[int]:
        witems = fastpath.put_items(self.local.number, persistent, items)
        chunks = list(wire.chunk_put_items(witems, min(self.max_payload, PUT_FRAME_BYTES)))
        replies = await asyncio.gather(
            *(self.request(node, wire.PutBatch, items=ch) for ch in chunks)
        )
        out: list[int] = []
        for ch, reply in zip(chunks, replies, strict=True):
            if not isinstance(reply, wire.Status) or len(reply.results) != len(ch):
                raise PeerError(f"node {node}: bad put reply")
            out.extend(_ERRNO_TO_STATUS.get(r, PutStatus.BAD) for r in reply.results)
        return out

    async def get_pages(self, node: int, keys: list[Key], free: bool) -> list[Blob | None]:
        """Fetch pages in GetBatch frames of at most GET_FRAME_PAGES (and what the reply
        size limit allows: a raw page is 4 KiB), all in flight at once, in even chunks."""
        most = min(GET_FRAME_PAGES, max(1, (self.max_payload - 64) // (wire.ITEM_OVERHEAD + 4096)))
        nchunks = max(1, -(-len(keys) // most))
        per = -(-len(keys) // nchunks) if keys else 1
        me = self.local.number
        chunks = [fastpath.page_keys(me, keys, i, i + per) for i in range(0, len(keys), per)]
        replies = await asyncio.gather(
            *(self.request(node, wire.GetBatch, keys=ch, free=free) for ch in chunks)
        )
        out: list[Blob | None] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            if not isinstance(reply, wire.GetBatchReply) or len(reply.items) != len(chunk):
                raise PeerError(f"node {node}: bad get reply")
            out.extend(fastpath.blobs(reply.items))
        return out

    async def _flush(self, node: int, items: list[wire.FlushItem]) -> None:
        per = max(1, (self.max_payload - 64) // wire.KEY_SIZE)
        for i in range(0, len(items), per):
            chunk = items[i : i + per]
            await self.request(node, wire.FlushBatch, items=chunk)

    async def flush_pages(self, node: int, keys: list[Key]) -> None:
        await self._flush(node, [wire.FlushItem(self._pkey(k, True)) for k in keys])

    async def flush_objects(self, node: int, objs: list[tuple[int, Oid]]) -> None:
        await self._flush(
            node,
            [wire.FlushItem(self._pkey((p, o, wire.OBJECT_INDEX), True), True) for p, o in objs],
        )

    async def destroy_pools(self, node: int, pools: list[int]) -> None:
        for p in pools:
            await self.request(
                node,
                wire.DestroyPool,
                client=self.local.number,
                pool_id=p,
                persistent=True,
            )

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, int | float]:
        s: dict[str, int | float] = {
            "handshake_failures": self.rejected.handshake_failures
            + sum(lk.stats.handshake_failures for lk in self.links.values()),
            "protocol_errors": self.rejected.protocol_errors
            + sum(lk.stats.protocol_errors for lk in self.links.values()),
            "peers_connected": len(self.connected()),
        }
        for name in LinkStats.__dataclass_fields__:
            if name in ("handshake_failures", "protocol_errors"):
                continue
            s[f"net_{name}"] = sum(getattr(lk.stats, name) for lk in self.links.values())
        return s

    def peer_table(self) -> dict[int, dict[str, object]]:
        return {
            num: {
                "connected": self.is_connected(num),
                **{k: getattr(lk.stats, k) for k in LinkStats.__dataclass_fields__},
            }
            for num, lk in sorted(self.links.items())
        }
