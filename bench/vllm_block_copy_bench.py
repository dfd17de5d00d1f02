"""The connector's save copy of one layer's whole blocks, two ways in one run (docs/VLLM.md,
"Overhead without reuse"): vLLM's CPU cache (K transposed per head) gathered into rows and then
written into a pool-shaped memfd region (the row path), against one strided copy per block
straight into the region (Layout.copy_blocks, the path the connector takes for whole blocks).
SmolLM2-135M's shape: 3 KV heads, head_dim 64, 128-token blocks, float32; 4 blocks per copy
drawn at random from a 2,000-block cache (larger than the caches), memcpy of the same bytes
for reference. Run with the vLLM environment's python (needs torch):

    $(scripts/vllm-env.sh) bench/vllm_block_copy_bench.py [--iterations 300]
"""

import argparse
import mmap
import os
import time

import numpy as np
import torch

from cachemgr.integrations.vllm_layout import LAYOUTS

HEADS, BLOCK, DIM, CACHE_BLOCKS, COPY_BLOCKS = 3, 128, 64, 2000, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--layout", default="head_halves_k_transposed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layout = LAYOUTS[args.layout]
    kv = torch.randn(CACHE_BLOCKS, HEADS, BLOCK, 2 * DIM)
    size = CACHE_BLOCKS * 2 * BLOCK * HEADS * DIM * 4
    fd = os.memfd_create("cachemgr-copy-bench")
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, size)
    region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    pool = np.frombuffer(region, np.float32).reshape(CACHE_BLOCKS, 2, BLOCK, HEADS, DIM)
    pool_k, pool_v = pool[:, 0], pool[:, 1]
    torch_k, torch_v = torch.from_numpy(pool_k), torch.from_numpy(pool_v)
    rng = np.random.default_rng(0)
    picks = [(rng.choice(CACHE_BLOCKS, COPY_BLOCKS, replace=False),
              rng.choice(CACHE_BLOCKS, COPY_BLOCKS, replace=False))
             for _ in range(args.iterations)]
    nbytes = COPY_BLOCKS * BLOCK * HEADS * DIM * 4 * 2
    flat = np.random.default_rng(1).standard_normal(
        (CACHE_BLOCKS * 2 * BLOCK * HEADS * DIM) // 2).astype(np.float32)

    def row_path(src, dst):
        k, v = layout.gather_blocks(kv, DIM, list(src))
        shape = (COPY_BLOCKS, BLOCK, HEADS, DIM)
        pool_k[dst] = k.numpy().reshape(shape)
        pool_v[dst] = v.numpy().reshape(shape)

    def block_copies(src, dst):
        for s, d in zip(src, dst):
            layout.copy_blocks(kv, DIM, [int(s)], torch_k[d], torch_v[d])

    def memcpy(src, dst):
        start = int(src[0]) * (nbytes // 4)
        start = start % (flat.size - 2 * (nbytes // 4))
        out = pool.reshape(-1)[:nbytes // 4]
        np.copyto(out, flat[start:start + nbytes // 4])

    results = {}
    for name, fn in (("row path", row_path), ("block copies", block_copies),
                     ("memcpy", memcpy)):
        fn(*picks[0])
        start = time.perf_counter()
        for src, dst in picks:
            fn(src, dst)
        results[name] = (time.perf_counter() - start) / len(picks) * 1e6
    for name, us in results.items():
        print(f"{name:>13}: {us:7.1f} us per layer of {COPY_BLOCKS} blocks "
              f"({nbytes / us / 1e3:.2f} GB/s)")
    print(f"block copies / row path: {results['block copies'] / results['row path']:.2f}")


if __name__ == "__main__":
    main()
