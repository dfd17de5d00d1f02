"""The fast path (docs/PERF.md "The fast path") from the Python client: the same answers as
gRPC, calls that fail promptly when the daemon goes away and work again after a restart, and
threads that share one session."""

import threading
import time

import grpc
import pytest

import cachemgr
from cachemgr import StepOp


def model(name):
    return cachemgr.ModelSpec(name=name, num_layers=2, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype="fp16", block_size=4)


def outcome(call):
    try:
        r = call()
    except cachemgr.CacheManagerError as e:
        return ("error", e.code, e.message)
    if isinstance(r, cachemgr.Allocation):
        return (r.sequence_id, r.created, r.first_position, r.num_positions,
                [(l.layer, l.new_block_ids, l.slot_mapping.tolist(),
                  [(c.src_block, c.dst_block) for c in l.copies]) for l in r.layers])
    if isinstance(r, cachemgr.SequenceInfo):
        return (r.sequence_id, [(l.num_tokens, l.block_ids) for l in r.layers])
    if isinstance(r, list):
        return [(x.error.code if x.error else None, x.error.message if x.error else "",
                 x.created, x.first_position, x.num_positions, x.blocks_released,
                 [(l.layer, l.new_block_ids) for l in x.layers]) for x in r]
    return r


def script(s):
    return [
        lambda: s.allocate("a", 9),
        lambda: s.allocate("a", 1),
        lambda: s.fork("a", "b"),
        lambda: s.allocate("b", 5),
        lambda: s.step([StepOp.allocate("a", 3), StepOp.free("nope"), StepOp.fork("b", "c"),
                        StepOp.allocate("c", 2)]),
        lambda: s.step([StepOp.allocate("c", 1)], include_slot_mapping=True),
        lambda: s.allocate("", 1),
        lambda: s.allocate("a", 0),
        lambda: s.allocate("big", 10_000),
        lambda: s.fork("a", "b"),
        lambda: s.fork("ghost", "x"),
        lambda: s.free("ghost"),
        lambda: s.step([]),
        lambda: s.free("a"),
        lambda: s.free("b"),
        lambda: s.free("c"),
    ]


def test_the_fast_path_answers_as_grpc_does(daemon_factory):
    a, b = daemon_factory(), daemon_factory()
    with cachemgr.Session.attach(a.socket, "fast", model("m"), num_blocks=32) as fast, \
            cachemgr.Session.attach(b.socket, "grpc", model("m"), num_blocks=32,
                                    fast_path=False) as slow:
        calls = script(fast)
        for by_fast, by_grpc in zip(calls, script(slow)):
            assert outcome(by_fast) == outcome(by_grpc)
        assert fast.fast_path_calls == len(calls)
        assert slow.fast_path_calls == 0
        assert fast.heartbeat() > 0
        st = cachemgr.stats(a.socket)
        assert all(l.used_blocks == 0 for p in st.pools for l in p.layers)


def test_fast_path_calls_fail_promptly_without_a_daemon_and_work_after_a_restart(daemon):
    s = cachemgr.Session.attach(daemon.socket, "restarts", model("m"), num_blocks=16)
    try:
        s.allocate("x", 3)
        assert s.fast_path_calls == 1
        daemon.kill()
        started = time.monotonic()
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.allocate("x", 1)
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
        assert time.monotonic() - started < 10
        daemon.restart()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and s.status is None:
            time.sleep(0.05)  # the heartbeat thread notices the restart
        assert s.status is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                s.reattach()
                break
            except cachemgr.CacheManagerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        before = s.fast_path_calls
        assert s.allocate("y", 2).num_positions == 2
        assert s.fast_path_calls == before + 1  # a new connection to the new daemon
    finally:
        s.detach()


def test_threads_share_a_session_through_the_fast_path_and_grpc(daemon):
    with cachemgr.Session.attach(daemon.socket, "threads", model("m"), num_blocks=256) as s:
        errors = []

        def work(t):
            try:
                for i in range(50):
                    assert s.allocate(f"t{t}-{i}", 1 + i % 4).num_positions == 1 + i % 4
                    assert s.free(f"t{t}-{i}") >= 0
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.fast_path_calls > 0
        st = cachemgr.stats(daemon.socket)
        assert st.num_sequences == 0
        assert all(l.used_blocks == 0 for p in st.pools for l in p.layers)


def test_a_request_over_the_fast_path_limit_goes_through_grpc(daemon_factory):
    """A Step of 4,096 frees of 256-character ids is valid (about 1.1 MB) but over the fast
    path's 1 MiB frame limit: the client sends it through gRPC, which answers it (the reply
    bound of 4,096 ops needs more than the default --max_reply_bytes)."""
    daemon = daemon_factory("--max_reply_bytes=67108864")
    with cachemgr.Session.attach(daemon.socket, "big", model("m"), num_blocks=16) as s:
        s.allocate("x" * 255 + "9", 1)
        before = s.fast_path_calls
        ops = [StepOp.free("x" * 255 + f"{i % 10}") for i in range(4096)]
        results = s.step(ops)
        assert len(results) == 4096
        assert s.fast_path_calls == before  # not sent on the fast path
        assert results[0].error is not None and results[0].error.code == grpc.StatusCode.NOT_FOUND
        assert results[9].error is None and results[9].blocks_released > 0  # the allocated id, freed once
        assert all(r.error is not None for i, r in enumerate(results) if i != 9)
