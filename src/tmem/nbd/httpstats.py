"""``/metrics`` (Prometheus text format) and ``/stats`` (JSON) for a running server.

The HTTP server runs on the same asyncio loop as the NBD server: the block device and
zcache are not thread-safe, and scraping on the loop reads the counters without locks.
The snapshot source is a coroutine: counting zcache's metadata walks every page, so
the server does it in ~1 ms steps and serves NBD requests in between.

``/stats`` returns ``{"zcache": {...}, "blockdev": {...}, "server": {...}}``; each
section is a flat map of name -> number. ``tmem stats --url`` reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Snapshot = Mapping[str, Mapping[str, int | float]]
StatsSource = Callable[[], Awaitable[Snapshot]]

MAX_REQUEST_HEAD = 8192
# blockdev_* and server_* names are counters except these levels. zcache's own names
# (kernel debugfs style) mix counters and levels with no naming rule, so they are
# exported untyped (Prometheus treats them like gauges) rather than guessed.
_GAUGE_NAMES = {
    "blockdev_backing_pages",
    "blockdev_ram_pages",
    "blockdev_huge_pages",
    "blockdev_staged_pages",
    "blockdev_cleancache_pages",
    "blockdev_size_bytes",
    "server_connections",
    "server_requests_in_flight",
    "server_shutting_down",
    "server_uptime_seconds",
}


class TmemCollector(Collector):
    """Exports one stats snapshot, taken at scrape time (custom collector)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for section, values in self._snapshot.items():
            for name, value in sorted(values.items()):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                base = name if name.startswith(section + "_") else f"{section}_{name}"
                metric_name = "tmem_" + "".join(c if c.isalnum() else "_" for c in base)
                doc = f"{section} {name}"
                if section not in ("blockdev", "server"):
                    yield UnknownMetricFamily(metric_name, doc, value=value)
                elif base in _GAUGE_NAMES:
                    yield GaugeMetricFamily(metric_name, doc, value=value)
                else:
                    yield CounterMetricFamily(metric_name.removesuffix("_total"), doc, value=value)


def render_metrics(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TmemCollector(snapshot))
    return generate_latest(registry)


def render_json(snapshot: Snapshot) -> bytes:
    return json.dumps({k: dict(v) for k, v in snapshot.items()}, indent=1, sort_keys=True).encode()


class StatsServer:
    """A minimal HTTP/1.1 GET server for /metrics and /stats (one request per connection)."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            status, ctype, body = await self._route(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        except Exception:  # a broken stats source must not kill the server
            log.exception("stats request failed")
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()

    async def _route(self, head: bytes) -> tuple[str, str, bytes]:
        if len(head) > MAX_REQUEST_HEAD:
            return "431 Request Header Fields Too Large", "text/plain", b"too large\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics or /stats\n"
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/metrics", b"/stats"):
            return "404 Not Found", "text/plain", b"try /metrics or /stats\n"
        snapshot = await self._source()
        if path == b"/metrics":
            return (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render_metrics(snapshot),
            )
        return "200 OK", "application/json", render_json(snapshot)
