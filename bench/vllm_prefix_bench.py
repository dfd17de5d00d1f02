"""What the sidecar buys a real vLLM: shared-prefix reuse across engines, and the connector's own
cost when nothing is reused. Both sides run in one invocation, on the same machine, one engine
process at a time (docs/VLLM.md has the figures and the command).

    $(scripts/vllm-env.sh) bench/vllm_prefix_bench.py --model "$(scripts/vllm-model.sh)" \
        --cachemgrd build/cachemgr/cachemgrd

Workloads (SmolLM2-135M-Instruct, float32 so that runs compare within batching noise, vLLM's own
prefix cache off so every reuse is the sidecar's, or on to show the sidecar beside it):
  shared    one long document, `--questions` questions about it, served by two engines in turn
            (each its own process: the second starts after the first exited). Per engine: time
            to first token of each question alone (one after the other, max_tokens 1), then all
            questions at once (max_tokens 32) for throughput; the fraction of prompt tokens the
            sidecar served.
  distinct  4 x `--questions` prompts sharing nothing, all at once, three times with and three
            without the connector (alternated): its overhead when it only stores and never hits
            (the best time of each side compared), and the share of the batch's time the
            worker spent in the connector (its save and load hooks, daemon calls included).
  capacity  `--capacity-docs` distinct documents stored by one engine into a daemon of a fixed
            `--capacity-budget`, with the blocks kept as they are (fullkv: the pool takes the
            budget) and held as codebooks (prefix_codebook: a small pool, the codebooks in the
            rest); then a second engine asks every document again (max_tokens 16, logprobs).
            Per side: entries and documents the budget holds, bytes per entry, the fraction of
            prompt tokens served, and against a run without the sidecar the greedy agreement
            and the logprob drift of what it served (`--capacity-thetas`: one codebook side per
            pair of thresholds).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests" / "python"))

PARAGRAPH = (
    "The river town of Alder Bend kept its records in a long stone hall beside the water. Each "
    "spring the clerks copied the old ledgers onto fresh paper, because the damp rotted the "
    "pages, and each autumn they argued about which entries to keep. The miller's accounts "
    "went back two hundred years; the ferryman's were newer but far more detailed, listing "
    "every crossing, every passenger and every crate of apples that went over the water. ")
QUESTIONS = ["Who kept the oldest accounts?", "Why were the ledgers copied each spring?",
             "What did the ferryman record?", "Where was the stone hall?",
             "When did the clerks argue?", "What rotted the pages?",
             "What crossed the water in crates?", "How old were the miller's accounts?",
             "Who argued about the entries?", "What was the town called?",
             "What did the clerks copy?", "Which accounts were more detailed?"]


def engine_main(spec):
    """One engine in this process: runs spec["phases"] and prints a JSON report."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    engine = {"enable_prefix_caching": spec["vllm_prefix_cache"],
              "prefix_caching_hash_algo": "sha256_cbor"}
    if spec.get("socket"):
        engine["kv_transfer_config"] = {
            "kv_connector": "CacheManagerConnector",
            "kv_connector_module_path": "cachemgr.integrations.vllm", "kv_role": "kv_both",
            "kv_connector_extra_config": {"socket": spec["socket"],
                                          **spec.get("connector_config", {})}}
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
              disable_log_stats=False, **engine)
    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=tokenizer.encode(t)) for t in spec["texts"]]
    report = {"prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts)}
    first = SamplingParams(temperature=0.0, max_tokens=1)
    ttft = []
    for p in prompts if spec.get("ttft", True) else ():  # one at a time: time to first token
        start = time.perf_counter()
        llm.generate([p], first, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
    report["ttft_s"] = ttft
    batch = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 32),
                           ignore_eos=True, logprobs=0 if spec.get("logprobs") else None)
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), spec.get("batch", len(prompts))):
        outputs += llm.generate(prompts[i:i + spec.get("batch", len(prompts))], batch,
                                use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    report["batch_s"] = elapsed
    report["tokens_per_s"] = (report["prompt_tokens"] + generated) / elapsed
    report["outputs"] = [list(o.outputs[0].token_ids) for o in outputs]
    if spec.get("logprobs"):
        report["logprobs"] = [[entry[token].logprob for token, entry in
                               zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                              for o in outputs]
    if spec.get("socket"):
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        report["connector"] = dict(get_kv_transfer_group().stats)
    print("RESULT " + json.dumps(report), flush=True)


def run_engine(spec):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(HERE), "--engine", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"engine failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summary(name, engines):
    rows = []
    for i, e in enumerate(engines):
        served = e.get("connector", {}).get("prefix_hit_tokens", 0)
        # Each prompt is sent twice (alone for its TTFT, then in the batch).
        fraction = served / (2 * e["prompt_tokens"])
        rows.append({"run": name, "engine": i + 1,
                     "ttft_first_ms": round(1000 * e["ttft_s"][0], 1),
                     "ttft_rest_median_ms": round(1000 * statistics.median(e["ttft_s"][1:]), 1),
                     "tokens_per_s": round(e["tokens_per_s"], 1),
                     "sidecar_token_fraction": round(fraction, 3)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--cachemgrd")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--paragraphs", type=int, default=12, help="document length")
    parser.add_argument("--workloads", default="shared,distinct,capacity")
    parser.add_argument("--distinct-runs", type=int, default=3, help="per side")
    parser.add_argument("--capacity-docs", type=int, default=24)
    parser.add_argument("--capacity-budget", type=int, default=256, help="MiB")
    parser.add_argument("--capacity-thetas", default="0.98/0.95,0.9/0.9",
                        help="theta_k/theta_v of each codebook side")
    args = parser.parse_args()
    if args.engine:
        engine_main(json.loads(args.engine))
        return
    from conftest import Daemon  # the tests' daemon runner: a real cachemgrd on a temp socket
    os.environ["CACHEMGRD"] = str(pathlib.Path(args.cachemgrd).resolve())
    document = PARAGRAPH * args.paragraphs
    questions = (QUESTIONS * ((2 * args.questions) // len(QUESTIONS) + 1))[:2 * args.questions]
    halves = [questions[:args.questions], questions[args.questions:]]
    texts = [[f"{document}\nQuestion: {q}\nAnswer:" for q in half] for half in halves]
    workloads = args.workloads.split(",")
    rows, agreement, result = [], {}, {}
    for vllm_cache in (False, True) if "shared" in workloads else ():
        for with_sidecar in (False, True):
            daemon = Daemon() if with_sidecar else None
            try:
                engines = [run_engine({"model": args.model, "texts": t,
                                       "vllm_prefix_cache": vllm_cache,
                                       "socket": daemon.socket if daemon else None})
                           for t in texts]
            finally:
                if daemon:
                    daemon.stop()
            name = (f"shared, vLLM prefix cache {'on' if vllm_cache else 'off'}, "
                    f"{'with' if with_sidecar else 'without'} sidecar")
            rows += summary(name, engines)
            agreement[(vllm_cache, with_sidecar)] = [e["outputs"] for e in engines]
    if "shared" in workloads:
        same = sum(a == b for a, b in zip(sum(agreement[(False, False)], []),
                                          sum(agreement[(False, True)], [])))
        result.update(shared=rows, greedy_outputs_identical=f"{same}/{2 * args.questions}")
    if "distinct" in workloads:
        # No reuse: every prompt its own text (a rotation of the paragraph's words, so no two
        # share a first block), each sent once, all at once: the connector stores every full
        # block and never hits.
        words = PARAGRAPH.split()
        distinct = [" ".join(words[i:] + words[:i]) * (args.paragraphs // 2)
                    for i in range(4 * args.questions)]
        seconds, share = {}, []
        for with_sidecar in (False, True) * args.distinct_runs:  # alternated: drift hits both sides
            daemon = Daemon() if with_sidecar else None
            try:
                e = run_engine({"model": args.model, "texts": distinct, "ttft": False,
                                "vllm_prefix_cache": False,
                                "socket": daemon.socket if daemon else None})
            finally:
                if daemon:
                    daemon.stop()
            assert not with_sidecar or e["connector"]["prefix_hit_tokens"] == 0
            seconds.setdefault("with" if with_sidecar else "without", []).append(e["batch_s"])
            if with_sidecar:  # the worker's own time on vLLM's step, whatever the noise
                connector = e["connector"]
                share.append((connector["save_us"] + connector["load_us"]) / 1e6 / e["batch_s"])
        result.update(distinct_batch_seconds=seconds, distinct_overhead=round(
            min(seconds["with"]) / min(seconds["without"]) - 1, 4),
            distinct_connector_step_share=[round(x, 4) for x in share])
    if "capacity" in workloads:
        result["capacity"] = capacity(args)
    print(json.dumps(result, indent=1))


def capacity(args):
    """The capacity workload (see the module docstring)."""
    import cachemgr
    from conftest import Daemon
    words = PARAGRAPH.split()
    docs = [f"Record {i}. " + " ".join(words[3 * i:] + words[:3 * i]) * (args.paragraphs // 2)
            for i in range(args.capacity_docs)]
    # The second engine asks the most recently stored documents first: those the budget held
    # are served (a scan in storing order would find each evicted by the one before it).
    # One document at a time, so that a load never needs more fresh blocks than one document's.
    base = {"model": args.model, "texts": docs[::-1], "ttft": False, "vllm_prefix_cache": False,
            "max_tokens": 16, "logprobs": True, "batch": 1}
    reference = run_engine(base)
    budget = args.capacity_budget << 20
    rows = []
    sides = [("fullkv", None)] + [
        (f"codebook {t}", dict(zip(("theta_k", "theta_v"), map(float, t.split("/")))))
        for t in args.capacity_thetas.split(",")]
    for name, hold in sides:
        # fullkv: the pool takes the budget but what the other pools and bookkeeping need;
        # codebook: a pool for the scratch copies and one document's load, the codebooks in
        # the rest.
        pool = budget - (8 << 20) if hold is None else budget // 4
        daemon = Daemon([f"--memory_budget={budget}", f"--default_pool_bytes={pool}"])
        config = {"prefix_codebook": hold} if hold else {}
        try:
            start = time.perf_counter()
            run_engine(dict(base, texts=docs, socket=daemon.socket, connector_config=config,
                            max_tokens=1, logprobs=False, batch=4))
            store_s = time.perf_counter() - start
            pools = cachemgr.stats(daemon.socket).pools
            held = dict(entries=sum(p.prefix_entries for p in pools),
                        codebook_layers=sum(p.prefix_codebook_layers for p in pools),
                        codebook_bytes=sum(p.prefix_codebook_bytes for p in pools),
                        evictions=cachemgr.stats(daemon.socket).prefix["evictions"])
            second = run_engine(dict(base, socket=daemon.socket, connector_config=config))
        finally:
            daemon.stop()
        served = second["connector"].get("prefix_hit_tokens", 0)
        same = sum(a == b for a, b in zip(reference["outputs"], second["outputs"]))
        agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                 for a, b in zip(reference["outputs"], second["outputs"])]
        drift = [abs(x - y) for lr, ls, n in zip(reference["logprobs"], second["logprobs"], agree)
                 for x, y in zip(lr[:n], ls[:n])]
        rows.append({"hold": name, "budget_mib": args.capacity_budget,
                     "pool_mib": round(pool / 2**20, 1), "entries_held": held["entries"],
                     "codebook_layers": held["codebook_layers"],
                     "codebook_mib": round(held["codebook_bytes"] / 2**20, 2),
                     "evictions": held["evictions"],
                     "served_token_fraction": round(served / second["prompt_tokens"], 3),
                     "greedy_identical": f"{same}/{len(docs)}",
                     "tokens_agreeing": f"{sum(agree)}/{16 * len(docs)}",
                     "logprob_drift_mean": round(statistics.mean(drift), 5) if drift else None,
                     "logprob_drift_max": round(max(drift), 5) if drift else None,
                     "store_engine_s": round(store_s, 1)})
    return rows


if __name__ == "__main__":
    main()
