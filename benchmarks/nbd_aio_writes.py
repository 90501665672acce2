"""4 KiB writes of real pages at queue depth 32 through libnbd; prints writes per second.

A helper of nbd_vs_nbdkit.py: ``qemu-img bench -w`` writes one fill pattern, which a
store that detects same-filled pages handles without storing any data, so that figure
says little about real data. This one writes the image's pages that are not one 8-byte
value repeated, in order, 4 KiB each. With STATS_URL (a `tmem serve --stats` /stats
address) the clock runs on after the last reply until the server reports no staged
pages, so a compress-behind server's write counts until it has compressed everything.
Debian's python3-libnbd imports only under the system interpreter:

    /usr/bin/python3 benchmarks/nbd_aio_writes.py URI IMAGE COUNT [STATS_URL]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import nbd  # python3-libnbd

PAGE = 4096
DEPTH = 32
POLL = 0.05  # seconds between /stats polls


def wait_compressed(stats_url: str, timeout: float = 300.0) -> None:
    """Poll tmem's /stats until staged_pages == 0 (everything compressed)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(stats_url, timeout=10) as r:
            if not json.load(r)["zcache"].get("staged_pages", 0):
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"pages still staged after {timeout:.0f} s")
        time.sleep(POLL)


def main() -> None:
    uri, image, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stats_url = sys.argv[4] if len(sys.argv) > 4 else None
    bufs = []
    with open(image, "rb") as f:
        while len(bufs) < count:
            page = f.read(PAGE)
            if len(page) < PAGE:
                break
            if page != page[:8] * (PAGE // 8):
                bufs.append(nbd.Buffer.from_bytearray(bytearray(page)))
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    retire = lambda _err: 1  # noqa: E731 - the completion callback: auto-retire
    t0 = time.perf_counter()
    for i, buf in enumerate(bufs):
        while h.aio_in_flight() >= DEPTH:
            h.poll(-1)
        h.aio_pwrite(buf, i * PAGE % size, completion=retire)
    while h.aio_in_flight():
        h.poll(-1)
    if stats_url:
        wait_compressed(stats_url)
    seconds = time.perf_counter() - t0
    h.shutdown()
    print(f"{len(bufs)} {seconds:.6f}")


if __name__ == "__main__":
    main()
