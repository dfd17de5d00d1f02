"""The connector inside a real vLLM (the pinned CPU build, scripts/vllm-env.sh) serving the real
SmolLM2-135M (scripts/vllm-model.sh) against the real cachemgrd ($CACHEMGRD). Each engine runs in
its own process (run_engine.py) and reports its outputs, the connector's counters and vLLM's own
metrics.

Needs CACHEMGRD and CACHEMGR_VLLM_MODEL; run with the vLLM environment's python.
"""

import inspect
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

import cachemgr

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from conftest import Daemon  # noqa: E402  (the Python tests' daemon fixture)

RUN_ENGINE = pathlib.Path(__file__).with_name("run_engine.py")
MODEL = os.environ.get("CACHEMGR_VLLM_MODEL", "")

# Three prompts of about 100-120 tokens: each fits one of vLLM's 128-token CPU blocks and needs a
# second one while it decodes MAX_TOKENS tokens.
STORY = (
    "Once upon a time, in a small village at the edge of a great forest, there lived a girl "
    "named Lily who loved to collect stones. Every morning she walked along the river and "
    "picked up the smoothest, shiniest stones she could find. She kept them in a wooden box "
    "under her bed, and at night she would take them out one by one and tell each of them a "
    "story about where it had come from. One day her grandmother gave her a small blue stone "
    "that glowed softly in the dark. Lily had never seen anything like it. ")
TEXTS = [
    STORY + "The next morning Lily decided that she would climb the mountain",
    STORY + "Her little brother Tom wanted to see the stone too, so",
    "The cat sat on the warm windowsill and watched the birds in the garden. " * 6,
]
MAX_TOKENS = 60


def run_engine(spec, expect_failure=False, timeout=600):
    spec = dict(spec)
    spec.setdefault("model", MODEL)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(RUN_ENGINE), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_failure:
        assert proc.returncode != 0, "vLLM started, and was expected not to"
        return proc.stdout + proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, \
        f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(results[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def reference():
    """Outputs without the connector, with a cache large enough that nothing is preempted."""
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS,
                         "engine": {"enable_prefix_caching": False}})
    assert report["vllm_metrics"].get("vllm:num_preemptions", 0) == 0
    return report


# vLLM's CPU kernels are not batch-invariant: the same request decodes with other rounding when
# it shares a step with other requests (measured: max_num_seqs 1 vs 3 changes a greedy token
# within 4 steps in bfloat16, and logprobs by up to 1.6e-5 in float32). A preempted request is
# necessarily batched differently from an unpreempted one, so runs with preemption are compared
# in float32, with that tolerance.
BATCHING_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_fp32():
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
                         "engine": {"enable_prefix_caching": False}})
    assert report["vllm_metrics"].get("vllm:num_preemptions", 0) == 0
    return report


def assert_same_decoding(report, reference, tolerance):
    for ours, ref in zip(report["outputs"], reference["outputs"], strict=True):
        assert ours["tokens"] == ref["tokens"]
        drift = max(abs(a - b) for a, b in zip(ours["logprobs"], ref["logprobs"]))
        assert drift <= tolerance, f"logprob drift {drift}"


def restart_daemon_on_request(daemon, fault_dir):
    """A thread that SIGKILLs and restarts `daemon` when run_engine.py asks (<fault_dir>/kill)
    and answers when it is back (<fault_dir>/restarted)."""
    def kill_and_restart():
        deadline = time.monotonic() + 300
        while not (fault_dir / "kill").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.kill()
        daemon.restart()
        (fault_dir / "restarted").touch()
    killer = threading.Thread(target=kill_and_restart, daemon=True)
    killer.start()
    return killer


def connector_config(daemon, **extra):
    """The per-request path (the prefix store off): prompts saved per request id, served back to
    that request after a preemption."""
    return {"socket": daemon.socket, "policy": "fullkv", "prefix_store": False, **extra}


def prefix_config(daemon, **extra):
    return {"socket": daemon.socket, "prefix_store": True, **extra}


