"""The asyncio transport against real sockets on 127.0.0.1, in one process."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from typing import Any

from tmem.ramster import wire
from tmem.ramster.config import ClusterConfig, NodeSpec
from tmem.ramster.handshake import Handshake
from tmem.ramster.remotify import Blob, Key, PeerError, PutStatus
from tmem.ramster.transport import Transport

SECRET = b"transport-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cfg(**kw: Any) -> ClusterConfig:
    nodes = (
        NodeSpec("a", 1, "127.0.0.1", free_port()),
        NodeSpec("b", 2, "127.0.0.1", free_port()),
    )
    base: dict[str, Any] = {
        "keepalive": 0.2,
        "idle_timeout": 0.6,
        "request_timeout": 0.5,
        "reconnect_min": 0.05,
        "reconnect_max": 0.2,
        "replicas": 1,
    }
    base.update(kw)
    return ClusterConfig(name="t", secret=SECRET, nodes=nodes, **base)


class Store:
    """A RequestHandler that keeps pages in a dict."""

    def __init__(self) -> None:
        self.pages: dict[tuple[int, Key], bytes] = {}
        self.heartbeats: list[wire.Heartbeat] = []

    def store_foreign(
        self, client: int, persistent: bool, items: Iterable[tuple[Key, bytes, bool]]
    ) -> list[int]:
        out = []
        for k, d, _compressed in items:
            self.pages[(client, k)] = d
            out.append(PutStatus.STORED)
        return out

    def get_foreign(self, client: int, keys: Iterable[Key], free: bool) -> list[Blob | None]:
        get = self.pages.pop if free else self.pages.get
        out: list[Blob | None] = []
        for k in keys:
            d = get((client, k), None)
            out.append(None if d is None else (d, False))
        return out

    def flush_foreign(self, client: int, keys: Iterable[Key]) -> int:
        return sum(self.pages.pop((client, k), None) is not None for k in keys)

    def flush_foreign_objects(self, client: int, objs: Iterable[tuple[int, Any]]) -> int:
        return 0

    def destroy_foreign_pools(self, client: int, pools: Iterable[int]) -> int:
        return 0

    def heartbeat(self, hb: wire.Heartbeat, peer: int) -> None:
        self.heartbeats.append(hb)


async def wait(pred: Any, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.01)


def test_pair_connects_exchanges_batches_and_reconnects() -> None:
    async def main() -> None:
        c = cfg()
        sa, sb = Store(), Store()
        ta = Transport(c, c.nodes[0], sa)
        tb = Transport(c, c.nodes[1], sb)
        await tb.start()  # b dials a (higher dials lower); a is not up yet
        await wait(lambda: tb.links[1].stats.dial_failures >= 3)  # it keeps retrying
        await ta.start()
        await wait(lambda: ta.is_connected(2) and tb.is_connected(1))
        page = bytes(range(256)) * 16
        keys = [(0, (1, 2, 3), i) for i in range(600)]  # > one frame: chunked
        st = await ta.put_pages(2, True, [(k, page, False) for k in keys])
        assert st == [PutStatus.STORED] * 600
        assert len(sb.pages) == 600 and all(cl == 1 for cl, _ in sb.pages)
        got = await ta.get_pages(2, [*keys[:3], (9, (0, 0, 0), 0)], False)
        assert got == [(page, False)] * 3 + [None]
        await ta.flush_pages(2, keys[:100])
        assert len(sb.pages) == 500
        assert await tb.get_pages(1, keys[:1], False) == [None]  # b's own client is empty
        assert ta.send_oneway(
            2, wire.Heartbeat(node=1, incarnation=5, seq=1, free_frames=3, total_frames=4)
        )
        await wait(lambda: sb.heartbeats)
        # The acceptor side drops; the dialer reconnects by itself.
        conn = ta.links[2].live
        assert conn is not None
        conn.writer.transport.abort()
        await wait(lambda: not ta.is_connected(2))
        await wait(lambda: ta.is_connected(2) and tb.is_connected(1))
        assert tb.links[1].stats.connects >= 2
        await ta.stop()
        await tb.stop()

    asyncio.run(main())


async def _raw_peer(
    c: ClusterConfig, target: NodeSpec, *, secret: bytes = SECRET, node: int = 2, name: str = "b"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.Connection]:
    r, w = await asyncio.open_connection(target.host, target.port)
    hs = Handshake(
        cluster=c.name,
        secret=secret,
        node=node,
        name=name,
        compressor="lz4",
        initiator=True,
        known_nodes={target.number},
        expected_peer=target.number,
    )
    conn = wire.Connection(handshake=hs)
    w.write(conn.data_to_send())
    return r, w, conn


async def _pump(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: wire.Connection, until: float
) -> list[object]:
    events: list[object] = []
    try:
        async with asyncio.timeout(until):
            while True:
                data = await r.read(65536)
                conn.receive_data(data)
                out = conn.data_to_send()
                if out:
                    w.write(out)
                while (ev := conn.next_event()) is not wire.NEED_DATA:
                    events.append(ev)
                if not data:
                    return events
    except (TimeoutError, ConnectionError):
        return events


def test_silent_peer_gets_pinged_then_dropped_and_requests_fail() -> None:
    async def main() -> None:
        c = cfg()
        ta = Transport(c, c.nodes[0], Store())
        await ta.start()
        r, w, conn = await _raw_peer(c, c.nodes[0])
        events = await _pump(r, w, conn, 0.1)
        assert any(isinstance(e, wire.Authenticated) for e in events)
        await wait(lambda: ta.is_connected(2))
        # A request the raw peer never answers times out (and is counted).
        t0 = time.monotonic()
        try:
            await ta.put_pages(2, True, [((0, (1, 1, 1), 0), bytes(4096), False)])
            raise AssertionError("no timeout")
        except PeerError:
            pass
        assert 0.4 < time.monotonic() - t0 < 2.0
        assert ta.links[2].stats.request_timeouts == 1
        # Stay silent: keepalive pings arrive, then the idle timeout closes us.
        events = await _pump(r, w, conn, 2.0)
        assert any(isinstance(e, wire.Ping) for e in events)
        assert ta.links[2].stats.idle_closes == 1 and not ta.is_connected(2)
        try:
            await ta.get_pages(2, [(0, (1, 1, 1), 0)], False)
            raise AssertionError("request to a disconnected peer succeeded")
        except PeerError:
            pass
        w.close()
        await ta.stop()

    asyncio.run(main())


def test_bad_secret_garbage_and_unknown_node_are_dropped_and_counted() -> None:
    async def main() -> None:
        c = cfg()
        ta = Transport(c, c.nodes[0], Store())
        await ta.start()
        # Wrong secret.
        r, w, conn = await _raw_peer(c, c.nodes[0], secret=b"wrong-secret-xxxx")
        events = await _pump(r, w, conn, 1.0)
        assert not any(isinstance(e, wire.Authenticated) for e in events)
        await wait(lambda: ta.rejected.handshake_failures == 1)
        # A node number the cluster does not know.
        r, w, conn = await _raw_peer(c, c.nodes[0], node=7, name="x")
        await _pump(r, w, conn, 1.0)
        await wait(lambda: ta.rejected.handshake_failures == 2)
        # Garbage and an oversized length: refused before anything is buffered.
        for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n" * 4, wire.encode(wire.Ping(cookie=1))):
            r, w = await asyncio.open_connection(c.nodes[0].host, c.nodes[0].port)
            w.write(junk)
            try:
                await asyncio.wait_for(r.read(), 2.0)  # the node closes on us
            except ConnectionError:
                pass
            w.close()
        await wait(lambda: ta.rejected.handshake_failures == 5)
        assert not ta.is_connected(2)
        await ta.stop()

    asyncio.run(main())


def test_authenticated_peer_sending_a_corrupt_frame_is_dropped_and_counted() -> None:
    async def main() -> None:
        c = cfg()
        store = Store()
        ta = Transport(c, c.nodes[0], store)
        await ta.start()
        r, w, conn = await _raw_peer(c, c.nodes[0])
        events = await _pump(r, w, conn, 0.2)
        assert any(isinstance(e, wire.Authenticated) for e in events)
        await wait(lambda: ta.is_connected(2))
        frame = bytearray(
            conn.send(
                wire.PutBatch(
                    cookie=9,
                    items=[
                        wire.PutItem(wire.PageKey(2, 0, True, (1, 1, 1), 0), bytes(4096), False)
                    ],
                )
            )
        )
        frame[-1] ^= 0xFF  # payload no longer matches the checksum
        w.write(bytes(frame))
        await _pump(r, w, conn, 1.0)  # the node closes the connection
        await wait(lambda: not ta.is_connected(2))
        assert ta.links[2].stats.protocol_errors == 1
        assert store.pages == {}  # nothing from the bad frame was stored
        w.close()
        await ta.stop()

    asyncio.run(main())
