"""Hostile and broken clients against the real `tmem serve` process, over raw sockets.

Every case ends the same way: the server is still up, a well-behaved client's data is
unchanged, and the bad client got the right NBD error or was dropped (and counted).
Also: SIGTERM under load finishes in-flight requests, answers the rest with ESHUTDOWN
and exits 0.
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_nbd_server_harness import Served, serve_factory

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
READ, WRITE, DISC, FLUSH, TRIM = 0, 1, 2, 3, 4
EINVAL, ENOSPC, ESHUTDOWN = 22, 28, 108
MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_factory(tmp_path)


class RawClient:
    """Just enough NBD to talk to the server byte by byte."""

    def __init__(self, s: Served) -> None:
        self.sock = socket.create_connection(tuple(_hostport(s.tcp)), timeout=20)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def greeting(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        assert flags & 1  # fixed newstyle

    def handshake(self) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", 3))
        data = struct.pack(">IH", 0, 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == OPT_REPLY_MAGIC
            self.recv_exact(length)
            if rtype == 1:  # ACK: transmission phase
                return
            assert rtype == 3, hex(rtype)

    def request(
        self, cmd: int, cookie: int, offset: int, length: int, payload: bytes = b""
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload
        )

    def reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        data = self.recv_exact(data_len) if error == 0 and data_len else b""
        return error, cookie, data

    def is_dropped(self) -> bool:
        """True when the server closed the connection (EOF or reset)."""
        try:
            self.sock.settimeout(10)
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def _hostport(tcp: str) -> tuple[str, int]:
    host, _, port = tcp.rpartition(":")
    return host, int(port)


def _good_data(s: Served) -> bytes:
    """A well-behaved client writes a pattern the bad clients must not disturb."""
    data = b"".join(b"good page %06d " % i * 240 + bytes(256) for i in range(64))
    c = RawClient(s)
    c.handshake()
    c.request(WRITE, 1, 0, len(data), data)
    assert c.reply() == (0, 1, b"")
    c.request(DISC, 2, 0, 0)
    c.close()
    return data


def _check_good(s: Served, data: bytes) -> None:
    c = RawClient(s)
    c.handshake()
    c.request(READ, 7, 0, len(data))
    assert c.reply(len(data)) == (0, 7, data)
    c.request(DISC, 8, 0, 0)
    c.close()


@pytest.fixture
def server(serve: Any) -> Served:
    s: Served = serve("--size", "16MiB", "--memory", "4MiB")
    return s


def test_bad_client_flags_dropped(server: Served) -> None:
    good = _good_data(server)
    c = RawClient(server)
    c.greeting()
    c.sock.sendall(struct.pack(">I", 0xFFFFFFFF))
    assert c.is_dropped()
    _check_good(server, good)
    assert server.stats()["server"]["server_bad_clients"] == 1  # the one bad client


def test_bad_option_magic_dropped(server: Served) -> None:
    good = _good_data(server)
    c = RawClient(server)
    c.greeting()
    c.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0))
    assert c.is_dropped()
    _check_good(server, good)


def test_unknown_option_gets_unsup_and_parsing_goes_on(server: Served) -> None:
    c = RawClient(server)
    c.greeting()
    c.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 99, 3) + b"abc")
    magic, opt, rtype, length = struct.unpack(">QIII", c.recv_exact(20))
    c.recv_exact(length)
    assert (magic, opt, rtype) == (OPT_REPLY_MAGIC, 99, (1 << 31) + 1)
    # still negotiating: a GO works on the same connection
    data = struct.pack(">IH", 0, 0)
    c.sock.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    while struct.unpack(">QIII", hdr := c.recv_exact(20))[2] != 1:
        c.recv_exact(struct.unpack(">QIII", hdr)[3])
    c.request(READ, 5, 0, 4096)
    assert c.reply(4096) == (0, 5, bytes(4096))
    c.close()


def test_huge_option_length_is_not_buffered(server: Served) -> None:
    c = RawClient(server)
    c.greeting()
    # claims 3 GiB of option data: must be refused/skipped, never allocated
    c.sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 3 << 30))
    c.sock.sendall(b"x" * 100000)
    assert c.is_dropped()
    _check_good(server, _good_data(server))


def test_transmission_errors_keep_the_connection(server: Served) -> None:
    good = _good_data(server)
    c = RawClient(server)
    c.handshake()
    c.request(READ, 10, SIZE - 100, 4096)  # read past the end
    assert c.reply() == (EINVAL, 10, b"")
    c.request(WRITE, 11, SIZE - 100, 4096, b"w" * 4096)  # write past the end: payload skipped
    assert c.reply() == (ENOSPC, 11, b"")
    c.request(READ, 12, 0, 64 * MiB)  # over the maximum payload
    assert c.reply() == (EINVAL, 12, b"")
    c.request(99, 13, 0, 0)  # unknown command
    assert c.reply() == (EINVAL, 13, b"")
    c.request(FLUSH, 14, 5, 5)  # FLUSH with offset/length
    assert c.reply() == (EINVAL, 14, b"")
    c.request(TRIM, 15, 2**63, 2**31)  # offset overflow
    assert c.reply()[0] == EINVAL
    # still in sync: a normal read works and sees the good data
    c.request(READ, 16, 0, 4096)
    assert c.reply(4096) == (0, 16, good[:4096])
    c.close()
    _check_good(server, good)


def test_bad_request_magic_and_oversized_write_dropped(server: Served) -> None:
    good = _good_data(server)
    c = RawClient(server)
    c.handshake()
    c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, READ, 1, 0, 4096))
    assert c.is_dropped()
    c = RawClient(server)
    c.handshake()
    # a WRITE claiming 4 GiB - 1 of payload: too large to skip, so a hard disconnect
    c.request(WRITE, 2, 0, 0xFFFFFFFF)
    c.sock.sendall(b"z" * 65536)
    assert c.is_dropped()
    _check_good(server, good)


def test_disconnect_mid_request_changes_nothing(server: Served) -> None:
    good = _good_data(server)
    c = RawClient(server)
    c.handshake()
    # header + half of a 256 KiB write over the good data, then vanish
    c.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 3, 0, 256 * 1024))
    c.sock.sendall(b"\xee" * 128 * 1024)
    c.close()
    c = RawClient(server)
    c.handshake()
    c.sock.sendall(struct.pack(">IHHQ", REQUEST_MAGIC, 0, READ, 4))  # half a header
    c.close()
    # both vanished clients are noticed (the well-behaved one disconnected cleanly)
    deadline = time.monotonic() + 20
    while server.stats()["server"]["server_unclean_disconnects"] < 2:
        assert time.monotonic() < deadline, "the two unclean disconnects were not counted"
        time.sleep(0.02)
    assert server.stats()["server"]["server_unclean_disconnects"] == 2
    _check_good(server, good)


def test_random_garbage_never_crashes(server: Served) -> None:
    good = _good_data(server)
    rng = random.Random(1234)
    for i in range(40):
        c = RawClient(server)
        if i % 2:
            c.handshake()
        blob = rng.randbytes(rng.randrange(1, 4096))
        if i % 4 == 1:  # a valid magic followed by random fields reaches deeper code
            blob = struct.pack(">I", REQUEST_MAGIC) + blob
        try:
            c.sock.sendall(blob)
        except OSError:
            pass
        c.close()
    assert server.proc.poll() is None
    _check_good(server, good)


def test_sigterm_under_load_finishes_in_flight(serve: Any) -> None:
    s: Served = serve("--size", "64MiB", "--memory", "64MiB")
    c = RawClient(s)
    c.handshake()
    n = 24
    # 2 MiB writes: served as tasks that yield between chunks, so several are in flight
    chunk = b"".join(b"load %08d " % i * 100 + bytes(2696) for i in range(512))
    assert len(chunk) == 2 * MiB

    def sender() -> None:
        try:
            for i in range(n):
                c.request(WRITE, 100 + i, i * 2 * MiB, len(chunk), chunk)
        except OSError:
            pass  # the server closed the connection after shutting down

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    replies: list[tuple[int, int]] = []
    err, cookie, _ = c.reply()
    replies.append((err, cookie))
    s.proc.send_signal(signal.SIGTERM)  # while later writes are in flight / queued
    while True:
        try:
            err, cookie, _ = c.reply()
        except (ConnectionError, TimeoutError):
            break
        replies.append((err, cookie))
    t.join(timeout=30)
    assert s.proc.wait(timeout=30) == 0
    assert replies[0][0] == 0
    # requests already in flight at SIGTERM were finished, not dropped
    assert sum(1 for e, _ in replies if e == 0) >= 2
    assert {e for e, _ in replies} <= {0, ESHUTDOWN}
    assert len({ck for _, ck in replies}) == len(replies)  # each answered at most once
    # no new connections once shutdown started
    with pytest.raises(OSError):
        socket.create_connection(_hostport(s.tcp), timeout=2)


def test_concurrent_sector_writes_to_shared_pages_lose_nothing(server: Served) -> None:
    """Four clients write interleaved 512-byte sectors of the same pages at once (each a
    read-modify-write of a shared page): every sector ends up with its writer's data."""
    nsect = 512  # 256 KiB: 64 pages, each shared by all four clients
    errors: list[BaseException] = []

    def writer(tid: int) -> None:
        try:
            c = RawClient(server)
            c.handshake()
            mine = [s for s in range(nsect) if s % 4 == tid]
            for s in mine:  # pipelined: all requests first, then the replies
                c.request(WRITE, s, s * 512, 512, bytes([tid + 1]) * 500 + b"%012d" % s)
            got = {c.reply()[1] for _ in mine}
            assert got == set(mine)
            c.request(DISC, 0, 0, 0)
            c.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    c = RawClient(server)
    c.handshake()
    c.request(READ, 1, 0, nsect * 512)
    err, _, data = c.reply(nsect * 512)
    assert err == 0
    for s in range(nsect):
        assert data[s * 512 : (s + 1) * 512] == bytes([s % 4 + 1]) * 500 + b"%012d" % s, s
    c.close()
    assert server.stats()["blockdev"]["blockdev_rmw"] >= nsect