def test_connector_conforms_to_the_installed_base_class():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from cachemgr.integrations.vllm import CacheManagerConnector
    assert issubclass(CacheManagerConnector, KVConnectorBase_V1)
    abstract = set(KVConnectorBase_V1.__abstractmethods__)
    assert not (set(getattr(CacheManagerConnector, "__abstractmethods__", ())) & abstract)
    overridden = [name for name, member in vars(CacheManagerConnector).items()
                  if callable(member) or isinstance(member, (classmethod, property))]
    checked = 0
    for name in overridden:
        base_member = inspect.getattr_static(KVConnectorBase_V1, name, None)
        if base_member is None or name.startswith("__") and name != "__init__":
            continue
        ours = inspect.getattr_static(CacheManagerConnector, name)
        assert type(ours) is type(base_member), f"{name}: {type(ours)} vs {type(base_member)}"
        if isinstance(ours, property):
            continue
        ours_fn = ours.__func__ if isinstance(ours, classmethod) else ours
        base_fn = base_member.__func__ if isinstance(base_member, classmethod) else base_member
        base_params = list(inspect.signature(base_fn).parameters.values())
        our_params = list(inspect.signature(ours_fn).parameters.values())
        # Every parameter of the base, in order, by name and kind; ours may add keyword ones
        # with defaults after them.
        for base_p, our_p in zip(base_params, our_params):
            assert (base_p.name, base_p.kind) == (our_p.name, our_p.kind), \
                f"{name}: parameter {our_p} where the base has {base_p}"
        assert len(our_params) >= len(base_params), f"{name}: parameters missing"
        for extra in our_params[len(base_params):]:
            assert extra.default is not inspect.Parameter.empty, f"{name}: {extra} required"
        checked += 1
    assert checked >= 15  # the abstract methods and the optional ones the connector uses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["head_halves_k_transposed", "split_last_dim"])
def test_whole_block_copies_into_the_pool_equal_the_row_path(daemon, dtype, layout):
    """The worker's save path for whole blocks of a torch cache (one strided copy per block,
    straight into the pool) writes the bits the gather-then-write path writes, also when
    vLLM's kernel blocks are smaller than its blocks; partial blocks take the row path."""
    import numpy as np
    import torch
    from cachemgr.integrations import vllm as connector_module

    block, kernel_block, heads, dim, layers = 16, 8, 2, 8, 2
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    from types import SimpleNamespace
    # The installed base class needs a kv_transfer_config; no forward context: the layout is
    # the one named.
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_load_failure_policy="recompute"),
        compilation_config=SimpleNamespace(static_forward_context={}))
    worker = connector_module.CacheManagerConnector(
        vllm_config, role=connector_module.KVConnectorRole.WORKER,
        config=dict(socket=daemon.socket, num_layers=layers, num_q_heads=4, num_kv_heads=heads,
                    head_dim=dim, block_size=block, dtype=dtype, num_blocks=32, layout=layout,
                    model_name=f"copy-{dtype}-{layout}", prefix_store=True))
    generator = torch.Generator().manual_seed(7)
    caches = {f"model.layers.{i}.self_attn.attn":
              torch.randn((12, heads, kernel_block, 2 * dim), generator=generator).to(torch_dtype)
              for i in range(layers)}
    worker.register_kv_caches(caches)
    s = worker._usable_session()
    assert s is not None
    vllm_blocks = [5, 2, 4]  # kernel blocks 10-11, 4-5, 8-9
    copied_id, rows_id, partial_id = (f"{name}-{dtype}-{layout}"
                                      for name in ("copied", "rows", "partial"))
    t = connector_module._Transfer(copied_id, vllm_blocks, block, 2 * block)  # vLLM blocks 1-2
    copied = s.allocate(copied_id, 2 * block)
    rows = s.allocate(rows_id, 2 * block)
    partial = connector_module._Transfer(partial_id, vllm_blocks, 3, 2 * block - 5)
    partial_alloc = s.allocate(partial_id, 2 * block - 5)
    for layer in range(layers):
        slots = copied.layers[layer].slot_mapping
        assert worker._copy_blocks_to_pool(s.pool, layer, t, slots)
        k, v = worker._vllm_rows(layer, t)
        s.pool.write(layer, rows.layers[layer].slot_mapping, k, v)
        assert not worker._copy_blocks_to_pool(
            s.pool, layer, partial, partial_alloc.layers[layer].slot_mapping)
        worker._write_to_pool(s.pool, layer, partial, partial_alloc.layers[layer].slot_mapping)
    digests = {name: [l.kv_digest for l in s.get_sequence(name, include_kv_digest=True).layers]
               for name in (copied_id, rows_id)}
    assert digests[copied_id] == digests[rows_id]
    info = s.get_sequence(partial_id)
    for layer in range(layers):  # the partial rows are the tokens 3.. of the request
        k, v = worker._vllm_rows(layer, partial)
        rk, rv = s.pool.read(layer, info.layers[layer].block_ids, 2 * block - 5)
        np.testing.assert_array_equal(rk, k)
        np.testing.assert_array_equal(rv, v)
    k_view, _ = worker._layout.views(caches["model.layers.1.self_attn.attn"], dim)
    row = k_view[4, 1, 3].clone()  # the first block copied: vLLM block 2 = kernel blocks 4-5
    rk, _ = s.pool.read(1, s.get_sequence(copied_id).layers[1].block_ids, 2 * block)
    if torch_dtype == torch.bfloat16:
        row = row.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(rk[3, 1], np.asarray(row))
    worker.shutdown()


