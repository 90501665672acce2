"""asyncio NBD server: a thin shell around the sans-IO :mod:`tmem.nbd.protocol`.

One :class:`~tmem.nbd.protocol.ServerConnection` per client, all sharing one
:class:`~tmem.nbd.blockdev.BlockDevice` (so CAN_MULTI_CONN holds: a FLUSH on any
connection covers writes replied on every connection).

Requests that fit in one chunk are served inline from ``data_received`` (no task, no
scheduling: this is what keeps 4 KiB IOPS up); big requests and fsyncs run as tasks
that yield to the loop between 1 MiB chunks, so replies may complete out of order.
Backpressure: when the bytes held for a client (requests being served + replies not
yet sent) pass a limit, reading from that client pauses until they drain.

SIGTERM/SIGINT: stop accepting, finish in-flight requests, answer new ones with
ESHUTDOWN, give clients a moment to disconnect, then return (exit 0).

Idle work: one background task gives the store its background work
(:meth:`tmem.Zcache.idle_work`: compress pages that compress-behind stored raw,
recompress pages gone idle with ``--recompress``, compact the allocator) in small
batches, and only once no client has sent anything for IDLE_QUIET seconds, so it
never competes with requests for the event loop. When the store has shrunk (a TRIM,
pages overwritten or dropped) it also hands the freed frames back to the OS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

from tmem.aio import IDLE_POLL, IdleWork, loop_factory, run_in_steps
from tmem.errors import ConfigError, RemotePageError
from tmem.nbd import protocol as proto
from tmem.nbd.blockdev import CHUNK_PAGES, BlockDevice, BlockDeviceError
from tmem.nbd.config import Address, ServeConfig
from tmem.nbd.httpstats import Snapshot, StatsServer
from tmem.zcache import Zcache

log = logging.getLogger(__name__)

# Bytes held per connection (payloads being written + replies queued) before we stop
# reading from it. Must exceed one maximal request (32 MiB) so a single big write
# can always proceed.
HIGH_WATER = 64 << 20
LOW_WATER = 16 << 20
INLINE_LIMIT = CHUNK_PAGES * 4096
SHUTDOWN_GRACE = 2.0
# A client must finish the handshake within this time: idle half-open connections
# must not pile up (each costs a file descriptor and a connection object).
HANDSHAKE_TIMEOUT = 30.0
UNIX_SNDBUF = 4 << 20
# Idle work (tmem.aio.IdleWork) runs after this much quiet on every connection, a batch
# of pages (a fraction of a millisecond) between looks at the clients; with nothing to
# do it sleeps until a client sends something or IDLE_POLL seconds pass (pages written
# earlier become old enough to recompress while nobody talks to the server).
IDLE_QUIET = 0.002
IDLE_ERROR_LOG_EVERY = 60.0  # seconds between log lines for a failure that repeats
# A /stats scrape walks the tmem maps this many pages at a time (~1 ms each), letting
# clients' requests in between.
STATS_STEP_PAGES = 32768
# asyncio's socket transport in CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 queues what
# writelines() could not send without calling pause_writing() past its high-water
# mark (CPython gh-127655), so resume_writing() never comes either and a client
# paused on a full write buffer stayed paused forever. There _send() re-checks.
_PY = sys.version_info[:3]
WRITELINES_MAY_NOT_PAUSE = (3, 12) <= _PY < (3, 12, 9) or (3, 13) <= _PY < (3, 13, 2)
FUA = int(proto.CmdFlag.FUA)  # tested with int(): IntFlag operators cost ~1 us each
# Module constants: one lookup each on the per-request path.
READ = proto.Command.READ
WRITE = proto.Command.WRITE
FLUSH = proto.Command.FLUSH
Request = proto.Request
NEED_DATA = proto.NEED_DATA


class ServerCounters:
    """Connection-level counters for /stats (``server_*``)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.bad_clients = 0
        self.requests = 0
        self.request_errors = 0
        self.rejected = 0
        self.unclean_disconnects = 0
        self.internal_errors = 0
        self.shutdown_replies = 0
        self.pauses = 0
        self.idle_errors = 0


