#!/usr/bin/env python3
"""The KV mem-pool allocator (client/kv_mem_pool) under the real PyTorch on a GPU: what the vLLM
connector's get_mem_pool_context relies on (kv_mem_pool, docs/VLLM.md). scripts/gpu-check.sh run
executes it with the machine's python3 and torch; it needs neither gRPC nor the cachemgr
package (it loads cachemgr/kv_mem_pool.py, which uses only the standard library, by path).

  1. a region of device memory (an allocation of PyTorch's default allocator, kept alive);
  2. the allocator configured over it; a torch.cuda.MemPool of CUDAPluggableAllocator(library,
     cachemgr_kv_malloc, cachemgr_kv_free); under torch.cuda.use_mem_pool, raw int8 tensors of
     several sizes, zero-filled, as vLLM allocates its KV cache;
  3. every data_ptr lies in the region, and values written by kernels into each tensor read back
     both through the tensor and through the region's own tensor (the same device memory);
  4. deleting the tensors, then the pool, and emptying the cache returns every byte (the pool
     caches segments while it lives: the counts are recorded at each step);
  5. a request larger than what is left raises torch.OutOfMemoryError, nothing is allocated
     elsewhere meanwhile, and the pool still serves what fits.

Writes kv_mem_pool.json into --out; exit status 0 when every check passed or the machine has no
torch / no GPU (status "skipped", with the reason), 1 otherwise.
"""

import argparse
import gc
import importlib.util
import json
import os
import sys
import traceback

MiB = 1 << 20
REGION_BYTES = 64 * MiB