def test_greedy_outputs_are_identical_with_the_connector(daemon, reference):
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS,
                         "connector": connector_config(daemon),
                         "engine": {"enable_prefix_caching": False}})
    assert [o["tokens"] for o in report["outputs"]] == \
        [o["tokens"] for o in reference["outputs"]]
    assert report["layout"] == "head_halves_k_transposed"
    stats = report["worker_stats"]
    assert stats["saved_tokens"] == sum(report["prompt_lengths"])
    assert stats["sidecar_errors"] == 0 and stats["load_errors"] == 0
    # The counters reached vLLM's own metrics.
    assert report["metrics"]["vllm:cachemgr_saved_tokens"] == stats["saved_tokens"]
    assert report["metrics"]["vllm:cachemgr_compressions"] == len(TEXTS)


# A KV cache of five 128-token blocks for three requests of two blocks each: vLLM preempts.
PREEMPTING = {"enable_prefix_caching": False, "num_gpu_blocks_override": 5,
              "max_model_len": 512, "max_num_seqs": 3}


def test_preempted_requests_resume_from_the_sidecar(daemon, reference_fp32):
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
                         "connector": connector_config(daemon), "engine": PREEMPTING})
    assert report["vllm_metrics"]["vllm:num_preemptions"] > 0
    assert report["worker_stats"]["loaded_tokens"] > 0
    assert report["worker_stats"]["load_errors"] == 0
    assert_same_decoding(report, reference_fp32, BATCHING_TOLERANCE)


def test_a_lost_sidecar_copy_is_a_load_error_and_is_recomputed(daemon, reference_fp32):
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
                         "connector": connector_config(daemon), "engine": PREEMPTING,
                         "fault": "lose_copy_before_load"})
    assert report["vllm_metrics"]["vllm:num_preemptions"] > 0
    stats = report["worker_stats"]
    assert stats["load_errors"] > 0 and stats["loaded_tokens"] == 0
    # vLLM recomputed the blocks the connector reported; no request failed.
    assert all(len(o["tokens"]) == MAX_TOKENS for o in report["outputs"])
    assert_same_decoding(report, reference_fp32, BATCHING_TOLERANCE)


