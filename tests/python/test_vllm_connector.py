"""cachemgr.integrations.vllm driven by a scripted vLLM-like scheduler and worker against the
real cachemgrd: many requests with chunked prefill, decode, preemption when vLLM's own blocks
run out, resumption from the sidecar's copy, and finish; vLLM itself is not needed (nor
imported).

The "model" writes, for every token, K/V that depend on (layer, token id, position) only, so a
KV row loaded back from the sidecar can be checked against what the model would have written.
"""

import dataclasses
import importlib
import sys
import time
import types

import numpy as np
import pytest

import cachemgr
from cachemgr.integrations import vllm as connector_module
from cachemgr.integrations import vllm_layout as connector_layouts

LAYERS, Q_HEADS, KV_HEADS, DIM, BLOCK = 3, 4, 2, 16, 4


def model_kv(layer, token, position):
    """Deterministic K/V rows [KV_HEADS, DIM] of one token."""
    rng = np.random.default_rng(1000 * layer + token)
    base = rng.standard_normal((2, KV_HEADS, DIM)).astype(np.float32)
    # Position enters smoothly so the codebook can merge tokens of one id.
    k = base[0] * (1.0 + 0.001 * position)
    v = base[1]
    return k.astype(np.float16), v.astype(np.float16)


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list
    max_new: int
    output: list = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    blocks: list = dataclasses.field(default_factory=list)
    kv_transfer_params: dict = None   # vLLM's, from SamplingParams.extra_args
    returned_params: dict = None      # what request_finished returned (for the proxy)

    @property
    def num_tokens(self):
        return len(self.prompt_token_ids) + len(self.output)

    def token(self, i):
        return self.prompt_token_ids[i] if i < len(self.prompt_token_ids) else \
            self.output[i - len(self.prompt_token_ids)]


class Blocks:  # vLLM's KVCacheBlocks
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (list(self.ids),)


@dataclasses.dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list
    block_ids: tuple
    num_computed_tokens: int


@dataclasses.dataclass
class CachedRequestData:
    req_ids: list
    resumed_req_ids: set
    new_block_ids: list
    num_computed_tokens: list


@dataclasses.dataclass
class SchedulerOutput:
    scheduled_new_reqs: list
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict
    finished_req_ids: set
    preempted_req_ids: set


