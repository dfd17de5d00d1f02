"""Runs one real vLLM engine (offline LLM API, CPU) on a list of prompts and prints one JSON line
with what the tests compare: per prompt the generated token ids and their logprobs, the
connector's counters (scheduler and worker sides, in-process) and vLLM's own metrics named
vllm:cachemgr_*.

    python run_engine.py '<json spec>'

spec: model (directory), prompts (list of token id lists) and/or texts (tokenized with the
model's tokenizer), or rounds (lists of texts, one generate call each; round_stats reports the
worker's counters after each), max_tokens, fault (failures to inject, a name or a list, see
below), connector (the
kv_connector_extra_config, or null for a run without the connector), engine (extra LLM
arguments, e.g. num_gpu_blocks_override, max_num_seqs, enable_prefix_caching), kv_role
(kv_both by default), transfer_params (one kv_transfer_params dict per prompt: prefill/decode),
wait_before_generate (with fault_dir: creates <fault_dir>/<name>.ready once the engine is up,
then waits for <fault_dir>/<name>.go before generating), transfer_params_file (transfer_params
read from that file after the wait). The report has each output's
kv_transfer_params (what request_finished answered).
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the connector objects can
be read after the run.
"""

import json
import os
import pathlib
import sys
import time


def signal_and_wait(spec, signal: str, answer: str, timeout: float) -> None:
    """Creates <fault_dir>/<signal> and waits (at most `timeout` s) for <fault_dir>/<answer>."""
    fault_dir = pathlib.Path(spec["fault_dir"])
    (fault_dir / signal).touch()
    deadline = time.monotonic() + timeout
    while not (fault_dir / answer).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    spec = json.loads(sys.argv[1])
    faults = spec.get("fault") or []
    faults = [faults] if isinstance(faults, str) else faults
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if "lose_copy_before_load" in faults:
        # The sidecar loses a request's copy between its preemption and its resumption (an
        # operator free, an eviction): the connector's load finds nothing to load.
        from cachemgr.integrations.vllm import CacheManagerConnector
        load = CacheManagerConnector._load

        def lose_then_load(self, transfer):
            self.session.free(transfer.sequence_id)
            return load(self, transfer)
        CacheManagerConnector._load = lose_then_load
    if "restart_daemon_before_first_load" in faults:
        # The daemon dies just before the first load and comes back: the test kills and restarts
        # it when `<fault_dir>/kill` appears and answers with `<fault_dir>/restarted`.
        from cachemgr.integrations.vllm import CacheManagerConnector
        load = CacheManagerConnector._load

        def restart_then_load(self, transfer):
            if not (pathlib.Path(spec["fault_dir"]) / "kill").exists():
                self.stats_at_restart = dict(self.stats)
                signal_and_wait(spec, "kill", "restarted", 60)
            return load(self, transfer)
        CacheManagerConnector._load = restart_then_load

    if "corrupt_stored_block_before_load" in faults:
        # Stored KV changes behind the daemon's back (a stray write through a client's mapping):
        # before the first prefix load, the last block it will load is overwritten in layer 0.
        from cachemgr.integrations.vllm import CacheManagerConnector
        import numpy as np
        load_prefix = CacheManagerConnector._load_prefix

        def corrupt_then_load(self, transfer):
            if not getattr(self, "corrupted", False):
                self.corrupted = True
                s = self.session
                probe = s.load_prefix("vllm-test-corrupt", transfer.hashes)
                block = probe.sequence.layers[0].block_ids[-1]
                slots = np.arange(block * self.block_size, (block + 1) * self.block_size)
                shape = (self.block_size, s.model.num_kv_heads, s.model.head_dim)
                garbage = np.full(shape, 0x3f80, dtype=s.pool.dtype)  # 1.0 in bf16 bits
                s.pool.write(0, slots, garbage, garbage)
                s.free("vllm-test-corrupt")
            return load_prefix(self, transfer)
        CacheManagerConnector._load_prefix = corrupt_then_load

    engine = dict(spec.get("engine") or {})
    if spec.get("connector") is not None:
        engine["kv_transfer_config"] = {
            "kv_connector": "CacheManagerConnector",
            "kv_connector_module_path": "cachemgr.integrations.vllm",
            "kv_role": spec.get("kv_role", "kv_both"),
            "kv_connector_extra_config": spec["connector"],
        }
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "auto"), enforce_eager=True,
              seed=0, disable_log_stats=False, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                            logprobs=0, ignore_eos=True)
    if spec.get("wait_before_generate"):
        name = spec["wait_before_generate"]
        signal_and_wait(spec, f"{name}.ready", f"{name}.go", 600)
    if spec.get("transfer_params_file"):  # written while this engine waited
        spec["transfer_params"] = json.loads(pathlib.Path(spec["transfer_params_file"]).read_text())
    tokenizer = llm.get_tokenizer()
    # Rounds of prompts, one generate call each (later rounds can reuse what earlier ones
    # stored); "prompts" and "texts" make one round.
    rounds = [[tokenizer.encode(text) for text in texts] for texts in spec.get("rounds") or []]
    if not rounds:
        rounds = [list(spec.get("prompts") or []) +
                  [tokenizer.encode(text) for text in spec.get("texts") or []]]
    results, prompts, round_stats = [], [], []
    for number, round_prompts in enumerate(rounds):
        if number == 1 and "restart_daemon_after_first_round" in faults:
            signal_and_wait(spec, "kill", "restarted", 60)
            time.sleep(3)  # the sessions' heartbeats notice the restart
        if number == 1 and "pause_after_first_round" in faults:
            signal_and_wait(spec, "paused", "resume", 400)
        round_params = params
        if spec.get("transfer_params"):  # prefill/decode: per prompt
            round_params = [params.clone() for _ in round_prompts]
            for p, transfer in zip(round_params, spec["transfer_params"], strict=True):
                p.extra_args = {"kv_transfer_params": dict(transfer)}
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in round_prompts],
                               round_params, use_tqdm=False)
        for out in outputs:
            completion = out.outputs[0]
            logprobs = [entry[token].logprob for token, entry in
                        zip(completion.token_ids, completion.logprobs)]
            results.append({"tokens": list(completion.token_ids), "logprobs": logprobs,
                            "kv_transfer_params": out.kv_transfer_params})
        prompts += round_prompts
        if spec.get("connector") is not None:
            from vllm.distributed.kv_transfer import get_kv_transfer_group
            round_stats.append(dict(get_kv_transfer_group().stats))
    report = {"outputs": results, "prompt_lengths": [len(p) for p in prompts],
              "round_stats": round_stats}
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