def test_a_daemon_killed_mid_run_costs_recompute_and_is_used_again(reference_fp32, tmp_path):
    daemon = Daemon()
    try:
        killer = restart_daemon_on_request(daemon, tmp_path)
        report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
                             "connector": connector_config(daemon, reconnect_interval=0.2),
                             "engine": PREEMPTING, "fault": "restart_daemon_before_first_load",
                             "fault_dir": str(tmp_path)})
        killer.join(timeout=5)
        assert (tmp_path / "restarted").exists()
    finally:
        daemon.stop()
    before, after = report["worker_stats_at_restart"], report["worker_stats"]
    assert all(len(o["tokens"]) == MAX_TOKENS for o in report["outputs"])
    assert_same_decoding(report, reference_fp32, BATCHING_TOLERANCE)
    assert after["load_errors"] > before["load_errors"]  # the copy died with the daemon
    # Whether the recomputed prompt is saved into the restarted daemon depends on the worker
    # having re-attached by the next step (seen both ways), so it is not asserted here.


def test_an_unverified_layout_stops_vllm_at_start(daemon):
    output = run_engine({"texts": TEXTS[:1], "max_tokens": 4,
                         "connector": connector_config(daemon, layout="split_last_dim")},
                        expect_failure=True)
    assert "KV layout 'split_last_dim' does not match what CPUAttentionBackendImpl wrote" in output


def test_vllm_serves_while_the_daemon_is_down(reference_fp32, tmp_path):
    socket = str(tmp_path / "absent.sock")
    report = run_engine({"texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
                         "connector": {"socket": socket, "policy": "fullkv",
                                       "prefix_store": False},
                         "engine": PREEMPTING})
    assert report["vllm_metrics"]["vllm:num_preemptions"] > 0
    assert_same_decoding(report, reference_fp32, BATCHING_TOLERANCE)  # recomputed
    assert report["worker_stats"]["saved_tokens"] == 0
    assert report["worker_stats"]["loaded_tokens"] == 0
    assert report["worker_stats"]["skipped_saves"] > 0


# ---- the prefix store: reuse across requests, engines and restarts ---------------------------

# Three prompts sharing a document of about 2.5 of vLLM's 128-token blocks: a later prompt can
# load the document's two full blocks from the sidecar. vLLM's own prefix cache is off, so every
# hit is the sidecar's; sha256_cbor block hashes are reproducible in every process.
DOCUMENT = STORY * 3
PREFIX_PROMPTS = [DOCUMENT + "Question: what did Lily keep under her bed? Answer:",
                  DOCUMENT + "Question: who gave Lily the blue stone? Answer:",
                  DOCUMENT + "Question: where did Lily walk every morning? Answer:"]
PREFIX_ENGINE = {"enable_prefix_caching": False, "prefix_caching_hash_algo": "sha256_cbor"}
PREFIX_MAX_TOKENS = 24
SHARED_BLOCKS = 2  # full 128-token blocks of DOCUMENT (checked by the reference)


def prefix_run(prompts_per_round, connector=None, **spec):
    return run_engine({"rounds": prompts_per_round, "max_tokens": PREFIX_MAX_TOKENS,
                       "dtype": "float32", "engine": PREFIX_ENGINE, "connector": connector,
                       **spec})


@pytest.fixture(scope="module")
def prefix_reference():
    """Each prompt alone (one per round), without the connector."""
    report = prefix_run([[p] for p in PREFIX_PROMPTS])
    assert all(n >= (SHARED_BLOCKS + 0.5) * 128 for n in report["prompt_lengths"])
    return report


def assert_outputs_match(report, reference, indices):
    sub = {"outputs": [reference["outputs"][i] for i in indices]}
    assert_same_decoding(report, sub, BATCHING_TOLERANCE)


