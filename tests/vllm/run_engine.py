"""Runs one real vLLM engine (offline LLM API, CPU) on a list of prompts and prints one JSON line
with what the tests compare: per prompt the generated token ids and their logprobs, the
connector's counters (scheduler and worker sides, in-process) and vLLM's own metrics named
vllm:cachemgr_*.

    python run_engine.py '<json spec>'

spec: model (directory), prompts (list of token id lists) and/or texts (tokenized with the
model's tokenizer), max_tokens, fault (a failure to inject, see below), connector (the
kv_connector_extra_config, or null for a run without the connector), engine (extra LLM
arguments, e.g. num_gpu_blocks_override, max_num_seqs, enable_prefix_caching).
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the connector objects can
be read after the run.
"""

import json
import os
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if spec.get("fault") == "lose_copy_before_load":
        # The sidecar loses a request's copy between its preemption and its resumption (an
        # operator free, an eviction): the connector's load finds nothing to load.
        from cachemgr.integrations.vllm import CacheManagerConnector
        load = CacheManagerConnector._load

        def lose_then_load(self, transfer):
            self.session.free(transfer.sequence_id)
            return load(self, transfer)
        CacheManagerConnector._load = lose_then_load
    elif spec.get("fault") == "restart_daemon_before_first_load":
        # The daemon dies just before the first load and comes back: the test kills and restarts
        # it when `<fault_dir>/kill` appears and answers with `<fault_dir>/restarted`.
        import pathlib
        import time
        from cachemgr.integrations.vllm import CacheManagerConnector
        load = CacheManagerConnector._load
        fault_dir = pathlib.Path(spec["fault_dir"])

        def restart_then_load(self, transfer):
            if not (fault_dir / "kill").exists():
                self.stats_at_restart = dict(self.stats)
                (fault_dir / "kill").touch()
                deadline = time.monotonic() + 60
                while not (fault_dir / "restarted").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            return load(self, transfer)
        CacheManagerConnector._load = restart_then_load

    engine = dict(spec.get("engine") or {})
    if spec.get("connector") is not None:
        engine["kv_transfer_config"] = {
            "kv_connector": "CacheManagerConnector",
            "kv_connector_module_path": "cachemgr.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": spec["connector"],
        }
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "auto"), enforce_eager=True,
              seed=0, disable_log_stats=False, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                            logprobs=0, ignore_eos=True)
    prompts = list(spec.get("prompts") or [])
    tokenizer = llm.get_tokenizer()
    prompts += [tokenizer.encode(text) for text in spec.get("texts") or []]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                           use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = [entry[token].logprob for token, entry in
                    zip(completion.token_ids, completion.logprobs)]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    report = {"outputs": results, "prompt_lengths": [len(p) for p in prompts]}
    vllm_metrics = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:num_preemptions", "vllm:prompt_tokens"):
            vllm_metrics[metric.name] = getattr(metric, "value", 0)
    report["vllm_metrics"] = vllm_metrics
    if spec.get("connector") is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        worker = get_kv_transfer_group()
        report["worker_stats"] = dict(worker.stats)
        report["worker_stats_at_restart"] = getattr(worker, "stats_at_restart", None)
        report["layout"] = worker._layout.name if worker._layout is not None else None
        report["kernel_block_size"] = worker._kernel_block_size
        metrics = {}
        for metric in llm.get_metrics():
            if metric.name.startswith("vllm:cachemgr_"):
                metrics[metric.name] = metrics.get(metric.name, 0) + getattr(metric, "value", 0)
        report["metrics"] = metrics
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
