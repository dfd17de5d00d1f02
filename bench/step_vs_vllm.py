"""A scheduler's KV bookkeeping per decode step, in one run (docs/PERF.md "Step"): vLLM's own
in-process KVCacheManager against cachemgrd driven through the Python client, on the same trace.

The trace: R running requests (prompts drawn uniformly from 1k-4k tokens, seeded), D decode
steps; at every step each running request gets one new token. vLLM: allocate_slots(request, 1)
for each running request (its scheduler's call), the token appended to the request. The sidecar:
one Session.step of R allocate ops (slots derived by the caller), and, for reference, the same
step as R per-call Session.allocate. Prefill allocations happen before the timing on both sides.
Both sides keep Llama-3-8B's bookkeeping shape: 32 layers, block 16 (vLLM keeps one block table
for all layers, the sidecar one per layer, as compression needs).

Run it with the Python that has vLLM (scripts/vllm-env.sh) and the client installed:

    $(scripts/vllm-env.sh) bench/step_vs_vllm.py --cachemgrd build/cachemgr/cachemgrd \\
        [--requests 256] [--steps 256] [--per_call_steps 16] \\
        [--cxx_bench build/bench/cachemgr_bench_rpc]

With --cxx_bench the same step through the C++ client (cachemgr_bench_rpc's BM_DecodeStep, its
own daemon, the same 1k-4k prompt spread) runs right after, in the same invocation.
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

LAYERS, BLOCK = 32, 16


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def vllm_kv_manager(num_blocks, max_model_len):
    """vLLM's in-process KVCacheManager for the Llama-3-8B shape (LAYERS layers, 8 KV heads of
    128, fp16, BLOCK-token blocks), prefix caching off."""
    import torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                            KVCacheGroupSpec)

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=8, head_size=128,
                             dtype=torch.float16)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(
                               [f"model.layers.{i}.self_attn" for i in range(LAYERS)], spec)])
    return KVCacheManager(config, max_model_len=max_model_len, scheduler_block_size=BLOCK,
                          hash_block_size=BLOCK, enable_caching=False)


def vllm_steps(prompts, steps):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    manager = vllm_kv_manager(sum((p + steps) // BLOCK + 2 for p in prompts) + 16, 8192)
    requests = []
    for i, p in enumerate(prompts):
        r = Request(f"r{i}", list(range(p)), SamplingParams(max_tokens=steps + 1), None)
        assert manager.allocate_slots(r, p) is not None
        r.num_computed_tokens = p
        r.append_output_token_ids(0)
        requests.append(r)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for r in requests:
            assert manager.allocate_slots(r, 1) is not None
        times.append(time.perf_counter() - start)
        for r in requests:  # what the model and the scheduler do between steps
            r.num_computed_tokens += 1
            r.append_output_token_ids(0)
    return times


@contextlib.contextmanager
def daemon_socket(cachemgrd, *args):
    """A cachemgrd of its own (with `args`), in a temporary directory; yields its socket."""
    with tempfile.TemporaryDirectory(prefix="step-bench-") as work:
        sock = os.path.join(work, "d.sock")
        log = open(os.path.join(work, "d.log"), "w")
        daemon = subprocess.Popen([cachemgrd, f"--socket={sock}", "--memory_budget=8G",
                                   "--log_level=warning", *args],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"cachemgrd did not start: see {log.name}")
                time.sleep(0.05)
            yield sock
        finally:
            daemon.terminate()
            daemon.wait(timeout=15)


def sidecar_steps(cachemgrd, prompts, steps, per_call_steps):
    import cachemgr
    from cachemgr import StepOp

    with daemon_socket(cachemgrd) as sock:
        # Tiny heads: the bookkeeping is the subject, not the bytes.
        model = cachemgr.ModelSpec(name="step-bench", num_layers=LAYERS, num_q_heads=1,
                                   num_kv_heads=1, head_dim=8, dtype="fp16", block_size=BLOCK)
        blocks = sum((p + steps + per_call_steps) // BLOCK + 2 for p in prompts) + 16
        s = cachemgr.Session.attach(sock, "step-bench", model, num_blocks=blocks)
        ids = [f"r{i}" for i in range(len(prompts))]
        prefill = [StepOp.allocate(i, p) for i, p in zip(ids, prompts)]
        for first in range(0, len(prefill), 32):  # prompts list many blocks: smaller replies
            for r in s.step(prefill[first:first + 32]):
                assert r.ok, r.error
        ops = [StepOp.allocate(i, 1) for i in ids]
        step_times = []
        for _ in range(steps):
            start = time.perf_counter()
            results = s.step(ops)
            step_times.append(time.perf_counter() - start)
            assert results[0].ok
        per_call = []
        for _ in range(per_call_steps):
            start = time.perf_counter()
            for i in ids:
                s.allocate(i, 1)
            per_call.append(time.perf_counter() - start)
        s.detach()
        return step_times, per_call


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cachemgrd", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--per_call_steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cxx_bench", default="", help="cachemgr_bench_rpc, for the C++ client")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    prompts = [rng.randint(1024, 4096) for _ in range(args.requests)]

    vllm = vllm_steps(prompts, args.steps)
    step, per_call = sidecar_steps(args.cachemgrd, prompts, args.steps, args.per_call_steps)

    def line(name, xs):
        return (f"{name:34s} p50 {percentile(xs, 50) * 1e3:8.3f} ms   p99 "
                f"{percentile(xs, 99) * 1e3:8.3f} ms   mean {statistics.mean(xs) * 1e3:8.3f} ms")
    print(f"{args.requests} running requests (prompts 1k-4k), {args.steps} decode steps, "
          f"{LAYERS} layers, block {BLOCK}")
    print(line("vLLM KVCacheManager.allocate_slots", vllm))
    print(line("cachemgrd Session.step", step))
    print(line(f"cachemgrd Session.allocate x{args.requests}", per_call))
    print(f"step / vLLM (p50): {percentile(step, 50) / percentile(vllm, 50):.2f}; "
          f"per-call / step (p50): {percentile(per_call, 50) / percentile(step, 50):.1f}")
    if args.cxx_bench:
        out = subprocess.run(
            [args.cxx_bench, f"--benchmark_filter=BM_DecodeStep/{args.requests}/",
             "--benchmark_min_time=1", "--benchmark_format=json"],
            capture_output=True, text=True, check=True).stdout
        bench = json.loads(out[out.index("{"):])["benchmarks"][0]
        p50, p99 = bench["step_p50_us"] / 1e3, bench["step_p99_us"] / 1e3
        print(f"{'cachemgrd Session::Step (C++)':34s} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms")
        print(f"C++ step / vLLM (p50): {p50 / (percentile(vllm, 50) * 1e3):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
