"""Memory on demand, measured on a real `tmem serve` process: its RSS follows what it
stores (empty, filled with 256 MiB of real pages, trimmed), unless --prefault asks for
the whole budget up front; /stats `mem_used_total` tells the truth about it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from test_nbd_server_badinput import READ, TRIM, WRITE, RawClient
from test_nbd_server_harness import Served, serve_factory

pytestmark = pytest.mark.slow

MiB = 1 << 20
GiB = 1 << 30
DATA = 256 * MiB
REQUEST = MiB
T = TypeVar("T")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_factory(tmp_path)


def rss(s: Served) -> int:
    """The server's resident set (VmRSS), in bytes."""
    for line in Path(f"/proc/{s.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settle(read: Callable[[], T], *, done: Callable[[T], bool], timeout: float = 20.0) -> T:
    """Poll ``read`` until ``done`` says so or ``timeout`` passes; the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


def test_an_empty_server_holds_little_and_prefault_holds_the_budget(serve: Any) -> None:
    s: Served = serve("--size", "1GiB", "--memory", "1GiB")
    empty = rss(s)
    assert empty < 100 * MiB, f"empty server RSS {empty / MiB:.1f} MiB"
    st = s.stats()["zcache"]
    assert st["frames_total"] == GiB // 4096 and st["arena_resident_bytes"] == 0
    assert s.stop() == 0
    p: Served = serve("--size", "1GiB", "--memory", "1GiB", "--prefault")
    full = rss(p)
    assert full > GiB, f"prefaulted server RSS {full / MiB:.1f} MiB"
    assert p.stats()["zcache"]["arena_resident_bytes"] == GiB
    print(f"\nRSS empty {empty / MiB:.1f} MiB, with --prefault {full / MiB:.1f} MiB")
    assert p.stop() == 0


@pytest.mark.parametrize("allocator", ["zsmalloc", "zbud"])
def test_rss_follows_256_mib_of_real_pages_and_comes_back_after_trim(
    serve: Any, anon_pages: list[bytes], file_pages: list[bytes], allocator: str
) -> None:
    corpus = b"".join(anon_pages + file_pages)
    blob = (corpus * (DATA // len(corpus) + 1))[:DATA]
    s: Served = serve("--size", "1GiB", "--memory", "1GiB", "--allocator", allocator)
    empty = rss(s)

    c = RawClient(s)
    c.handshake()
    for n, pos in enumerate(range(0, DATA, REQUEST)):
        c.request(WRITE, n, pos, REQUEST, blob[pos : pos + REQUEST])
        assert c.reply() == (0, n, b"")
    for n, pos in enumerate(range(0, DATA, REQUEST)):
        c.request(READ, n, pos, REQUEST)
        err, cookie, data = c.reply(REQUEST)
        assert (err, cookie) == (0, n) and data == blob[pos : pos + REQUEST], f"at {pos}"

    # compress-behind has caught up: every page compressed, raw frames handed back
    z = settle(lambda: s.stats()["zcache"], done=lambda z: z["staged_pages"] == 0)
    assert z["staged_pages"] == 0 and z["stored_pages"] == DATA // 4096
    time.sleep(1.5)  # an idle poll or more: nothing left for idle work
    z = s.stats()["zcache"]
    stored = rss(s)
    growth = stored - empty
    used = z["mem_used_total"]
    report = (
        f"{allocator}: RSS empty {empty / MiB:.1f} MiB, holding 256 MiB {stored / MiB:.1f} MiB "
        f"(growth {growth / MiB:.1f} MiB), mem_used_total {used / MiB:.1f} MiB "
        f"(arena resident {z['arena_resident_bytes'] / MiB:.1f} MiB, metadata "
        f"{z['metadata_bytes'] / MiB:.1f} MiB, frames_used {z['frames_used']})"
    )
    print("\n" + report)
    assert abs(used - growth) <= 0.2 * growth, report

    c.request(TRIM, 1, 0, DATA)
    assert c.reply() == (0, 1, b"")
    c.request(READ, 2, 0, REQUEST)  # a trimmed range reads as zeros
    assert c.reply(REQUEST) == (0, 2, bytes(REQUEST))
    c.close()
    z = settle(lambda: s.stats()["zcache"], done=lambda z: z["stored_pages"] == 0)
    assert z["stored_pages"] == 0 and z["frames_used"] == 0
    after = settle(lambda: rss(s), done=lambda r: r - empty <= 48 * MiB)
    st = s.stats()
    print(
        f"after TRIM: RSS {after / MiB:.1f} MiB ({(after - empty) / MiB:+.1f} MiB over empty), "
        f"arena resident {st['zcache']['arena_resident_bytes'] / MiB:.1f} MiB, "
        f"frame releases {st['server']['server_frame_releases']}"
    )
    assert st["zcache"]["arena_resident_bytes"] == 0  # every freed frame went back
    assert after - empty <= 48 * MiB, f"{report}; after TRIM {after / MiB:.1f} MiB"
    assert s.stop() == 0
