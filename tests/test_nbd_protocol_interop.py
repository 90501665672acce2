"""Interop of tmem.nbd.protocol with real NBD clients (libnbd's nbdinfo/nbdsh/nbdcopy, qemu-io).

The server here is a deliberately tiny socket-thread shell written in this file (not the
project's asyncio server), serving an in-memory bytearray, so a failure points at the
protocol layer. The shell applies each request as it arrives but holds the replies
until the client stops sending, then answers them in *reverse* order, so pipelining
clients get out-of-order replies; all-zero 4 KiB pieces of a READ go out as holes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem.nbd.protocol import (
    NEED_DATA,
    Buffer,
    Command,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
)

pytestmark = pytest.mark.clients

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd only imports here
PAGE = 4096


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed")
    return path


def _need_libnbd_python() -> None:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no /usr/bin/python3")
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip("python3-libnbd not installed")


class MemServer:
    """In-memory NBD server: one thread per connection around a ServerConnection."""

    def __init__(
        self, size: int, description: str = "protocol interop disk", block_status: bool = False
    ) -> None:
        self.disk = bytearray(size)
        self.block_status = block_status
        self.lock = threading.Lock()
        self.info = ExportInfo("mem", size, description=description)
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uri = f"nbd://127.0.0.1:{self.port}/mem"
        self.threads: list[threading.Thread] = []
        self.closing = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def close(self) -> None:
        self.closing = True
        self.sock.close()
        for t in self.threads:
            t.join(timeout=10)

    def _accept(self) -> None:
        while not self.closing:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            self.threads.append(t)
            t.start()

    def _execute(self, conn: ServerConnection, req: Request) -> list[Buffer]:
        """Apply a request now; return its reply (sent later)."""
        self.stats[req.command.name] += 1
        if req.fua:
            self.stats["FUA"] += 1
        if req.no_hole:
            self.stats["NO_HOLE"] += 1
        if req.fast_zero:
            self.stats["FAST_ZERO"] += 1
        lo, hi = req.offset, req.offset + req.length
        with self.lock:
            if req.command is Command.WRITE:
                assert req.payload is not None
                self.disk[lo:hi] = req.payload
            elif req.command in (Command.TRIM, Command.WRITE_ZEROES):
                self.disk[lo:hi] = bytes(req.length)
            elif req.command is Command.BLOCK_STATUS:
                return conn.reply_block_status(req, self._extents(lo, hi))
            elif req.command is Command.READ:
                data = bytes(self.disk[lo:hi])
                if not conn.structured or req.df:
                    return conn.reply_parts(req, 0, data)
                extents: list[bytes | int] = []
                for i in range(0, len(data), PAGE):
                    piece = data[i : i + PAGE]
                    if piece.count(0) == len(piece):
                        if extents and isinstance(extents[-1], int):
                            extents[-1] += len(piece)
                        else:
                            extents.append(len(piece))
                    else:
                        extents.append(piece)
                if any(isinstance(e, int) for e in extents):
                    self.stats["holes"] += 1
                return conn.reply_read(req, extents)
        return conn.reply_parts(req)

    def _extents(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """base:allocation from the data: all-zero 4 KiB pieces are hole+zero."""
        out: list[tuple[int, int]] = []
        pos = lo
        while pos < hi:
            end = min(hi, (pos // PAGE + 1) * PAGE)
            state = 3 if self.disk[pos:end].count(0) == end - pos else 0
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + end - pos, state)
            else:
                out.append((end - pos, state))
            pos = end
        return out

    def _serve(self, s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ServerConnection(
            {"mem": self.info}, default_export="mem", block_status=self.block_status
        )
        pending: list[list[Buffer]] = []
        try:
            s.sendall(conn.initial_bytes())
            while True:
                ev = conn.next_event()
                if out := conn.data_to_send():
                    s.sendall(out)
                if ev is NEED_DATA or isinstance(ev, Disconnect):
                    if len(pending) > 1:
                        self.stats["out_of_order_batches"] += 1
                    for parts in reversed(pending):
                        s.sendmsg(parts)
                    pending.clear()
                    if isinstance(ev, Disconnect):
                        self.stats["disconnect_" + ev.reason] += 1
                        return
                    conn.receive_data(s.recv(1 << 18))
                elif isinstance(ev, Request):
                    pending.append(self._execute(conn, ev))
                elif isinstance(ev, RequestRejected):
                    self.stats["rejected_" + str(ev.error)] += 1
                elif isinstance(ev, ProtocolError):
                    self.errors.append(ev.reason)
                    return
                elif isinstance(ev, ConnectionClosed):
                    return
                else:
                    self.stats["connections"] += 1
        except OSError as e:  # client went away mid-reply
            self.errors.append(repr(e))
        finally:
            s.close()


@pytest.fixture
def server() -> Iterator[MemServer]:
    srv = MemServer(64 * 1024 * 1024)
    yield srv
    srv.close()
    assert srv.errors == []


def test_nbdinfo_json_sees_size_flags_and_block_sizes(server: MemServer) -> None:
    nbdinfo = _need("nbdinfo")
    out = subprocess.run(
        [nbdinfo, "--json", server.uri], capture_output=True, text=True, timeout=60, check=True
    )
    info = json.loads(out.stdout)
    (export,) = info["exports"]
    assert export["export-name"] == "mem"
    assert export["description"] == "protocol interop disk"
    assert export["export-size"] == 64 * 1024 * 1024
    assert export["is_read_only"] is False
    assert info["structured"] is True
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"):
        assert export[cap] is True, cap
    assert export["can_multi_conn"] is True
    assert export["can_df"] is True  # SEND_DF, since structured replies were negotiated
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * 1024 * 1024
    assert info["protocol"] == "newstyle-fixed"


def test_nbdinfo_list_uses_opt_list_then_info(server: MemServer) -> None:
    nbdinfo = _need("nbdinfo")
    uri = f"nbd://127.0.0.1:{server.port}"
    out = subprocess.run(
        [nbdinfo, "--list", "--json", uri], capture_output=True, text=True, timeout=60, check=True
    )
    (export,) = json.loads(out.stdout)["exports"]
    assert export["export-name"] == "mem"
    assert export["description"] == "protocol interop disk"
    assert export["export-size"] == 64 * 1024 * 1024
    size = subprocess.run(
        [nbdinfo, "--size", uri], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(size.stdout) == 64 * 1024 * 1024  # "" is the default export


NBDSH_SCRIPT = r"""
import errno, os, sys, nbd
uri, structured = sys.argv[1], sys.argv[2] == "1"
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated() == structured
size = h.get_size()
assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua() and h.can_multi_conn()
pat = os.urandom(1 << 20)
h.pwrite(pat, 0)
assert h.pread(len(pat), 0) == pat
h.pwrite(b"F" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(4096, 4096)
h.zero(65536, 65536)
h.zero(4096, 131072 + 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(4096, 131072 + 8192, nbd.CMD_FLAG_FAST_ZERO)
h.cache(8192, 0)
h.flush()
want = bytearray(pat)
want[8192:12288] = b"F" * 4096
want[4096:8192] = bytes(4096)  # our server really discards
want[65536:131072] = bytes(65536)
want[131072 + 4096 : 131072 + 12288] = bytes(8192)
assert h.pread(len(want), 0) == bytes(want)
# unaligned I/O: libnbd refuses it below the advertised minimum unless strict mode is
# off; the protocol layer passes it through (the block device does read-modify-write)
h.set_strict_mode(0)
h.pwrite(b"odd", 1000001)
assert h.pread(5, 1000000) == bytes([pat[1000000]]) + b"odd" + bytes([pat[1000004]])
# tail of the export
h.pwrite(b"T" * 512, size - 512)
assert h.pread(512, size - 512) == b"T" * 512
# past the end (strict mode is off): the server answers, not libnbd's own checks
for call, code in ((lambda: h.pread(1024, size - 512), errno.EINVAL),
                   (lambda: h.pwrite(b"x" * 1024, size - 512), errno.ENOSPC),
                   (lambda: h.trim(1024, size - 512), errno.EINVAL)):
    try:
        call()
    except nbd.Error as e:
        assert e.errno in (code, errno.errorcode[code]), (e.errno, e.string)
    else:
        raise AssertionError("past-the-end request succeeded")
assert h.pread(512, size - 512) == b"T" * 512  # the failed write changed nothing
h.shutdown()
print("ok")
"""


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_nbdsh_script_pread_pwrite_trim_zero_flush_fua(server: MemServer, structured: bool) -> None:
    _need_libnbd_python()
    res = subprocess.run(
        [SYSTEM_PYTHON, "-c", NBDSH_SCRIPT, server.uri, "1" if structured else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    st = server.stats
    # the script's accepted commands, one by one (the refused ones are counted below)
    assert st["TRIM"] == 1 and st["WRITE_ZEROES"] == 3 and st["FLUSH"] == 2 and st["CACHE"] == 1
    assert st["FUA"] == 2 and st["NO_HOLE"] == 1 and st["FAST_ZERO"] == 1
    assert st["rejected_22"] == 2 and st["rejected_28"] == 1
    assert st["disconnect_disc"] == 1
    if structured:
        assert st["holes"] >= 1  # OFFSET_HOLE chunks were parsed by libnbd


def test_nbdcopy_round_trip_multi_conn_out_of_order(server: MemServer, tmp_path: Path) -> None:
    nbdcopy = _need("nbdcopy")
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    size = 64 * 1024 * 1024
    block = hashlib.sha256(b"tmem").digest() * 128  # 4 KiB of varied bytes
    with src.open("wb") as f:
        for i in range(size // PAGE):
            # mix of data and zero pages so reads produce both data and hole chunks
            f.write(bytes(PAGE) if i % 7 == 3 else block[i % 4096 :] + block[: i % 4096])
    subprocess.run(
        [nbdcopy, "--connections=4", "--requests=16", str(src), server.uri],
        check=True,
        timeout=300,
    )
    subprocess.run(
        [nbdcopy, "--connections=4", "--requests=16", server.uri, str(back)],
        check=True,
        timeout=300,
    )
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(server.disk).hexdigest() == digest
    assert server.stats["connections"] >= 2
    assert server.stats["out_of_order_batches"] > 0


def test_qemu_io_pattern_writes_and_verifying_reads(server: MemServer) -> None:
    qemu_io = _need("qemu-io")
    cmds = [
        "write -P 0xa5 0 1M",
        "write -P 0x5a 4096 4096",
        "write -P 0x11 1000 1000",  # unaligned
        "read -P 0xa5 0 1000",
        "read -P 0x11 1000 1000",
        "read -P 0xa5 2000 2096",
        "read -P 0x5a 4096 4096",
        "write -z 65536 65536",
        "read -P 0 65536 65536",
        "discard 131072 65536",
        "flush",
    ]
    args = [qemu_io, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    res = subprocess.run(
        [*args, server.uri], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Pattern verification failed" not in res.stdout
    assert bytes(server.disk[1000:2000]) == b"\x11" * 1000
    assert bytes(server.disk[4096:8192]) == b"\x5a" * 4096
    assert bytes(server.disk[65536:131072]) == bytes(65536)


@pytest.fixture
def bs_server() -> Iterator[MemServer]:
    srv = MemServer(1024 * 1024, block_status=True)
    srv.disk[0:4096] = b"x" * 4096
    srv.disk[65536 + 100 : 65536 + 200] = b"y" * 100
    yield srv
    srv.close()
    assert srv.errors == []


WANT_MAP = [(0, 4096, 0), (4096, 61440, 3), (65536, 4096, 0), (69632, 1024 * 1024 - 69632, 3)]


def test_block_status_nbdinfo_map(bs_server: MemServer) -> None:
    nbdinfo = _need("nbdinfo")
    out = subprocess.run(
        [nbdinfo, "--map", "--json", bs_server.uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(out.stdout)]
    assert got == WANT_MAP
    info = subprocess.run(
        [nbdinfo, "--json", bs_server.uri], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(info.stdout)["exports"][0]["contexts"] == ["base:allocation"]
    assert bs_server.stats["BLOCK_STATUS"] >= 1


def test_block_status_qemu_img_map_and_convert(bs_server: MemServer, tmp_path: Path) -> None:
    qemu_img = _need("qemu-img")
    out = subprocess.run(
        [qemu_img, "map", "--output=json", "-f", "raw", bs_server.uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = [(e["start"], e["length"], 0 if e["data"] else 3) for e in json.loads(out.stdout)]
    assert got == WANT_MAP
    dst = tmp_path / "copy.img"
    subprocess.run(
        [qemu_img, "convert", "-f", "raw", "-O", "raw", bs_server.uri, str(dst)],
        check=True,
        timeout=60,
    )
    assert dst.read_bytes() == bytes(bs_server.disk)