def load_wrapper(explicit):
    """cachemgr/kv_mem_pool.py: beside this script in the bundle, else in the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [explicit] if explicit else [
        os.path.join(here, "kv_mem_pool.py"),
        os.path.join(here, "..", "..", "client", "python", "cachemgr", "kv_mem_pool.py")]
    for path in candidates:
        if path and os.path.exists(path):
            spec = importlib.util.spec_from_file_location("cachemgr_kv_mem_pool", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"kv_mem_pool.py not found (looked at {candidates})")


def check(results, name, ok, detail=""):
    results["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def run(torch, wrapper, library_path, results):
    lib = wrapper.KvMemPoolLibrary(library_path)
    device = torch.cuda.current_device()
    # The region: default-allocator memory, 256-byte aligned (PyTorch gives 512).
    backing = torch.empty(REGION_BYTES + 256, dtype=torch.uint8, device=device)
    base = backing.data_ptr() + (-backing.data_ptr()) % 256
    offset0 = base - backing.data_ptr()
    lib.configure(device, base, REGION_BYTES)
    results["region"] = {"device": device, "base": base, "bytes": REGION_BYTES}

    allocator = lib.torch_allocator()
    pool = torch.cuda.MemPool(allocator.allocator())
    sizes = [3, 1 * MiB - 3, 5 * MiB + 7, 12 * MiB]
    with torch.cuda.use_mem_pool(pool):
        tensors = [torch.zeros(n, dtype=torch.int8, device=device) for n in sizes]
    stats = lib.stats()
    results["after_allocation"] = dict(vars(stats))
    inside = [stats.contains(t.data_ptr(), t.numel()) for t in tensors]
    check(results, "every tensor lies in the region", all(inside),
          ", ".join(f"{t.numel()} B at {t.data_ptr() - base:#x}" for t in tensors))
    check(results, "the allocator handed out the segments", stats.live_allocations >= 1 and
          stats.bytes_in_use >= sum(sizes), f"{stats.live_allocations} segments, "
          f"{stats.bytes_in_use} bytes in use")
    check(results, "zero-filled", all(int(t.abs().sum()) == 0 for t in tensors))

    for i, t in enumerate(tensors):
        t.copy_((torch.arange(t.numel(), device=device) * (i + 3) % 251 - 125).to(torch.int8))
        t.add_(1)
    torch.cuda.synchronize()
    ok = True
    for i, t in enumerate(tensors):
        want = ((torch.arange(t.numel(), device=device) * (i + 3) % 251 - 125) + 1).to(torch.int8)
        start = t.data_ptr() - base + offset0
        through_region = backing[start:start + t.numel()].view(torch.int8)
        ok &= bool(torch.equal(t, want)) and bool(torch.equal(through_region, want))
    check(results, "kernel writes read back through the tensors and through the region", ok)

    del tensors, t, through_region, want
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    results["after_deleting_tensors"] = dict(vars(lib.stats()))
    del pool
    gc.collect()
    torch.cuda.empty_cache()
    stats = lib.stats()
    results["after_deleting_pool"] = dict(vars(stats))
    check(results, "deleting the tensors and the pool returns every byte",
          stats.bytes_in_use == 0 and stats.live_allocations == 0,
          f"in use {results['after_deleting_tensors']['bytes_in_use']} B with the pool alive, "
          f"{stats.bytes_in_use} B after it; rejected frees {stats.rejected_frees}")
    check(results, "no foreign frees", stats.rejected_frees == 0)

    pool = torch.cuda.MemPool(allocator.allocator())
    failed_before = lib.stats().failed_allocations
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(device)[0]
    raised = None
    with torch.cuda.use_mem_pool(pool):
        big = torch.empty(40 * MiB, dtype=torch.int8, device=device)
        try:
            torch.empty(40 * MiB, dtype=torch.int8, device=device)  # does not fit beside big
        except torch.OutOfMemoryError as e:
            raised = str(e).splitlines()[0]
        small = torch.ones(8 * MiB, dtype=torch.int8, device=device)
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info(device)[0]
    stats = lib.stats()
    check(results, "exhaustion raises torch.OutOfMemoryError", raised is not None, raised or "")
    # The region was device memory already: a fallback to cudaMalloc would take 40 MiB more.
    check(results, "the failed request reached the allocator and no other memory was taken",
          stats.failed_allocations > failed_before and free_before - free_after < 20 * MiB,
          f"failed allocations {failed_before} -> {stats.failed_allocations}, device free "
          f"memory {free_before} -> {free_after}")
    check(results, "what fits after the failure still comes from the region",
          stats.contains(big.data_ptr(), big.numel()) and
          stats.contains(small.data_ptr(), small.numel()) and int(small.sum()) == 8 * MiB)
    del big, small, pool
    gc.collect()
    torch.cuda.empty_cache()
    stats = lib.stats()
    results["end"] = dict(vars(stats))
    check(results, "all returned at the end", stats.bytes_in_use == 0, str(stats.bytes_in_use))
    check(results, "reset", lib.reset())
    del backing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True, help="libcachemgr_kv_mem_pool.so")
    parser.add_argument("--wrapper", help="cachemgr/kv_mem_pool.py (default: found nearby)")
    parser.add_argument("--out", default=".", help="directory for kv_mem_pool.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"status": "failed", "checks": []}

    def finish(status, **extra):
        results.update(status=status, **extra)
        with open(os.path.join(args.out, "kv_mem_pool.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"kv_mem_pool_check: {status}" +
              (f" ({extra['reason']})" if "reason" in extra else ""))
        return 1 if status == "failed" else 0

    try:
        import torch
    except ImportError as e:
        return finish("skipped", reason=f"no PyTorch on this machine ({e})")
    results["torch"] = torch.__version__
    if not torch.cuda.is_available():
        return finish("skipped", reason=f"torch {torch.__version__} sees no CUDA device")
    results["device"] = torch.cuda.get_device_name()
    try:
        run(torch, load_wrapper(args.wrapper), args.library, results)
    except Exception:  # noqa: BLE001 - recorded as the failure it is
        traceback.print_exc()
        return finish("failed", error=traceback.format_exc())
    return finish("passed" if all(c["ok"] for c in results["checks"]) else "failed")


if __name__ == "__main__":
    sys.exit(main())
