"""What a host pool's first touch costs (docs/PERF.md "Host pools are committed and populated").

Writes the same bytes into a memfd mapping three ways, in one run: a fresh region (pages
allocated and mapped by one fault per 4 KiB page, as cachemgrd's pools were), a second mapping
of a region whose pages exist (page-table faults only), and a region committed with fallocate
and mapped with MAP_POPULATE (what MemfdRegion and the clients do now); also what committing
and populating cost once, at pool creation and attach.

    python3 bench/host_pool_touch_bench.py [--mib 512] [--repeats 3]
"""

import argparse
import mmap
import os
import time

import numpy as np


def region(size: int, commit: bool):
    fd = os.memfd_create("cachemgr-touch-bench")
    os.ftruncate(fd, size)
    start = time.perf_counter()
    if commit:
        os.posix_fallocate(fd, 0, size)
    return fd, time.perf_counter() - start


def mapped(fd: int, size: int, populate: bool):
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    start = time.perf_counter()
    m = mmap.mmap(fd, size, flags=flags)
    return m, time.perf_counter() - start


def write_gbps(m, source) -> float:
    view = np.frombuffer(m, np.uint8)
    start = time.perf_counter()
    view[:] = source
    seconds = time.perf_counter() - start
    del view
    return source.size / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    source = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    for run in range(args.repeats):
        fd, _ = region(size, commit=False)
        fresh, _ = mapped(fd, size, populate=False)
        first_touch = write_gbps(fresh, source)
        second_map, _ = mapped(fd, size, populate=False)
        existing_pages = write_gbps(second_map, source)
        fresh.close(), second_map.close(), os.close(fd)
        fd, commit_s = region(size, commit=True)
        populated, populate_s = mapped(fd, size, populate=True)
        committed = write_gbps(populated, source)
        populated.close(), os.close(fd)
        print(f"run {run + 1}: {args.mib} MiB written at {first_touch:.2f} GB/s into a fresh "
              f"region, {existing_pages:.2f} GB/s through a new mapping of existing pages, "
              f"{committed:.2f} GB/s committed + populated ({committed / first_touch:.1f}x); "
              f"fallocate {commit_s * 1e3:.0f} ms, MAP_POPULATE {populate_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
