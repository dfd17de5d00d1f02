"""A replayed scheduler trace, in one run (docs/PERF.md "Step"): vLLM's in-process
KVCacheManager and cachemgrd (one Session.step per scheduler step, Python client, once through
the fast path and once through gRPC) do the KV bookkeeping of the same seeded trace, and each
step's bookkeeping is timed on every side.

The trace (seeded): about R concurrent requests (prompts uniform in 1k-4k tokens, D decode
tokens each), starting at steady state (R requests at staggered progress) with Poisson arrivals
of R / D per step (Little's law keeps the load near R), S steps. Every step, in this order:
finished requests are freed; with probability --preempt a running request (the newest, as vLLM
preempts) is preempted (freed, and readmitted by recomputation: all its tokens allocated again)
the next step; arrivals and readmissions are allocated their tokens; a share --fork of the
arrivals fork a second sample after their prefill (parallel sampling, n = 2: the child decodes
on its own); every other running request gets one new token. The sidecar applies a step as one
Step of free / allocate / fork ops (a fork shares the parent's blocks copy-on-write); vLLM
(caching off, as in step_vs_vllm.py) frees, calls allocate_slots for each admission and decode,
and allocates a forked sample as a new request with the parent's prompt (what its scheduler does
without prefix caching). Bookkeeping shape: Llama-3-8B's, 32 layers, block 16.

    $(scripts/vllm-env.sh) bench/scheduler_trace.py --cachemgrd build/cachemgr/cachemgrd \\
        [--requests 256] [--decode 256] [--steps 512] [--preempt 0.02] [--fork 0.1] \\
        [--cxx_replay build/bench/cachemgr_bench_trace_replay]

With --cxx_replay the same trace also goes through the C++ client (bench/trace_replay.cc, the
fast path, a daemon of its own), first, in the same invocation.
"""

import argparse
import gc
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time

from step_vs_vllm import BLOCK, LAYERS, daemon_socket, percentile, vllm_kv_manager


class Req:
    __slots__ = ("id", "prompt", "generated", "decode", "parent")

    def __init__(self, rid, prompt, decode, parent=None):
        self.id, self.prompt, self.generated, self.decode, self.parent = (
            rid, prompt, 0, decode, parent)


def poisson(rng, lam):
    # Knuth's method: fine for the small rates here.
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def make_trace(requests, decode, steps, preempt, fork, seed):
    """A list of steps; each a list of ("free", id) / ("alloc", id, tokens, is_new) /
    ("fork", parent, child) / ("decode", id), and the prompt length of every id."""
    rng = random.Random(seed)
    prompts = {}
    running = []  # admission order: the newest is preempted first
    waiting = []  # preempted, readmitted next step
    serial = 0

    def new_request(generated=0):
        nonlocal serial
        r = Req(f"r{serial}", rng.randint(1024, 4096), decode)
        r.generated = generated
        prompts[r.id] = r.prompt
        serial += 1
        return r

    trace = []
    # Steady state: R requests at staggered progress, admitted in the first step.
    first = [new_request(rng.randrange(decode)) for _ in range(requests)]
    for _ in range(steps):
        ops = []
        for r in [r for r in running if r.generated >= r.decode]:
            running.remove(r)
            ops.append(("free", r.id))
        if running and rng.random() < preempt:
            victim = running.pop()
            ops.append(("free", victim.id))
            victim_next = victim
        else:
            victim_next = None
        admit = first + waiting + [new_request() for _ in range(poisson(rng, requests / decode))]
        first, waiting = [], []
        admitted = set()
        for r in admit:
            ops.append(("alloc", r.id, r.prompt + r.generated, True))
            running.append(r)
            admitted.add(r.id)
            r.generated += 1  # the first sampled token
            if r.parent is None and r.generated == 1 and rng.random() < fork:
                child = Req(r.id + "s", r.prompt, decode, parent=r.id)
                child.generated = 1
                prompts[child.id] = r.prompt
                ops.append(("fork", r.id, child.id))
                running.append(child)
                admitted.add(child.id)
        for r in running:
            if r.id not in admitted:
                ops.append(("decode", r.id))
                r.generated += 1
        if victim_next is not None:
            waiting.append(victim_next)
        trace.append(ops)
    return trace, prompts


