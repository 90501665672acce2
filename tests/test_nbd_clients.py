"""`tmem serve` with real, unmodified NBD clients: nbdinfo, nbdcopy, qemu-io, qemu-img, nbdsh."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_nbd_server_harness import (
    need,
    need_libnbd_python,
    real_data_image,
    run,
    serve_factory,
)
from tmem.corpus import sha256_file

pytestmark = pytest.mark.clients
MiB = 1 << 20


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_factory(tmp_path)


def test_nbdinfo_sees_size_flags_and_block_sizes(serve: Any) -> None:
    need("nbdinfo")
    s = serve("--size", "64MiB", "--memory", "8MiB", "--export-name", "swap0")
    for uri in (f"nbd://{s.tcp}/swap0", f"nbd+unix:///swap0?socket={s.unix}"):
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        (export,) = info["exports"]
        assert info["protocol"] == "newstyle-fixed"
        assert export["export-name"] == "swap0"
        assert export["export-size"] == 64 * MiB
        assert export["is_read_only"] is False
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"):
            assert export[flag] is True, flag
        assert export["can_multi_conn"] is True
        assert export["can_cache"] is True
        assert export["block_size_minimum"] == 512
        assert export["block_size_preferred"] == 4096
        assert export["block_size_maximum"] == 32 * MiB
    listing = run(["nbdinfo", "--list", "--json", f"nbd://{s.tcp}"]).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["swap0"]
    assert s.stop() == 0


def test_nbdcopy_256mib_real_data_round_trip_multi_conn(serve: Any, tmp_path: Path) -> None:
    need("nbdcopy")
    image = tmp_path / "image.raw"
    digest = real_data_image(image, 256 * MiB)
    s = serve("--size", "256MiB", "--memory", "256MiB")
    run(["nbdcopy", "--connections=4", "--threads=4", str(image), s.uri], timeout=300)
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=4", "--threads=4", s.unix_uri, str(out)], timeout=300)
    assert sha256_file(out) == digest
    st = s.stats()
    b = st["blockdev"]
    # nbdcopy sends all-zero blocks as WRITE_ZEROES (or skips them: the export starts zero)
    assert 200 * MiB <= b["blockdev_write_bytes"] + b["blockdev_zero_bytes"] <= 256 * MiB
    assert st["server"]["server_connections_total"] >= 8
    assert st["server"]["server_bad_clients"] == 0
    assert s.stop() == 0


@pytest.mark.parametrize("behind", [True, False])
def test_compress_behind_catches_up_when_idle(serve: Any, tmp_path: Path, behind: bool) -> None:
    """Writes land raw (compress-behind); once clients are quiet the server compresses
    every staged page, reaching the density of compressing at write time."""
    need("nbdcopy")
    image = tmp_path / "image.raw"
    digest = real_data_image(image, 32 * MiB)
    flag = "--compress-behind" if behind else "--no-compress-behind"
    s = serve("--size", "32MiB", "--memory", "64MiB", flag)
    run(["nbdcopy", "--connections=2", str(image), s.uri], timeout=300)
    deadline = time.monotonic() + 60
    while (z := s.stats()["zcache"])["staged_pages"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert z["staged_pages"] == 0
    if behind:
        assert z["staged_pages_total"] >= 6000 and z["compacted_pages"] >= 6000
    else:
        assert z["staged_pages_total"] == 0 and z["compacted_pages"] == 0
    # compressed: /usr files take about 0.85 frames per page either way (raw: 1.0)
    assert z["frames_used"] < 0.9 * z["stored_pages"]
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=2", s.uri, str(out)], timeout=300)
    assert sha256_file(out) == digest
    assert s.stop() == 0


@pytest.mark.parametrize("loop", ["auto", "asyncio"])  # uvloop when installed, and without
def test_qemu_io_patterns_aligned_and_unaligned(serve: Any, loop: str) -> None:
    need("qemu-io")
    s = serve("--size", "16MiB", "--memory", "4MiB", loop=loop)
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0x11 513 1000",  # unaligned: read-modify-write of one page
        "write -P 0x22 4095 2",  # straddles a page boundary
        "write -P 0x33 1M 512",  # 512-aligned sector
        "write -z 2M 64k",
        "read -P 0xab 0 513",
        "read -P 0x11 513 1000",
        "read -P 0xab 1513 2582",
        "read -P 0x22 4095 2",
        "read -P 0xab 4097 1044479",
        "read -P 0x33 1M 512",
        "read -P 0 1049088 1M",
        "read -P 0 2M 64k",
        "read -P 0 15M 1M",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    res = run([*args, s.uri])
    assert "Pattern verification failed" not in res.stdout + res.stderr
    assert res.stdout.count("read ") == 9
    # and a deliberately wrong pattern is caught (the check can fail)
    bad = subprocess.run(
        [*args[:3], "-c", "read -P 0xcd 0 4k", s.uri], capture_output=True, text=True
    )
    assert "Pattern verification failed" in bad.stdout + bad.stderr
    assert s.stop() == 0


def test_qemu_img_convert_in_and_out(serve: Any, tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "in.raw"
    digest = real_data_image(image, 24 * MiB)
    s = serve("--size", "24MiB", "--memory", "32MiB")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), s.uri])
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.unix_uri, str(out)])
    assert sha256_file(out) == digest
    assert s.stop() == 0


NBDSH_SCRIPT = textwrap.dedent(
    """
    import sys
    import nbd

    uri = sys.argv[1]
    h = nbd.NBD()
    h.set_strict_mode(0)  # let unaligned and out-of-range requests reach the server
    h.connect_uri(uri)
    size = h.get_size()
    assert size == 16 << 20, size
    assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua()
    assert h.can_multi_conn() and h.can_fast_zero() and h.can_cache()
    page = b"tmem nbdsh " * 372 + b"0123"
    assert len(page) == 4096
    # FUA writes
    for i in range(64):
        h.pwrite(page, i * 4096, nbd.CMD_FLAG_FUA)
    assert h.pread(64 * 4096, 0) == page * 64
    h.flush()
    # (libnbd argument order: count first, then offset)
    # trim of whole pages reads back as zeros (our trim drops pages), partial is kept
    h.trim(4 * 4096, 8 * 4096)
    assert h.pread(4 * 4096, 8 * 4096) == bytes(4 * 4096)
    h.trim(4096, 2048)  # partial pages: a hint, data stays
    assert h.pread(4096, 4096) == page
    for i in range(32):
        h.pwrite(page, i * 4096)
    h.zero(16 * 4096, 4096)
    assert h.pread(16 * 4096, 4096) == bytes(16 * 4096)
    h.zero(20 * 4096 + 7, 100)  # unaligned: RMW of the first and last page
    assert h.pread(22 * 4096, 0) == page[:100] + bytes(20 * 4096 + 7) + page[107:] + page
    h.zero(1024, 512)  # 512-aligned, inside one page
    assert h.pread(4096, 0) == page[:100] + bytes(4096 - 100)
    h.pwrite(page, 0)
    h.zero(1024, 512)
    assert h.pread(4096, 0) == page[:512] + bytes(1024) + page[1536:]
    h.zero(4096, 24 * 4096, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4096, 24 * 4096) == bytes(4096)
    # outside the zeroed ranges nothing changed
    assert h.pread(4096, 23 * 4096) == page and h.pread(4096, 25 * 4096) == page
    h.cache(1 << 20, 0)
    h.pwrite(page, 30 * 4096, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 30 * 4096) == page
    # read past the end is refused with EINVAL, the connection survives
    try:
        h.pread(4096, size - 1024)  # read past the end
    except nbd.Error as e:
        assert e.errno == "EINVAL", e.errno
    else:
        raise AssertionError("read past end succeeded")
    try:
        h.pwrite(page, size - 100)
    except nbd.Error as e:
        assert e.errno == "ENOSPC", e.errno
    else:
        raise AssertionError("write past end succeeded")
    # several commands in flight, completed out of order by the server
    cookies = [h.aio_pwrite(bytes([i]) * 65536, (1 << 20) + i * 65536) for i in range(32)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert h.pread(65536, (1 << 20) + 5 * 65536) == bytes([5]) * 65536
    h.flush()
    h.shutdown()
    print("nbdsh-ok")
    """
)


def test_nbdsh_trim_zero_flush_fua(serve: Any, tmp_path: Path) -> None:
    need_libnbd_python()
    s = serve("--size", "16MiB", "--memory", "4MiB", "--backing", str(tmp_path / "spill"))
    script = tmp_path / "script.py"
    script.write_text(NBDSH_SCRIPT)
    res = run(["/usr/bin/python3", str(script), s.uri])
    assert "nbdsh-ok" in res.stdout
    b = s.stats()["blockdev"]
    # the script's trims and zeroes, byte for byte (libnbd: count first, then offset)
    assert b["blockdev_trim_bytes"] == 4 * 4096 + 4096
    assert b["blockdev_zero_bytes"] == 16 * 4096 + 20 * 4096 + 7 + 1024 + 1024 + 4096
    assert b["blockdev_flushes"] >= 64
    assert s.stop() == 0


def test_four_times_budget_with_backing_file(serve: Any, tmp_path: Path) -> None:
    """Write 4x the memory budget with a backing file; everything reads back intact."""
    need("nbdcopy")
    image = tmp_path / "image.raw"
    digest = real_data_image(image, 64 * MiB)
    backing = tmp_path / "spill.img"
    s = serve("--size", "64MiB", "--memory", "16MiB", "--backing", str(backing))
    run(["nbdcopy", "--connections=2", str(image), s.uri], timeout=300)
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=2", s.uri, str(out)], timeout=300)
    assert sha256_file(out) == digest
    st = s.stats()
    b = st["blockdev"]
    assert b["blockdev_enospc"] == 0
    assert st["server"]["server_request_errors"] == 0
    # the budget held: most pages spilled to the backing file, by writeback or directly
    assert b["blockdev_backing_pages"] > 0
    assert b["blockdev_writeback_pages"] + b["blockdev_backing_stores"] >= 8192
    assert b["blockdev_writeback_pages"] > 0  # LRU pages moved out so new writes hit RAM
    assert b["blockdev_ram_stores"] > 0
    assert backing.stat().st_size == 64 * MiB  # bounded by the export size
    assert s.stop() == 0
    assert backing.stat().st_size == 0  # volatile: emptied on exit, disk space returned


def test_block_status_map_with_nbdinfo_and_qemu_img(serve: Any) -> None:
    """base:allocation: never-written, trimmed and zeroed pages are holes, data is data."""
    need("nbdinfo", "qemu-io", "qemu-img")
    s = serve("--size", "16MiB", "--memory", "4MiB")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 4M 1M", "-c", "write -z 4608k 64k",
         "-c", "discard 4M 4k", s.uri])  # fmt: skip
    extents = json.loads(run(["nbdinfo", "--map", "--json", s.uri]).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert got == [
        (0, 4 * MiB + 4096, 3),
        (4 * MiB + 4096, 512 * 1024 - 4096, 0),
        (4608 * 1024, 64 * 1024, 3),
        (4672 * 1024, 448 * 1024, 0),
        (5 * MiB, 11 * MiB, 3),
    ]
    qmap = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", s.uri]).stdout)
    assert sum(e["length"] for e in qmap if e["data"]) == 1 * MiB - 64 * 1024 - 4096
    # a copy skips the holes and is still byte-exact
    res = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 4100k 508k", "-c", "read -P 0 0 4M",
               s.uri])  # fmt: skip
    assert "Pattern verification failed" not in res.stdout
    assert s.stop() == 0
