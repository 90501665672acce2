"""4 KiB writes of real pages at queue depth 32 through libnbd; prints writes per second.

A helper of nbd_vs_nbdkit.py: ``qemu-img bench -w`` writes one fill pattern, which a
store that detects same-filled pages handles without storing any data, so that figure
says little about real data. This one writes the image's pages that are not one 8-byte
value repeated, in order, 4 KiB each. Debian's python3-libnbd imports only under the
system interpreter:

    /usr/bin/python3 benchmarks/nbd_aio_writes.py URI IMAGE COUNT
"""

from __future__ import annotations

import sys
import time

import nbd  # python3-libnbd

PAGE = 4096
DEPTH = 32


def main() -> None:
    uri, image, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
    seconds = time.perf_counter() - t0
    h.shutdown()
    print(f"{len(bufs)} {seconds:.6f}")


if __name__ == "__main__":
    main()