def test_a_second_engine_loads_the_first_ones_prefixes_while_it_runs_and_after(
        prefix_reference, tmp_path):
    daemon = Daemon()
    try:
        first = {}

        def run_first():
            first["report"] = prefix_run([[PREFIX_PROMPTS[0]], [PREFIX_PROMPTS[1]]],
                                         prefix_config(daemon), fault="pause_after_first_round",
                                         fault_dir=str(tmp_path))
        thread = threading.Thread(target=run_first, daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "paused").exists(), "the first engine never finished its first round"
        # The first engine is attached and idle; a second one shares its prefix.
        while_running = prefix_run([[PREFIX_PROMPTS[1]]], prefix_config(daemon))
        (tmp_path / "resume").touch()
        thread.join(timeout=300)
        after_exit = prefix_run([[PREFIX_PROMPTS[2]]], prefix_config(daemon))
        stats = cachemgr.stats(daemon.socket)
    finally:
        daemon.stop()
    shared_tokens = SHARED_BLOCKS * 128
    first_report = first["report"]
    assert first_report["round_stats"][0]["prefix_hit_tokens"] == 0  # nothing stored yet
    assert first_report["round_stats"][0]["prefix_stored_blocks"] >= SHARED_BLOCKS
    assert first_report["worker_stats"]["prefix_hit_tokens"] == shared_tokens  # its 2nd round
    assert while_running["worker_stats"]["prefix_hit_tokens"] == shared_tokens
    assert after_exit["worker_stats"]["prefix_hit_tokens"] == shared_tokens
    for report in (first_report, while_running, after_exit):
        assert report["worker_stats"]["load_errors"] == 0
        assert report["metrics"]["vllm:cachemgr_prefix_hit_tokens"] == \
            report["worker_stats"]["prefix_hit_tokens"]
    assert_outputs_match(first_report, prefix_reference, [0, 1])
    assert_outputs_match(while_running, prefix_reference, [1])
    assert_outputs_match(after_exit, prefix_reference, [2])
    # Every engine has exited; the daemon still holds the stored prefixes.
    assert stats.prefix["hits"] >= 3 * SHARED_BLOCKS


def test_hits_resume_after_a_daemon_restart_and_a_corrupt_block_is_recomputed(
        prefix_reference, tmp_path):
    daemon = Daemon()
    try:
        killer = restart_daemon_on_request(daemon, tmp_path)
        # Round 1 stores the document; the daemon is killed and restarted; round 2 misses, is
        # recomputed and stores it again; before round 3's load the last document block is
        # overwritten through the pool mapping.
        report = prefix_run([[p] for p in PREFIX_PROMPTS],
                            prefix_config(daemon, reconnect_interval=0.2),
                            fault=["restart_daemon_after_first_round",
                                   "corrupt_stored_block_before_load"],
                            fault_dir=str(tmp_path))
        killer.join(timeout=5)
        stats = cachemgr.stats(daemon.socket)
    finally:
        daemon.stop()
    rounds = report["round_stats"]
    assert rounds[1]["prefix_hit_tokens"] == 0  # the store died with the daemon
    assert rounds[1]["prefix_stored_blocks"] > rounds[0]["prefix_stored_blocks"]
    assert rounds[1]["load_errors"] == 0
    # Round 3 loads from the restarted daemon up to the corrupt block, which the daemon's digest
    # check drops; the connector reports it as a load error and vLLM recomputes from there.
    assert rounds[2]["prefix_hit_tokens"] == (SHARED_BLOCKS - 1) * 128
    assert rounds[2]["prefix_corrupt_blocks"] == 1
    assert rounds[2]["load_errors"] == 1
    assert stats.prefix["corrupt"] == 1
    assert_outputs_match(report, prefix_reference, [0, 1, 2])