def vllm_replay(trace, prompts, decode):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    peak = max(sum(1 for op in step if op[0] in ("alloc", "decode", "fork")) for step in trace)
    manager = vllm_kv_manager((peak + 64) * ((4096 + decode) // BLOCK + 2), 16384)
    live = {}
    times = []
    for step in trace:
        start = time.perf_counter()
        computed = []
        for op in step:
            if op[0] == "free":
                manager.free(live.pop(op[1]))
            elif op[0] == "alloc":
                rid, tokens = op[1], op[2]
                r = Request(rid, list(range(tokens)), SamplingParams(max_tokens=decode + 1), None)
                assert manager.allocate_slots(r, tokens) is not None
                live[rid] = r
                computed.append((r, tokens))
            elif op[0] == "fork":  # a new request with the parent's prompt
                child = Request(op[2], list(range(prompts[op[2]])),
                                SamplingParams(max_tokens=decode + 1), None)
                assert manager.allocate_slots(child, prompts[op[2]]) is not None
                live[op[2]] = child
                computed.append((child, prompts[op[2]]))
            else:
                r = live[op[1]]
                assert manager.allocate_slots(r, 1) is not None
                computed.append((r, 1))
        times.append(time.perf_counter() - start)
        for r, n in computed:  # what the model and the scheduler do between steps
            r.num_computed_tokens += n
            r.append_output_token_ids(0)
    return times


def pool_blocks(trace, decode):
    peak = max(sum(1 for op in step if op[0] != "free") for step in trace)
    return (peak + 64) * ((4096 + decode) // BLOCK + 2)


def sidecar_replay(cachemgrd, trace, decode, fast_path=True):
    import cachemgr
    from cachemgr import StepOp

    with daemon_socket(cachemgrd, "--max_reply_bytes=67108864") as sock:
        model = cachemgr.ModelSpec(name="trace-bench", num_layers=LAYERS, num_q_heads=1,
                                   num_kv_heads=1, head_dim=8, dtype="fp16", block_size=BLOCK)
        s = cachemgr.Session.attach(sock, "trace-bench", model,
                                    num_blocks=pool_blocks(trace, decode), fast_path=fast_path)
        times = []
        for step in trace:
            ops = []
            for op in step:
                if op[0] == "free":
                    ops.append(StepOp.free(op[1]))
                elif op[0] == "alloc":
                    ops.append(StepOp.allocate(op[1], op[2]))
                elif op[0] == "fork":
                    ops.append(StepOp.fork(op[1], op[2]))
                else:
                    ops.append(StepOp.allocate(op[1], 1))
            start = time.perf_counter()
            results = s.step(ops)
            times.append(time.perf_counter() - start)
            bad = [r.error for r in results if not r.ok]
            assert not bad, bad[:3]
        assert (s.fast_path_calls >= len(trace)) == fast_path
        s.detach()
        return times


def cxx_replay(cachemgrd, replay, trace, decode):
    """The trace through the C++ client (bench/trace_replay.cc, fast path), its own daemon."""
    codes = {"free": "f", "alloc": "a", "fork": "k", "decode": "d"}
    with tempfile.NamedTemporaryFile("w", prefix="trace-", suffix=".txt") as f, \
            daemon_socket(cachemgrd, "--max_reply_bytes=67108864") as sock:
        for step in trace:
            f.write(";".join(" ".join([codes[op[0]], *(str(x) for x in op[1:3])])
                             for op in step) + "\n")
        f.flush()
        out = subprocess.run([replay, f"--socket={sock}", f"--trace={f.name}",
                              f"--num_blocks={pool_blocks(trace, decode)}",
                              f"--layers={LAYERS}", f"--block_size={BLOCK}"],
                             capture_output=True, text=True, check=True).stdout
    return [float(line) / 1e6 for line in out.split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cachemgrd", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--preempt", type=float, default=0.02)
    ap.add_argument("--fork", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cxx_replay", default="",
                    help="cachemgr_bench_trace_replay: the trace through the C++ client too")
    args = ap.parse_args()
    trace, prompts = make_trace(args.requests, args.decode, args.steps, args.preempt, args.fork,
                                args.seed)
    counts = {k: sum(1 for step in trace for op in step if op[0] == k)
              for k in ("alloc", "decode", "free", "fork")}
    running = [sum(1 for op in step if op[0] != "free") for step in trace]

    # The sidecar first (vLLM's replay leaves a large heap behind), each after a full collection.
    gc.collect()
    cxx = cxx_replay(args.cachemgrd, args.cxx_replay, trace, args.decode) \
        if args.cxx_replay else []
    step = sidecar_replay(args.cachemgrd, trace, args.decode, fast_path=True)
    gc.collect()
    step_grpc = sidecar_replay(args.cachemgrd, trace, args.decode, fast_path=False)
    gc.collect()
    vllm = vllm_replay(trace, prompts, args.decode)
    # The first step admits the whole warm start (R prefills): reported apart.
    vllm_first, step_first, grpc_first = vllm[0], step[0], step_grpc[0]
    vllm, step, step_grpc = vllm[1:], step[1:], step_grpc[1:]

    def line(name, xs):
        return (f"{name:36s} p50 {percentile(xs, 50) * 1e3:8.3f} ms   p99 "
                f"{percentile(xs, 99) * 1e3:8.3f} ms   mean {statistics.mean(xs) * 1e3:8.3f} ms")
    print(f"trace: {args.steps} steps, running per step p50 {percentile(running, 50)} "
          f"(min {min(running)}, max {max(running)}), ops {counts}, "
          f"prompts 1k-4k, {args.decode} decode tokens, {LAYERS} layers, block {BLOCK}")
    print(f"first step (warm start, {len(trace[0])} ops): vLLM {vllm_first * 1e3:.1f} ms, "
          f"cachemgrd {step_first * 1e3:.1f} ms (gRPC {grpc_first * 1e3:.1f} ms)")
    print(line("vLLM KVCacheManager (in-process)", vllm))
    print(line("cachemgrd Session.step (fast path)", step))
    print(line("cachemgrd Session.step (gRPC)", step_grpc))
    if cxx:
        print(line("cachemgrd Session::Step (C++, fast)", cxx[1:]))
    for name, xs in (("fast path", step), ("gRPC", step_grpc), ("C++", cxx[1:])):
        if not xs:
            continue
        print(f"step ({name}) / vLLM: p50 {percentile(xs, 50) / percentile(vllm, 50):.2f}, "
              f"mean {statistics.mean(xs) / statistics.mean(vllm):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
