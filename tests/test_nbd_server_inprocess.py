"""NbdServer in-process (asyncio): backpressure, out-of-order replies, handshake timeout."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem.nbd import server as srv
from tmem.nbd.blockdev import BlockDevice
from tmem.nbd.config import Address

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
MiB = 1 << 20


async def _handshake(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path, limit=64 * MiB)
    greeting = await reader.readexactly(18)
    assert struct.unpack(">QQH", greeting)[:2] == (NBDMAGIC, IHAVEOPT)
    data = struct.pack(">IH", 0, 0)
    writer.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if rtype == 1:
            return reader, writer


def _req(cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length)


def test_pipelined_big_writes_are_bounded_and_all_answered(tmp_path: Path) -> None:
    """A client that pipelines 256 MiB of writes is paused, not buffered without limit."""

    async def main() -> tuple[int, list[int], int]:
        dev = BlockDevice(64 * MiB, memory="64MiB")
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await _handshake(path)
        payload = (b"backpressure " * 315 + b"x") * 8192  # 32 MiB, compressible
        assert len(payload) == 32 * MiB
        n = 8
        max_held = 0

        async def watch() -> None:
            nonlocal max_held
            while True:
                for c in server._conns:
                    max_held = max(max_held, c.held + c._inbox_bytes)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        # send from a thread through the raw socket: the kernel takes the bytes as fast
        # as it can while the loop is busy compressing, so the server must push back
        sock = writer.get_extra_info("socket").dup()
        sock.setblocking(True)
        blob = b"".join(_req(1, i, (i % 2) * 32 * MiB, len(payload)) + payload for i in range(n))
        sent = asyncio.get_running_loop().run_in_executor(None, sock.sendall, blob)
        cookies = []
        for _ in range(n):
            _magic, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
            assert err == 0
            cookies.append(cookie)
        await sent
        sock.close()
        watcher.cancel()
        pauses = server.counters.pauses
        writer.write(_req(0, 99, 0, 4096))
        await writer.drain()
        _m, err, _c = struct.unpack(">IIQ", await reader.readexactly(16))
        assert err == 0 and await reader.readexactly(4096) == payload[:4096]
        writer.close()
        await server.shutdown(grace=0.1)
        assert max_held <= srv.HIGH_WATER + 32 * MiB + 4 * MiB
        return pauses, cookies, max_held

    _pauses, cookies, _held = asyncio.run(main())
    assert sorted(cookies) == list(range(8))


def test_client_not_reading_replies_is_paused(tmp_path: Path) -> None:
    """Pipelined 32 MiB READs whose replies are not read: reading from it pauses."""

    async def main() -> tuple[int, int]:
        dev = BlockDevice(64 * MiB, memory="16MiB")
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await _handshake(path)
        (conn,) = server._conns
        buffered = 0  # the most reply data the server held at any sample

        async def watch() -> None:
            nonlocal buffered
            while True:
                out = conn.transport.get_write_buffer_size() if conn.transport else 0
                buffered = max(buffered, conn.held + out)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        n = 12  # 384 MiB of replies requested
        for i in range(n):
            writer.write(_req(0, i, (i % 2) * 32 * MiB, 32 * MiB))
        await writer.drain()
        deadline = time.monotonic() + 60  # the server runs into the limit
        while not server.counters.pauses:
            assert time.monotonic() < deadline, "reading from the client never paused"
            await asyncio.sleep(0.01)
        pauses = server.counters.pauses
        for _ in range(n):
            _m, err, _cookie = struct.unpack(">IIQ", await reader.readexactly(16))
            assert err == 0
            assert await reader.readexactly(32 * MiB) == bytes(32 * MiB)
        watcher.cancel()
        writer.close()
        await server.shutdown(grace=0.1)
        return pauses, buffered

    pauses, buffered = asyncio.run(main())
    assert pauses >= 1
    assert buffered <= srv.HIGH_WATER + 2 * 32 * MiB  # not 384 MiB


def test_small_and_big_requests_complete_out_of_order(tmp_path: Path) -> None:
    async def main() -> list[int]:
        dev = BlockDevice(64 * MiB, memory="16MiB")
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await _handshake(path)
        writer.write(_req(0, 1, 0, 32 * MiB))  # big read: a task, chunked
        writer.write(_req(0, 2, 0, 4096))  # small read: served inline, overtakes it
        await writer.drain()
        order = []
        for _ in range(2):
            _m, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
            assert err == 0
            await reader.readexactly(32 * MiB if cookie == 1 else 4096)
            order.append(cookie)
        writer.close()
        await server.shutdown(grace=0.1)
        return order

    assert asyncio.run(main()) == [2, 1]


def test_idle_client_is_dropped_after_handshake_timeout(tmp_path: Path) -> None:
    async def main() -> tuple[bytes, int]:
        dev = BlockDevice(1 * MiB, memory="1MiB")
        server = srv.NbdServer(dev, handshake_timeout=0.2)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await asyncio.open_unix_connection(path)
        await reader.readexactly(18)
        rest = await asyncio.wait_for(reader.read(), timeout=5)  # EOF: dropped
        writer.close()
        bad = server.counters.bad_clients
        await server.shutdown(grace=0.1)
        return rest, bad

    rest, bad = asyncio.run(main())
    assert rest == b""
    assert bad == 1


def test_small_read_of_a_remote_page_goes_async(tmp_path: Path) -> None:
    """A 4 KiB read that hits a page on another node is awaited, not failed."""
    page = b"remote page " * 341 + b"1234"
    fetched = []

    async def fetch(pool_id: int, oid: object, index: int, pampd: object) -> bytes:
        fetched.append(pampd)
        await asyncio.sleep(0.01)
        return page

    async def main() -> tuple[int, bytes]:
        dev = BlockDevice(1 * MiB, memory="1MiB")
        dev.remote_fetch = fetch
        dev.zcache.install_remote(dev.pool, (0, 0, 0), 3, ("peer", 3))
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await _handshake(path)
        writer.write(_req(0, 7, 3 * 4096, 4096))
        await writer.drain()
        _m, err, _cookie = struct.unpack(">IIQ", await reader.readexactly(16))
        data = await reader.readexactly(4096)
        writer.close()
        await server.shutdown(grace=0.1)
        return err, data

    err, data = asyncio.run(main())
    assert err == 0 and data == page
    assert fetched == [("peer", 3)]


def test_request_bytes_are_counted_once_when_inline_falls_back(tmp_path: Path) -> None:
    """A small request that meets a remote page is redone on the async path: its bytes
    are counted once, not once per path."""
    pages = {3: b"remote page " * 341 + b"1234", 5: b"other page " * 372 + b"abcd"}

    async def fetch(pool_id: int, oid: object, index: int, pampd: object) -> bytes:
        await asyncio.sleep(0)
        return pages[index]

    async def main() -> tuple[BlockDevice, list[int]]:
        dev = BlockDevice(1 * MiB, memory="1MiB")
        dev.remote_fetch = fetch
        for n in pages:
            dev.zcache.install_remote(dev.pool, (0, 0, 0), n, ("peer", n))
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        reader, writer = await _handshake(path)
        writer.write(_req(0, 1, 3 * 4096, 4096))  # read the remote page
        patch = b"XYZ"
        writer.write(_req(1, 2, 5 * 4096 + 10, len(patch)) + patch)  # RMW over one
        await writer.drain()
        errors = []
        for _ in range(2):
            _m, err, cookie = struct.unpack(">IIQ", await reader.readexactly(16))
            errors.append(err)
            if cookie == 1:
                assert await reader.readexactly(4096) == pages[3]
        writer.close()
        await server.shutdown(grace=0.1)
        return dev, errors

    dev, errors = asyncio.run(main())
    assert errors == [0, 0]
    assert dev.read(5 * 4096, 4096) == pages[5][:10] + b"XYZ" + pages[5][13:]
    assert dev.counters.remote_fetches == 2  # both went the async way
    assert dev.counters.read_bytes == 4096 + 4096  # the request, and the check just above
    assert dev.counters.write_bytes == 3
    assert dev.counters.rmw == 1


def test_shutdown_yields_while_a_finished_task_is_still_listed() -> None:
    """A request task has finished, but the done callback that takes it out of the
    server's task set has not run yet: shutdown() must let the loop run it, not spin.
    (Since Python 3.12, awaiting gather() over finished tasks does not yield: a server
    looping on that never exited after SIGTERM.)"""

    class GuardedTasks(set[asyncio.Task[None]]):
        """The server's task set, counting how often shutdown() looks at it."""

        looks = 0

        def __iter__(self) -> Iterator[asyncio.Task[None]]:
            self.looks += 1
            if self.looks > 1000:
                raise RuntimeError("shutdown() looked at its tasks 1000 times, never yielding")
            return super().__iter__()

    async def nothing() -> None:
        return None

    async def main() -> int:
        server = srv.NbdServer(BlockDevice(1 * MiB, memory="1MiB"))
        tasks = GuardedTasks()
        server.tasks = tasks
        finished = asyncio.create_task(nothing())
        await asyncio.sleep(0)
        assert finished.done()
        stopping = asyncio.create_task(server.shutdown(grace=0))  # its first step: next
        tasks.add(finished)
        finished.add_done_callback(tasks.discard)  # like the server's: runs after that
        await asyncio.wait_for(stopping, timeout=10)
        return len(tasks)

    assert asyncio.run(main()) == 0