def test_prefill_on_one_daemon_decode_on_another(reference_fp32, tmp_path):
    """Disaggregated prefill and decode (kv_role) with two real vLLM engines, each with its own
    daemon: the kv_producer engine prefills each prompt (max_tokens 1) and its connector moves
    the prompt's KV into the kv_consumer engine's session on the other daemon (TransferSequence
    between the two, peers over TCP); the consumer loads it and decodes. The decoded tokens are
    the single-engine run's (float32, compared as the preemption runs are)."""
    from test_peers import free_port, peer_in_state, token_file, wait_for  # tests/python
    token = token_file(tmp_path, "cluster-token", "pd-cluster-token-0123456789")
    port_a, port_b = free_port(), free_port()
    common = ["--tcp_plaintext_loopback", f"--tcp_token_file={token}",
              "--peer_probe_interval_ms=200"]
    b = Daemon([f"--tcp_address=127.0.0.1:{port_b}", f"--peers=127.0.0.1:{port_a}",
                "--node_name=node-b", *common])
    a = Daemon([f"--tcp_address=127.0.0.1:{port_a}", f"--peers=127.0.0.1:{port_b}",
                "--node_name=node-a", *common])
    decode = None
    try:
        wait_for("A to see B", peer_in_state(a, f"127.0.0.1:{port_b}", "PEER_STATE_UP"))
        session_file = tmp_path / "decode-session"
        params_file = tmp_path / "transfer-params.json"
        decode_spec = {
            "model": MODEL, "texts": TEXTS, "max_tokens": MAX_TOKENS, "dtype": "float32",
            "engine": {"enable_prefix_caching": False}, "kv_role": "kv_consumer",
            "connector": connector_config(b, session_token_file=str(session_file)),
            "wait_before_generate": "decode", "fault_dir": str(tmp_path),
            "transfer_params_file": str(params_file)}
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
        decode = subprocess.Popen([sys.executable, str(RUN_ENGINE), json.dumps(decode_spec)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        wait_for("the decode engine to start", lambda: (tmp_path / "decode.ready").exists() or
                 decode.poll() is not None, timeout=600)
        assert decode.poll() is None, decode.communicate()[1][-6000:]
        destination = session_file.read_text()

        prefill = run_engine({
            "texts": TEXTS, "max_tokens": 1, "dtype": "float32",
            "engine": {"enable_prefix_caching": False}, "kv_role": "kv_producer",
            "connector": connector_config(a),
            "transfer_params": [{"do_remote_decode": True, "cachemgr_peer": "node-b",
                                 "cachemgr_session_token": destination,
                                 "cachemgr_sequence": f"pd-{i}"} for i in range(len(TEXTS))]})
        stats = prefill["worker_stats"]
        assert (stats["remote_sends"], stats["remote_send_failures"]) == (len(TEXTS), 0)
        assert stats["remote_send_bytes"] > 0
        returned = [out["kv_transfer_params"] for out in prefill["outputs"]]
        # vLLM adds remote_prefill_cached_tokens (the prefill's own cache hits) for the proxy.
        assert [{k: v for k, v in r.items() if k != "remote_prefill_cached_tokens"}
                for r in returned] == [{"do_remote_prefill": True, "cachemgr_sequence": f"pd-{i}",
                                        "remote_num_tokens": n}
                                       for i, n in enumerate(prefill["prompt_lengths"])]
        for ours, ref in zip(prefill["outputs"], reference_fp32["outputs"], strict=True):
            assert ours["tokens"] == ref["tokens"][:1]
        # The prompts wait on B, in the decode engine's session, before it generates.
        used = sum(l.used_blocks for p in cachemgr.stats(b.socket).pools for l in p.layers)
        assert used > 0

        params_file.write_text(json.dumps(returned))  # what a proxy passes on
        (tmp_path / "decode.go").touch()
        out, err = decode.communicate(timeout=600)
        results = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert decode.returncode == 0 and results, f"decode engine failed:\n{err[-6000:]}"
        report = json.loads(results[-1][len("RESULT "):])
        worker = report["worker_stats"]
        assert worker["remote_loaded_tokens"] == sum(n - 1 for n in prefill["prompt_lengths"])
        assert worker["load_errors"] == 0
        assert_same_decoding(report, reference_fp32, BATCHING_TOLERANCE)
    finally:
        if decode is not None and decode.poll() is None:
            decode.kill()
            decode.wait()
        a.stop()
        b.stop()