class MiniVllm:
    """A scheduler with a fixed block pool, a token budget per step, chunked prefill and
    preemption of the newest running request when blocks run out; and a worker whose "forward"
    writes model_kv for every scheduled token into the paged cache."""

    def __init__(self, scheduler, worker, num_blocks=14, budget=12):
        self.scheduler, self.worker = scheduler, worker
        # vLLM 0.32's per-layer shape; K and V split along the last dimension (the
        # split_last_dim layout, which `make` names in the connector's config).
        self.cache = {f"model.layers.{l}.self_attn.attn":
                      np.zeros((num_blocks, KV_HEADS, BLOCK, 2 * DIM), np.float16)
                      for l in range(LAYERS)}
        worker.register_kv_caches(self.cache)
        self.free = list(range(num_blocks))
        self.budget = budget
        self.waiting, self.running, self.preempted, self.done = [], [], [], []
        self.seen = set()
        self.loaded_checks = 0
        self.failed_loads = 0
        self.preemptions = 0
        self.finished_now = set()

    def add(self, r):
        self.waiting.append(r)

    def _need(self, r, tokens):
        return -(-tokens // BLOCK) - len(r.blocks)

    def _allocate(self, r, tokens):
        need = self._need(r, tokens)
        if need > len(self.free):
            return None
        new = [self.free.pop(0) for _ in range(max(0, need))]
        r.blocks += new
        return new

    def step(self):
        new_reqs, cached_ids, cached_new, cached_computed, resumed = [], [], [], [], set()
        scheduled, preempted_now = {}, set()
        budget = self.budget
        # Running requests first: a decode token each (or the rest of a chunked prefill).
        index = 0
        while index < len(self.running):
            r = self.running[index]
            index += 1
            tokens = min(budget, r.num_tokens - r.num_computed_tokens) if \
                r.num_computed_tokens < len(r.prompt_token_ids) else 1
            if tokens <= 0:
                continue
            new = self._allocate(r, r.num_computed_tokens + tokens)
            # Out of blocks: preempt the newest request not yet scheduled this step.
            while new is None and len(self.running) > index:
                victim = self.running.pop()
                self.free += victim.blocks
                victim.blocks, victim.num_computed_tokens = [], 0
                self.preempted.append(victim)
                preempted_now.add(victim.request_id)
                self.preemptions += 1
                new = self._allocate(r, r.num_computed_tokens + tokens)
            if new is None:
                continue
            cached_ids.append(r.request_id)
            cached_new.append((new,))
            cached_computed.append(r.num_computed_tokens)
            scheduled[r.request_id] = tokens
            budget -= tokens
        # Then resumed requests (their KV may come back from the sidecar), then new ones.
        for queue, is_new in ((self.preempted, False), (self.waiting, True)):
            while queue and budget > 0:
                r = queue[0]
                matched, _ = self.scheduler.get_num_new_matched_tokens(r, 0)
                total = r.num_tokens if not is_new else len(r.prompt_token_ids)
                tokens = min(budget, total - matched)
                if self._allocate(r, matched + tokens) is None:
                    break
                queue.pop(0)
                self.scheduler.update_state_after_alloc(r, Blocks(r.blocks), matched)
                r.num_computed_tokens = matched
                if is_new:
                    new_reqs.append(NewRequestData(r.request_id, list(r.prompt_token_ids),
                                                   (list(r.blocks),), matched))
                else:
                    cached_ids.append(r.request_id)
                    cached_new.append((list(r.blocks),))
                    cached_computed.append(matched)
                    resumed.add(r.request_id)
                self.running.append(r)
                scheduled[r.request_id] = tokens
                budget -= tokens
        out = SchedulerOutput(new_reqs, CachedRequestData(cached_ids, resumed, cached_new,
                                                          cached_computed),
                              scheduled, set(self.finished_now), preempted_now)
        self.finished_now = set()
        meta = self.scheduler.build_connector_meta(out)
        self.run_worker(meta, out)
        # Advance: computed tokens, sampled tokens, finishes.
        for r in list(self.running):
            n = scheduled.get(r.request_id, 0)
            if n == 0:
                continue
            r.num_computed_tokens += n
            if r.num_computed_tokens >= r.num_tokens:
                r.output.append((sum(r.prompt_token_ids) + len(r.output) * 7) % 50)
            if len(r.output) >= r.max_new:
                self.running.remove(r)
                _, r.returned_params = self.scheduler.request_finished(r, r.blocks)
                self.free += r.blocks
                r.blocks = []
                self.done.append(r)
                self.finished_now.add(r.request_id)

    def run_worker(self, meta, out):
        w = self.worker
        w.bind_connector_metadata(meta)
        w.handle_preemptions(meta)
        w.start_load_kv(None)
        # Loads the sidecar could not serve: vLLM recomputes their tokens (here, in this step's
        # forward) and the scheduler hears of the blocks.
        errors = w.get_block_ids_with_load_errors()
        recompute = {}  # request id -> tokens to recompute

        def request_of(t):
            return t.request_id or t.sequence_id[len("vllm-"):]
        for t in meta.loads:
            if errors.intersection(t.block_ids):
                recompute[request_of(t)] = (t.first_token, t.first_token + t.num_tokens)
        self.failed_loads += len(recompute)
        self.scheduler.update_connector_output(types.SimpleNamespace(invalid_block_ids=errors))
        # Check every loaded row against the model (codebook rows within its thresholds).
        for t in meta.loads:
            if request_of(t) in recompute:
                continue
            r = next(x for x in self.running if x.request_id == request_of(t))
            for layer, name in enumerate(self.cache):
                kv = self.cache[name]
                for i in range(t.first_token, t.first_token + t.num_tokens):
                    b, o = r.blocks[i // BLOCK], i % BLOCK
                    want_k, want_v = model_kv(layer, r.token(i), i)
                    for got, want, theta in ((kv[b, :, o, :DIM], want_k, 0.98),
                                             (kv[b, :, o, DIM:], want_v, 0.95)):
                        g, w_ = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
                        cos = g @ w_ / (np.linalg.norm(g) * np.linalg.norm(w_))
                        assert cos > theta - 2e-3, (r.request_id, layer, i, cos)
                        self.loaded_checks += 1
        # "Forward": KV of the scheduled (and recomputed) tokens into vLLM's blocks.
        for rid, n in out.num_scheduled_tokens.items():
            r = next(x for x in self.running if x.request_id == rid)
            first, _ = recompute.get(rid, (r.num_computed_tokens, 0))
            for i in range(first, r.num_computed_tokens + n):
                b, o = r.blocks[i // BLOCK], i % BLOCK
                for layer, name in enumerate(self.cache):
                    k, v = model_kv(layer, r.token(i), i)
                    self.cache[name][b, :, o, :DIM] = k
                    self.cache[name][b, :, o, DIM:] = v
        for name, kv in self.cache.items():
            w.save_kv_layer(name, kv, None)
        w.wait_for_save()
        w.clear_connector_metadata()
        w.get_finished(out.finished_req_ids)


def make(daemon, policy="codebook", **extra):
    config = dict(socket=daemon.socket, policy=policy, num_layers=LAYERS, num_q_heads=Q_HEADS,
                  num_kv_heads=KV_HEADS, head_dim=DIM, block_size=BLOCK, dtype="fp16",
                  model_name=f"mini-{policy}", num_blocks=256, layout="split_last_dim", **extra)
    scheduler = connector_module.CacheManagerConnector(
        role=connector_module.KVConnectorRole.SCHEDULER, config=config)
    worker = connector_module.CacheManagerConnector(
        role=connector_module.KVConnectorRole.WORKER, config=config)
    return scheduler, worker


def run(daemon, policy, **extra):
    scheduler, worker = make(daemon, policy, **extra)
    vllm = MiniVllm(scheduler, worker)
    rng = np.random.default_rng(5)
    for i in range(10):
        vllm.add(Request(f"r{i}", [int(x) for x in rng.integers(3, 50, rng.integers(10, 22))],
                         max_new=int(rng.integers(4, 10))))
    for _ in range(400):
        if len(vllm.done) == 10:
            break
        vllm.step()
    vllm.step()  # delivers the last finished_req_ids to the worker
    return scheduler, worker, vllm


def test_adapter_module_loads_without_vllm():
    assert "vllm" not in sys.modules
    importlib.reload(connector_module)
    assert not connector_module.HAVE_VLLM


@pytest.mark.parametrize("background", [True, False])
def test_lifecycle_with_preemption_and_reload(daemon, background):
    scheduler, worker, vllm = run(daemon, "codebook", background_compress=background)
    assert len(vllm.done) == 10
    assert not worker._compressing  # every background compression applied or freed
    assert all(len(r.output) == r.max_new for r in vllm.done)
    assert vllm.preemptions > 0  # the block pool was small on purpose
    assert worker.stats["compressions"] == 10  # every prompt, once, after its prefill
    assert worker.stats["parks"] > 0
    assert worker.stats["loaded_tokens"] > 0  # resumed requests came back from the sidecar
    assert vllm.loaded_checks > 0
    assert worker.stats["bytes_after"] < worker.stats["bytes_before"]
    assert worker.session.fast_path_calls > 0  # its steps went through the fast path
    # Finished requests are gone from the sidecar; the pool's books balance.
    assert worker.session.list_sequences() == []
    pool = cachemgr.stats(daemon.socket).pools[0]
    assert all(l.used_blocks == 0 and l.free_blocks == l.capacity_blocks for l in pool.layers)
    worker.shutdown()
    assert cachemgr.stats(daemon.socket).clients == []


def test_evicting_policy_saves_but_never_reloads(daemon):
    scheduler, worker, vllm = run(daemon, "streamingllm", reserve_ratio=0.5, window=4)
    assert len(vllm.done) == 10
    assert vllm.preemptions > 0
    assert worker.stats["compressions"] == 10
    assert worker.stats["loaded_tokens"] == 0  # rows < tokens: vLLM recomputes instead
    assert worker.session.list_sequences() == []
    worker.shutdown()


def test_sidecar_outage_is_a_cache_miss_and_recovers(daemon_factory):
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=2000")
    scheduler, worker = make(d, "codebook", reconnect_interval=0.05)
    vllm = MiniVllm(scheduler, worker)
    rng = np.random.default_rng(11)

    def add(first, count):
        for i in range(first, first + count):
            vllm.add(Request(f"r{i}", [int(x) for x in rng.integers(3, 50, rng.integers(10, 22))],
                             max_new=int(rng.integers(4, 10))))

    add(0, 10)
    for _ in range(12):
        vllm.step()
    saved, compressions = worker.stats["saved_tokens"], worker.stats["compressions"]
    assert saved > 0

    d.kill()
    time.sleep(0.1)  # past reconnect_interval: the scheduler's probe sees the socket refuse
    # A request whose prompt the sidecar held is a miss now.
    held = [r for r in vllm.running + vllm.preempted if scheduler._loadable.get(r.request_id)]
    for r in held:
        assert scheduler.get_num_new_matched_tokens(r, 0) == (0, False)
    # vLLM keeps serving: nothing raises, nothing is saved or compressed, loads are misses.
    add(10, 4)
    for _ in range(25):
        vllm.step()
    assert worker.stats["saved_tokens"] == saved
    assert worker.stats["compressions"] == compressions
    assert worker.stats["sidecar_errors"] + worker.stats["skipped_saves"] > 0

    d.restart()
    add(14, 8)
    # vLLM steps on while the worker notices the restart and re-attaches (within seconds).
    deadline = time.monotonic() + 60
    while worker.stats["reattaches"] == 0 and time.monotonic() < deadline:
        vllm.step()
        time.sleep(0.01)
    assert worker.stats["reattaches"] == 1
    add(22, 6)
    for _ in range(600):
        if len(vllm.done) == 28:
            break
        vllm.step()
    vllm.step()  # delivers the last finished_req_ids to the worker
    assert len(vllm.done) == 28
    assert all(len(r.output) == r.max_new for r in vllm.done)
    # It re-attached by itself and works again: saves, compressions, and loads checked against
    # the model (inside MiniVllm); copies of the lost session were recomputed instead.
    assert worker.session.generation == 2 and worker.stats["reattaches"] == 1
    assert worker.stats["saved_tokens"] > saved
    assert worker.stats["compressions"] > compressions
    assert worker.session.list_sequences() == []
    pool = cachemgr.stats(d.socket).pools[0]
    assert all(l.used_blocks == 0 and l.free_blocks == l.capacity_blocks for l in pool.layers)
    worker.shutdown()
    assert cachemgr.stats(d.socket).clients == []


def test_worker_starts_while_the_daemon_is_down(daemon_factory):
    d = daemon_factory()
    d.kill()
    scheduler, worker = make(d, "codebook", reconnect_interval=0.05)
    assert worker.session is None  # no exception: vLLM starts, the sidecar comes later
    vllm = MiniVllm(scheduler, worker)
    vllm.add(Request("a", list(range(3, 15)), max_new=4))
    for _ in range(5):
        vllm.step()
    assert worker.stats["saved_tokens"] == 0 and worker.stats["skipped_saves"] > 0
    d.restart()
    # The next request that needs the sidecar attaches it.
    for i in range(50):
        vllm.add(Request(f"b{i}", list(range(5, 20)), max_new=2))
        for _ in range(10):
            vllm.step()
        if worker.session is not None:
            break
        time.sleep(0.05)
    for _ in range(40):
        vllm.step()
    assert len(vllm.done) == 2 + i
    assert worker.session is not None and worker.stats["saved_tokens"] > 0
    worker.shutdown()


def test_config_errors(daemon):
    with pytest.raises(ValueError, match="socket"):
        connector_module.CacheManagerConnector(role=connector_module.KVConnectorRole.WORKER,
                                               config=dict(num_layers=1))
    _, worker = make(daemon)
    with pytest.raises(ValueError, match="layer"):
        worker.register_kv_caches({"lm_head": np.zeros((1, KV_HEADS, BLOCK, 2 * DIM))})
    worker.shutdown()


@pytest.mark.parametrize("value, message", [
    ({"theta_k": 1.5}, "prefix_codebook.theta_k must be in"),
    ({"theta_v": -0.1}, "prefix_codebook.theta_v must be in"),
    ({"theta": 0.9}, "unknown keys"),
    ("yes", "must be true, false or"),
])
def test_prefix_codebook_config_errors(daemon, value, message):
    with pytest.raises(ValueError, match=message):
        connector_module.CacheManagerConnector(
            role=connector_module.KVConnectorRole.SCHEDULER,
            config=dict(socket=daemon.socket, prefix_codebook=value))


def test_prefix_codebook_config_values(daemon):
    def parsed(value):
        return connector_module.CacheManagerConnector(
            role=connector_module.KVConnectorRole.SCHEDULER,
            config=dict(socket=daemon.socket, prefix_codebook=value)).prefix_codebook
    assert parsed(False) is None
    assert parsed(True) == cachemgr.PrefixCodebook()
    assert parsed({"theta_k": 0.9}) == cachemgr.PrefixCodebook(0.9, 0.0)


@pytest.mark.parametrize("name", sorted(connector_layouts.LAYOUTS))
def test_whole_block_gathers_match_row_gathers(name):
    layout = connector_layouts.LAYOUTS[name]
    rng = np.random.default_rng(5)
    kv = rng.standard_normal((6, KV_HEADS, BLOCK, 2 * DIM)).astype(np.float32)
    ids = np.array([4, 1, 3])
    slots = (ids[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
    k_rows, v_rows = layout.gather(kv, DIM, slots // BLOCK, slots % BLOCK)
    k_blocks, v_blocks = layout.gather_blocks(kv, DIM, ids)
    np.testing.assert_array_equal(np.asarray(k_blocks), np.asarray(k_rows))
    np.testing.assert_array_equal(np.asarray(v_blocks), np.asarray(v_rows))


# ---- prefill on one daemon, decode on another (kv_role) --------------------------------------

from test_transfer import pair  # noqa: E402,F401  (two daemons, peers of each other)


def run_until_done(vllm, count):
    for _ in range(400):
        if len(vllm.done) == count:
            break
        vllm.step()
    vllm.step()  # delivers the last finished_req_ids to the worker


@pytest.mark.parametrize("policy", ["fullkv", "codebook"])
def test_prefill_instance_moves_prompts_to_the_decode_instance(pair, tmp_path, policy):
    """A kv_producer engine on daemon A prefills (max_tokens 1) requests the proxy marked
    do_remote_decode; its worker saves each prompt, compresses it with the policy and moves it
    into the decode worker's session on daemon B (whose token the consumer published).
    request_finished answers the kv_transfer_params the proxy passes on; the kv_consumer engine
    loads every prompt token but the last from the moved copy (each row checked against the
    model), computes the rest itself, and both daemons end empty. One request's move fails (a
    stale token): its decode recomputes the prompt. A one-token prompt has nothing to load (vLLM
    computes the last token itself): its moved copy is freed unloaded."""
    a, b, _, _ = pair
    token_path = tmp_path / "decode-session"
    p_sched, p_worker = make(a, policy, kv_role="kv_producer")
    d_sched, d_worker = make(b, policy, kv_role="kv_consumer",
                             session_token_file=str(token_path))
    token = token_path.read_text()
    assert token == d_worker.session.session_token
    assert oct(token_path.stat().st_mode & 0o777) == "0o600"
    rng = np.random.default_rng(3)
    # Few distinct token ids: rows repeat, so a codebook pays.
    prompts = [[int(x) for x in rng.integers(3, 8, rng.integers(10, 22))] for _ in range(6)]
    prompts.append([5])  # pd-6: one token
    stale = a.socket  # not a session token of B's
    prefill = MiniVllm(p_sched, p_worker)
    for i, prompt in enumerate(prompts):
        prefill.add(Request(f"p{i}", prompt, max_new=1, kv_transfer_params={
            "do_remote_decode": True, "cachemgr_peer": "node-b",
            "cachemgr_session_token": stale if i == 5 else token,
            "cachemgr_sequence": f"pd-{i}"}))
    run_until_done(prefill, 7)
    sent = [i for i in range(7) if i != 5]
    assert p_worker.stats["remote_sends"] == 6
    assert p_worker.stats["remote_send_failures"] == 1
    plain = sum(len(prompts[i]) for i in sent) * LAYERS * 2 * KV_HEADS * DIM * 2  # fp16
    if policy == "fullkv":
        assert p_worker.stats["remote_send_bytes"] == plain
    else:  # moved as held: codebooks, fewer bytes
        assert 0 < p_worker.stats["remote_send_bytes"] < plain
    # Moved, not copied; the failed one was freed when its request finished.
    assert p_worker.session.list_sequences() == []
    held = {q.sequence_id: q.num_positions for q in d_worker.session.list_sequences()}
    assert held == {f"pd-{i}": len(prompts[i]) for i in sent}
    for i, r in enumerate(sorted(prefill.done, key=lambda r: r.request_id)):
        assert r.returned_params == {"do_remote_prefill": True, "cachemgr_sequence": f"pd-{i}",
                                     "remote_num_tokens": len(prompts[i])}

    decode = MiniVllm(d_sched, d_worker)
    for r in sorted(prefill.done, key=lambda r: r.request_id):
        decode.add(Request("d" + r.request_id[1:], list(r.prompt_token_ids), max_new=5,
                           kv_transfer_params=dict(r.returned_params)))
    run_until_done(decode, 7)
    assert all(len(r.output) == 5 for r in decode.done)
    assert decode.failed_loads == 1  # pd-5 never came: recomputed
    loaded = sum(len(p) - 1 for p in prompts[:5])
    assert d_worker.stats["remote_loaded_tokens"] == loaded
    assert decode.loaded_checks == LAYERS * 2 * loaded
    assert d_worker.session.list_sequences() == []  # each moved-in copy freed once loaded
    for d in (a, b):
        for pool in cachemgr.stats(d.socket).pools:
            assert all(l.used_blocks == 0 for l in pool.layers)
    for c in (p_sched, p_worker, d_sched, d_worker):
        c.shutdown()


def test_kv_role_is_checked(daemon):
    with pytest.raises(ValueError, match="kv_role"):
        make(daemon, "fullkv", kv_role="kv_sideways")