def test_idle_work_failure_is_logged_and_the_server_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store whose background work raises (here: a staged page whose page-table entry
    was damaged) costs the server nothing but a log line: clients are served, and the
    work resumes once it can succeed."""
    from tmem.pagetable import L_STAGED

    page = (b"idle work " * 410)[:4096]

    async def main() -> None:
        dev = BlockDevice(8 * MiB, memory="8MiB", compress_behind=True)
        zc = dev.zcache
        dev.write(0, page * 16)  # staged: stored raw, waiting for idle work
        assert zc.staged_pages == 16
        pt = zc.pages
        head = pt.head[L_STAGED]
        saved, pt.obj[head] = pt.obj[head], -1
        server = srv.NbdServer(dev)
        path = str(tmp_path / "s.sock")
        await server.listen(Address(path=path))
        server.start_idle_work()
        await asyncio.sleep(0.2)
        assert server.counters.idle_errors == 1  # then it waits IDLE_POLL before retrying
        reader, writer = await _handshake(path)
        writer.write(_req(0, 1, 4096, 4096))
        _m, err, _c = struct.unpack(">IIQ", await reader.readexactly(16))
        assert err == 0 and await reader.readexactly(4096) == page
        pt.obj[head] = saved  # repaired: the next attempt compresses every staged page
        deadline = time.monotonic() + 10
        while zc.staged_pages and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert zc.staged_pages == 0 and zc.counters.compacted_pages == 16
        writer.close()
        await server.shutdown(grace=0.1)

    with caplog.at_level("ERROR", logger="tmem.nbd.server"):
        asyncio.run(main())
    assert "idle work failed (1 so far)" in caplog.text