class NbdServer:
    """Listens on TCP/unix sockets and serves one block device to every client."""

    def __init__(
        self,
        device: BlockDevice,
        export_name: str = "",
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.device = device
        self.export_name = export_name
        self.handshake_timeout = handshake_timeout
        self.counters = ServerCounters()
        self.shutting_down = False
        self._servers: list[asyncio.Server] = []
        self._conns: set[_NbdProtocol] = set()
        self._unix_paths: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()  # every connection's, incl. closed ones
        self.started = time.monotonic()
        self.last_input = 0.0  # time.monotonic() of the latest bytes from any client
        self.input_seen = asyncio.Event()  # set by every client input: wakes idle work
        self.idle_work = IdleWork(device.zcache)
        self._idle_task: asyncio.Task[None] | None = None
        self._last_idle_error = -IDLE_ERROR_LOG_EVERY

    # ------------------------------------------------------------- idle work
    def start_idle_work(self) -> None:
        """Start the background task that runs the store's idle work (once)."""
        if self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop())

    async def _idle_loop(self) -> None:
        work = self.idle_work
        while True:
            wait = self.last_input + IDLE_QUIET - time.monotonic()
            if wait > 0:  # clients are busy: they come first
                await asyncio.sleep(wait)
                continue
            try:
                more = work.step()
            except Exception:  # never let the data path die with the helper
                self._idle_failed()
                await asyncio.sleep(IDLE_POLL)
                continue
            if more:
                await asyncio.sleep(0)
                continue
            self.input_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.input_seen.wait(), IDLE_POLL)

    def _idle_failed(self) -> None:
        """Count and log (rate-limited) a failure of idle work; the task goes on after
        IDLE_POLL seconds: staged pages stay raw (still readable) meanwhile."""
        self.counters.idle_errors += 1
        now = time.monotonic()
        if now - self._last_idle_error >= IDLE_ERROR_LOG_EVERY:
            self._last_idle_error = now
            log.exception(
                "idle work failed (%d so far); retrying in %.0f s",
                self.counters.idle_errors,
                IDLE_POLL,
            )

    # ------------------------------------------------------------- listening
    async def listen(self, address: Address) -> str:
        """Bind one address; return it as a string with the real port (port 0 works)."""
        loop = asyncio.get_running_loop()
        if address.path is not None:
            path = address.path
            self._remove_stale_socket(path)
            server = await loop.create_unix_server(lambda: _NbdProtocol(self), path)
            self._unix_paths.append(path)
            bound = f"unix:{path}"
        else:
            server = await loop.create_server(
                lambda: _NbdProtocol(self), address.host, address.port, reuse_address=True
            )
            # cast: uvloop's Server.sockets is a list, typeshed says tuple, and compiled
            # code checks the declared type
            host, port = cast(Any, server).sockets[0].getsockname()[:2]
            bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._servers.append(server)
        return bound

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        """Unlink a socket file left by a dead server; refuse to steal a live one."""
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                return  # not a socket: let bind() report the error
        except FileNotFoundError:
            return
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: stale
                return
        raise ConfigError(f"{path} is in use by a running server")

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, finish in-flight requests, then close every connection."""
        self.shutting_down = True
        if self._idle_task is not None:
            self._idle_task.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.on_shutdown()
        # A WRITE whose header arrived before shutdown may still start a task when its
        # payload completes, so wait until no connection has any unfinished task left.
        # Not "until self.tasks is empty": a finished task leaves the set only when its
        # done callback runs, and since Python 3.12 awaiting gather() over finished
        # tasks returns without yielding to the loop, so that callback never ran and
        # this loop spun forever (SIGTERM hung the server). asyncio.wait() always yields.
        while pending := [t for t in self.tasks if not t.done()]:
            await asyncio.wait(pending)
        with contextlib.suppress(BlockDeviceError):
            await self.device.aflush()
        deadline = time.monotonic() + grace
        while any(c.transmitting for c in self._conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._conns):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict[str, int | float]:
        c = self.counters
        return {
            "server_connections": len(self._conns),
            "server_connections_total": c.connections_total,
            "server_bad_clients": c.bad_clients,
            "server_requests": c.requests,
            "server_request_errors": c.request_errors,
            "server_rejected_requests": c.rejected,
            "server_unclean_disconnects": c.unclean_disconnects,
            "server_internal_errors": c.internal_errors,
            "server_shutdown_replies": c.shutdown_replies,
            "server_backpressure_pauses": c.pauses,
            "server_idle_work_steps": self.idle_work.steps,
            "server_idle_work_errors": c.idle_errors,
            "server_frame_releases": self.idle_work.releases,
            "server_requests_in_flight": sum(len(x.tasks) for x in self._conns),
            "server_shutting_down": int(self.shutting_down),
            "server_uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    async def snapshot(self) -> Snapshot:
        """Every section of /stats. zcache's walk over every page (~35 ms per million)
        runs in steps, the event loop serving requests between them."""
        zcache = await run_in_steps(self.device.zcache.stats_steps(STATS_STEP_PAGES))
        return {"zcache": zcache, "blockdev": self.device.stats(zcache), "server": self.stats()}


class _NbdProtocol(asyncio.Protocol):
    """One client: feeds bytes to the sans-IO connection and serves its requests."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.device = server.device
        name = server.export_name
        self.conn = proto.ServerConnection(
            {name: proto.ExportInfo(name, server.device.size)},
            default_export=name,
            block_status=True,  # base:allocation: clients skip never-written ranges
        )
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.held = 0  # bytes of payload/reply data this connection is holding
        self.transmitting = False
        self._inbox: collections.deque[bytes] = collections.deque()  # read, not yet fed
        self._inbox_bytes = 0
        # Replies produced while handling one batch of input go out in one writelines()
        # (one writev): at queue depth 32, one syscall instead of 32.
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._needs_data = False  # next_event() said NEED_DATA: receive_data() allowed
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    # ---------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        self.server._conns.add(self)
        self.server.counters.connections_total += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            # Unix sockets do not autotune (TCP does): with the default ~200 KiB, a
            # 256 KiB READ reply took two writes and a wakeup; measured +7-10% nbdcopy
            # read throughput. The kernel caps it at net.core.wmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = str(transport.get_extra_info("peername") or "unix")
        if self.server.shutting_down:
            self.close()
            return
        transport.write(self.conn.initial_bytes())
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timeout
        )
        log.debug("client %s connected", self.peer)
        self._pump()

    def _handshake_timeout(self) -> None:
        if not self.transmitting and not self._closing:
            self._drop(f"no handshake within {self.server.handshake_timeout} s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.server._conns.discard(self)
        self._closing = True
        log.debug("client %s gone (%s)", self.peer, exc or "closed")

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.last_input = time.monotonic()
        if not server.input_seen.is_set():
            server.input_seen.set()
        if self._closing:
            return
        self._inbox.append(data)
        self._inbox_bytes += len(data)
        self._pump()

    def eof_received(self) -> bool | None:
        self._inbox.append(b"")
        self._pump()
        return True  # keep the write side open until in-flight replies are sent

    # ------------------------------------------------------------- event loop
    def _pump(self) -> None:
        """Handle every complete event the connection has, unless we are overloaded."""
        try:
            self._pump_events()
        finally:
            self._send()

    def _pump_events(self) -> None:
        conn = self.conn
        # Nothing below writes to the transport (replies collect in self._out until
        # _send), so its buffer size is read once per batch.
        buffered = self.transport.get_write_buffer_size() if self.transport else 0
        try:
            while not self._closing:
                if self._writing_paused or self.held + buffered + self._out_bytes > HIGH_WATER:
                    break
                if self._needs_data:
                    if not self._inbox:
                        break
                    chunk = self._inbox.popleft()
                    self._inbox_bytes -= len(chunk)
                    conn.receive_data(chunk)
                    self._needs_data = False
                event = conn.next_event()
                self._flush_out()
                if type(event) is Request:
                    self._request(event)
                elif event is NEED_DATA:
                    self._needs_data = True
                elif isinstance(event, proto.RequestRejected):
                    self.server.counters.rejected += 1
                    if event.error == proto.ESHUTDOWN:
                        self.server.counters.shutdown_replies += 1
                elif isinstance(event, proto.ExportSelected):
                    self.transmitting = True
                    if self._handshake_timer is not None:
                        self._handshake_timer.cancel()
                    log.info("client %s selected export %r", self.peer, event.name)
                elif isinstance(event, proto.Disconnect | proto.ConnectionClosed):
                    if isinstance(event, proto.ConnectionClosed) and not event.clean:
                        self.server.counters.unclean_disconnects += 1
                    self._finish_then_close()
                    return
                elif isinstance(event, proto.ProtocolError):
                    self._drop(event.reason)
                    return
        except Exception:  # the sans-IO layer should never raise; never crash anyway
            log.exception("protocol layer raised on input from %s", self.peer)
            self._drop("internal protocol error")
            return
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self._closing:
            return
        out = self.transport.get_write_buffer_size()
        level = self.held + out + self._inbox_bytes
        if not self._reading_paused and (self._writing_paused or level > HIGH_WATER):
            self._reading_paused = True
            self.server.counters.pauses += 1
            self.transport.pause_reading()
        elif self._reading_paused and not self._writing_paused and level < LOW_WATER:
            self._reading_paused = False
            self.transport.resume_reading()

    def _flush_out(self) -> None:
        """Queue what the protocol produced itself (handshake and error replies)."""
        out = self.conn.data_to_send()
        if out:
            self._out.append(out)
            self._out_bytes += len(out)

    def _send(self) -> None:
        """Write every queued reply in one go."""
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(out)
            if WRITELINES_MAY_NOT_PAUSE and not self._writing_paused:
                low, high = transport.get_write_buffer_limits()
                if transport.get_write_buffer_size() > high:
                    # Setting the limits (to the same values) makes the transport
                    # compare its buffer with them and call pause_writing().
                    transport.set_write_buffer_limits(high, low)

    def _reply(self, req: proto.Request, error: int = 0, data: proto.Buffer | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            parts = self.conn.reply_parts(req, error, data)
        except Exception:
            log.exception("cannot reply to cookie %d from %s", req.cookie, self.peer)
            self._drop("reply failed")
            return
        self._out.extend(parts)
        self._out_bytes += req.length if data is not None else 16

    def _reply_read(
        self,
        req: proto.Request,
        extents: Sequence[bytes | int] | Sequence[list[proto.Buffer] | int],
    ) -> None:
        """A READ reply from data (buffers, or runs of pages: no join copy, the pages go
        out in one writev) and holes (32 bytes on the wire under structured replies)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not extents:
            self._reply(req, 0, b"")
            return
        only: bytes | int | list[proto.Buffer] | proto.Buffer = extents[0]
        if len(extents) == 1 and isinstance(only, list) and len(only) == 1:
            only = only[0]
        if len(extents) == 1 and isinstance(only, bytes | bytearray | memoryview):
            self._reply(req, 0, only)  # one buffer: the simplest reply
            return
        try:
            parts = self.conn.reply_read(req, extents)
        except Exception:
            log.exception("cannot reply to cookie %d from %s", req.cookie, self.peer)
            self._drop("reply failed")
            return
        self._out.extend(parts)
        self._out_bytes += req.length

    # -------------------------------------------------------------- requests
    def _request(self, req: proto.Request) -> None:
        self.server.counters.requests += 1
        cmd = req.command
        big = req.length > INLINE_LIMIT and (cmd is READ or cmd is WRITE)
        needs_await = cmd is FLUSH or (
            int(req.flags) & FUA and self.device.backing_path is not None
        )
        if not big and not needs_await and self._serve_inline(req):
            return
        self.held += req.length
        task = asyncio.get_running_loop().create_task(self._serve(req))
        self.tasks.add(task)
        self.server.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.server.tasks.discard(task)
        if not self._closing:
            self._pump()

    def _serve_inline(self, req: proto.Request) -> bool:
        """Serve a small request synchronously; False if it needs the async path (a page
        lives on another node and must be awaited)."""
        dev = self.device
        cmd = req.command
        try:
            if cmd is READ:
                self._reply_read(req, dev.read_runs(req.offset, req.length))
                return True
            if cmd is WRITE:
                assert req.payload is not None
                dev.write(req.offset, req.payload)
            elif cmd is proto.Command.TRIM:
                dev.trim(req.offset, req.length)
            elif cmd is proto.Command.WRITE_ZEROES:
                dev.write_zeroes(req.offset, req.length)
            elif cmd is proto.Command.CACHE:
                pass  # prefetch hint: every tier is already as close as it gets
            elif cmd is proto.Command.BLOCK_STATUS:
                extents = dev.block_status(req.offset, req.length)
                self._out.extend(self.conn.reply_block_status(req, extents))
                return True
            else:
                self._reply(req, errno.EINVAL)
                return True
            if int(req.flags) & FUA:
                dev.flush()
            self._reply(req)
        except RemotePageError:
            return False  # idempotent so far: the task redoes it, awaiting the fetch
        except Exception as exc:
            self._reply_failure(req, exc)
        return True

    def _reply_failure(self, req: proto.Request, exc: Exception) -> None:
        """Answer a failed request (call from its except block): the device's NBD errno,
        or EIO with the traceback logged for anything unexpected."""
        if isinstance(exc, BlockDeviceError):
            self.server.counters.request_errors += 1
            self._reply(req, exc.errno)
        else:
            self.server.counters.internal_errors += 1
            log.exception("%s from %s failed", req.command.name, self.peer)
            self._reply(req, errno.EIO)

    async def _serve(self, req: proto.Request) -> None:
        dev = self.device
        cmd = req.command
        try:
            if cmd is proto.Command.READ:
                self._reply_read(req, await dev.aread_extents(req.offset, req.length))
                return
            if cmd is proto.Command.WRITE:
                assert req.payload is not None
                await dev.awrite(req.offset, req.payload)
            elif cmd is proto.Command.TRIM:
                await dev.atrim(req.offset, req.length)
            elif cmd is proto.Command.WRITE_ZEROES:
                await dev.awrite_zeroes(req.offset, req.length)
            elif cmd is proto.Command.FLUSH:
                await dev.aflush()
            elif cmd is proto.Command.CACHE:
                pass
            elif cmd is proto.Command.BLOCK_STATUS:
                extents = dev.block_status(req.offset, req.length)
                self._out.extend(self.conn.reply_block_status(req, extents))
                return
            else:
                self._reply(req, errno.EINVAL)
                return
            if int(req.flags) & FUA and cmd is not proto.Command.FLUSH:
                await dev.aflush()
            self._reply(req)
        except Exception as exc:
            self._reply_failure(req, exc)
        finally:
            self.held -= req.length
            self._send()

    # ---------------------------------------------------------------- closing
    def _finish_then_close(self) -> None:
        """NBD_CMD_DISC / EOF: finish in-flight requests, then close."""
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        if not self.tasks:
            self.close()
            return
        pending = list(self.tasks)

        async def later() -> None:
            await asyncio.gather(*pending, return_exceptions=True)
            self.close()

        asyncio.get_running_loop().create_task(later())

    def _drop(self, why: str) -> None:
        """Client sent something we cannot continue after: count it, hang up."""
        self.server.counters.bad_clients += 1
        log.warning("dropping client %s: %s", self.peer, why)
        self._closing = True
        self._send()
        if self.transport is not None:
            self.transport.close()

    def on_shutdown(self) -> None:
        self.conn.start_shutdown()
        if not self.transmitting:
            self.close()  # still negotiating: nothing in flight to finish
        else:
            self._pump()

    def close(self) -> None:
        self._closing = True
        self._send()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


# ------------------------------------------------------------------ process setup
def lock_memory() -> None:
    """mlockall(MCL_CURRENT|MCL_FUTURE) and oom_score_adj -1000, as nbd-client -swap does.

    Serving swap means the server must not itself be swapped out or OOM-killed.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mlockall(1 | 2) != 0:
        err = ctypes.get_errno()
        raise ConfigError(
            f"mlockall failed: {os.strerror(err)} (needs CAP_IPC_LOCK or a big RLIMIT_MEMLOCK)"
        )
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as exc:
        log.warning("cannot set oom_score_adj -1000: %s", exc)


def tune_malloc() -> None:
    """Keep request-sized buffers on the heap and the heap's free top in the process.

    Every READ reply and WRITE payload is a buffer of up to a few MiB, allocated and
    freed thousands of times a second. glibc's defaults serve such sizes with mmap, or
    hand the heap's free top back to the kernel, so the next buffer page-faults
    and is zeroed again: measured here, that doubled the server's CPU per page read
    (nbdcopy). mmap only above 32 MiB (NBD's largest request) and keep up to 64 MiB
    of free heap (what one connection may hold in flight). No-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


def tune_gc() -> None:
    """Run the cyclic garbage collector less often on the data path.

    Every page written allocates a few container objects (its handle tuple, buffer
    views), so with CPython's default (a collection every 700) the collector ran every
    couple of hundred pages: about a tenth of the server's CPU per page written. The
    store itself holds no reference cycles; 20,000 still collects asyncio's several
    times a second under load.
    """
    gc.set_threshold(20_000, 20, 20)


def build_device(config: ServeConfig, zcache: Zcache | None = None) -> BlockDevice:
    """The block device a config describes (shared with the cluster node command)."""
    return BlockDevice(
        config.size,
        memory=config.memory,
        compressor=config.compressor,
        backing=config.backing,
        zcache=zcache,
        compress_behind=config.compress_behind,
        allocator=config.allocator,
        prefault=config.arena_prefault,
        recompress=config.recompress,
        recompress_after=config.recompress_after,
    )


async def serve_async(
    config: ServeConfig,
    *,
    device: BlockDevice | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a server for ``config`` until ``stop`` is set (or SIGTERM/SIGINT)."""
    if config.mlock:
        if not config.prefault:
            log.info("--mlock implies --prefault: the whole --memory budget is resident")
        lock_memory()
    tune_malloc()
    tune_gc()
    device = device or build_device(config)
    server = NbdServer(device, config.export_name)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stats_server: StatsServer | None = None
    try:
        try:
            bound = [await server.listen(addr) for addr in config.listen]
        except OSError as exc:
            raise ConfigError(f"cannot listen: {exc}") from exc
        server.start_idle_work()
        ready: dict[str, Any] = {"listen": bound}
        if config.stats is not None:
            stats_server = StatsServer(server.snapshot)
            assert config.stats.host is not None
            try:
                host, port = await stats_server.start(config.stats.host, config.stats.port)
            except OSError as exc:
                raise ConfigError(f"cannot listen for --stats: {exc}") from exc
            ready["stats"] = f"http://{host}:{port}"
        urls = " ".join(
            f"nbd+unix:///{config.export_name}?socket={b[5:]}"
            if b.startswith("unix:")
            else f"nbd://{b}/{config.export_name}"
            for b in bound
        )
        line = f"tmem serve: ready on {urls}"
        if "stats" in ready:
            line += f" stats {ready['stats']}"
        log.info(
            "%s (size %d, memory %d, loop %s)",
            line,
            config.size,
            config.memory,
            type(loop).__module__.split(".")[0],
        )
        print(line, flush=True)
        if config.ready_file:
            tmp = config.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(ready, f)
            os.replace(tmp, config.ready_file)
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await server.shutdown()
        if stats_server is not None:
            await stats_server.close()
        device.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped")


def run(config: ServeConfig) -> None:
    """Blocking entry point of ``tmem serve``: returns after a graceful shutdown."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve_async(config))
