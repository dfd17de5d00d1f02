"""Session.step against the real daemon (docs/PERF.md "Step"): a scheduler step's allocations,
frees, forks and prefix lookups in one call give what the per-call RPCs give in the same order (two pools of the
same shape on two daemons, one driven each way), per-op errors carry the per-call code and message, the step
itself is refused only for its shape, and a client killed in the middle of a stream of steps
leaves nothing behind once its lease runs out."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

import cachemgr
from cachemgr import StepOp
from cachemgr.v1 import cachemgr_pb2 as pb
from cachemgr.v1 import cachemgr_pb2_grpc as pb_grpc


def model(name):
    return cachemgr.ModelSpec(name=name, num_layers=3, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype="fp16", block_size=4)


def per_call(session, op):
    """The op through Allocate / Free / Fork, as (error code, message, payload)."""
    try:
        if op.kind == "allocate":
            a = session.allocate(op.sequence_id, op.num_new_tokens)
            return (None, "", [(l.layer, l.new_block_ids, [(c.src_block, c.dst_block)
                                                              for c in l.copies])
                               for l in a.layers if l.new_block_ids or l.copies],
                    a.created, a.first_position, a.num_positions)
        if op.kind == "free":
            return (None, "", session.free(op.sequence_id))
        session.fork(op.sequence_id, op.child_sequence_id)
        return (None, "", None)
    except cachemgr.CacheManagerError as e:
        return (e.code, e.message)


def stepped(op, r):
    if r.error is not None:
        return (r.error.code, r.error.message)
    if op.kind == "allocate":
        return (None, "", [(l.layer, l.new_block_ids, [(c.src_block, c.dst_block)
                                                         for c in l.copies]) for l in r.layers],
                r.created, r.first_position, r.num_positions)
    if op.kind == "free":
        return (None, "", r.blocks_released)
    return (None, "", None)


def tables(session):
    return {s.sequence_id: [(l.num_tokens, l.block_ids) for l in
                            session.get_sequence(s.sequence_id).layers]
            for s in session.list_sequences()}


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_step_gives_what_the_per_call_rpcs_give(daemon_factory, fast_path):
    # Two daemons (sequence ids are daemon-wide), pools of the same shape. The per-call side
    # goes through gRPC; the stepper through the fast path or gRPC.
    a, b = daemon_factory(), daemon_factory()
    with cachemgr.Session.attach(a.socket, "stepper", model("a"), num_blocks=40,
                                 fast_path=fast_path) as s, \
            cachemgr.Session.attach(b.socket, "caller", model("a"), num_blocks=40,
                                    fast_path=False) as c:
        steps = [
            [StepOp.allocate("r1", 10), StepOp.allocate("r2", 7), StepOp.fork("r1", "beam"),
             StepOp.allocate("r3", 0), StepOp.allocate("r1", 1), StepOp.free("nobody"),
             StepOp.fork("r2", "r1")],
            [StepOp.allocate("beam", 1), StepOp.allocate("r2", 1), StepOp.free("r2"),
             StepOp.allocate("r4", 500), StepOp.allocate("r4", 20), StepOp.fork("ghost", "g"),
             StepOp.allocate("r1", 3), StepOp.allocate("bad id", 1)],
        ]
        for ops in steps:
            results = s.step(ops)
            assert len(results) == len(ops)
            for op, r in zip(ops, results):
                assert stepped(op, r) == per_call(c, op), op
            assert tables(s) == tables(c)
        # With slot mappings: every layer, the slots the tables imply.
        r = s.step([StepOp.allocate("r1", 2)], include_slot_mapping=True)[0]
        assert r.ok and len(r.layers) == 3
        info = s.get_sequence("r1")
        for l in r.layers:
            blocks = info.layers[l.layer].block_ids
            first = l.num_tokens - 2
            assert l.slot_mapping.tolist() == [blocks[t // 4] * 4 + t % 4
                                               for t in range(first, first + 2)]
        assert (s.fast_path_calls > 0) == fast_path and c.fast_path_calls == 0


def test_layers_that_grew_alike_travel_once_and_differing_ones_each(daemon_factory):
    """On a fresh pool every layer gets the same blocks: the reply says it once (all_layers)
    and `layers` expands it. After a pyramid Compress the layers hold different token counts,
    so an append gives them different blocks: listed per layer, as the per-call Allocate."""
    a, b = daemon_factory(), daemon_factory()
    with cachemgr.Session.attach(a.socket, "stepper", model("a"), num_blocks=64) as s, \
            cachemgr.Session.attach(b.socket, "caller", model("a"), num_blocks=64) as c:
        r = s.step([StepOp.allocate("x", 9)])[0]
        assert r.ok and r.all_layers is not None
        assert r.all_layers.new_block_ids and len(r.layers) == 3
        assert [l.layer for l in r.layers] == [0, 1, 2]
        assert all(l.new_block_ids == r.all_layers.new_block_ids for l in r.layers)
        c.allocate("x", 9)
        scores = np.ones((3, 4, 9), dtype=np.float32)
        for sess in (s, c):
            sess.compress("x", cachemgr.Policy("pyramidkv", window=2), reserve_ratio=0.4,
                          scores=scores)
        kept = [l.num_tokens for l in s.get_sequence("x").layers]
        assert len(set(kept)) > 1, kept  # the pyramid left the layers different
        differing = 0
        for n in (1, 3, 4, 8):
            r = s.step([StepOp.allocate("x", n)])[0]
            assert stepped(StepOp.allocate("x", n), r) == per_call(c, StepOp.allocate("x", n))
            if len({(tuple(l.new_block_ids), l.num_tokens) for l in r.layers}) > 1:
                assert r.all_layers is None
                differing += 1
        assert differing > 0
        assert tables(s) == tables(c)


def test_prefix_lookups_in_a_step_answer_as_match_prefix_does(daemon):
    """A scheduler's lookups for its waiting requests ride in its step, over the fast path:
    each answers what the MatchPrefix RPC answers (hits, misses, the errors naming the field);
    Session.match_prefix is such a step."""
    hashes = [b"h0", b"h1", b"h2"]
    stub = pb_grpc.CacheManagerStub(grpc.insecure_channel(f"unix:{daemon.socket}"))
    with cachemgr.Session.attach(daemon.socket, "stepper", model("a"), num_blocks=16) as s:
        s.allocate("doc", 12)
        assert s.store_prefix("doc", hashes).stored == 3

        def rpc(block_hashes):
            try:
                return (None, "", stub.MatchPrefix(pb.MatchPrefixRequest(
                    session_token=s.session_token, block_hashes=block_hashes)).matched_blocks)
            except grpc.RpcError as e:
                return (e.code(), e.details())

        lookups = [hashes, [b"h0", b"other", b"h2"], [b"nope"], [], [b"h0", b"x" * 65],
                   hashes + [b"h3"]]
        ops = [StepOp.match_prefix(h) for h in lookups]
        ops.insert(2, StepOp.allocate("admitted", 5))
        ops.insert(5, StepOp.free("doc"))
        before = s.fast_path_calls
        results = s.step(ops)
        assert s.fast_path_calls == before + 1
        got = [(r.error.code, r.error.message) if r.error else (None, "", r.matched_blocks)
               for op, r in zip(ops, results) if op.kind == "match_prefix"]
        assert got == [rpc(h) for h in lookups]
        assert [g[-1] for g in got if g[0] is None] == [3, 1, 0, 3]
        assert "block_hashes[1]" in got[4][1]
        assert results[2].ok and results[2].created and results[5].ok
        # Session.match_prefix: the same answers, through the fast path.
        assert s.match_prefix(hashes) == 3
        assert s.fast_path_calls == before + 2
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.match_prefix([])
        assert (e.value.code, e.value.message) == rpc([])


def test_step_errors_name_the_op_and_change_nothing(daemon):
    with cachemgr.Session.attach(daemon.socket, "stepper", model("a"), num_blocks=16) as s:
        s.allocate("kept", 5)
        before = tables(s)
        r = s.step([StepOp.allocate("x", 0), StepOp.free("nope"), StepOp.fork("kept", "kept")])
        assert [x.error.code for x in r] == [grpc.StatusCode.INVALID_ARGUMENT,
                                             grpc.StatusCode.NOT_FOUND,
                                             grpc.StatusCode.ALREADY_EXISTS]
        assert "num_new_tokens" in r[0].error.message
        assert "sequence_id" in r[1].error.message
        assert "child_sequence_id" in r[2].error.message
        assert tables(s) == before
        # Too many ops: the whole step is refused.
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.step([StepOp.allocate("many", 1)] * 4097)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "ops holds 4097 ops" in e.value.message
        assert tables(s) == before
        # An op with nothing set, sent raw.
        stub = pb_grpc.CacheManagerStub(grpc.insecure_channel(f"unix:{daemon.socket}"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(pb.StepRequest(session_token=s.session_token,
                                     ops=[pb.StepOp(free="kept"), pb.StepOp()]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ops[1]" in e.value.details()
        assert tables(s) == before  # the free before it did not run either
        # Another tenant's token does not reach this session's sequences.
        with cachemgr.Session.attach(daemon.socket, "other", model("a"), num_blocks=16) as o:
            r = o.step([StepOp.free("kept"), StepOp.allocate("kept", 1)])
            assert all(x.error is not None for x in r)
        assert tables(s) == before
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(pb.StepRequest(session_token="forged.token", ops=[pb.StepOp(free="kept")]),
                      timeout=10)
        assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.PERMISSION_DENIED)
        assert tables(s) == before


CLIENT = textwrap.dedent("""
    import sys, cachemgr
    from cachemgr import StepOp
    s = cachemgr.Session.attach(sys.argv[1], "doomed", cachemgr.ModelSpec(
        name="k", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8, dtype="fp16",
        block_size=4), num_blocks=4096, fast_path=sys.argv[2] == "fast")
    i = 0
    while True:
        ops = [StepOp.allocate(f"r{i}-{j}", 1 + j) for j in range(64)]
        ops += [StepOp.free(f"r{i - 1}-{j}") for j in range(0, 64, 2)] if i else []
        s.step(ops)
        if i == 0:
            print("attached", s.fast_path_calls, flush=True)
        i += 1
""")


@pytest.mark.parametrize("path", ["fast", "grpc"])
def test_a_client_killed_mid_steps_leaves_nothing(daemon_factory, path):
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=1000")
    child = subprocess.Popen([sys.executable, "-c", CLIENT, d.socket, path],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == f"attached {1 if path == 'fast' else 0}"
        time.sleep(1.0)  # steps in flight
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = cachemgr.stats(d.socket)
        if not st.clients and st.num_sequences == 0 and all(
                l.used_blocks == 0 for p in st.pools for l in p.layers):
            break
        time.sleep(0.1)
    st = cachemgr.stats(d.socket)
    assert st.clients == [] and st.num_sequences == 0
    assert all(l.used_blocks == 0 for p in st.pools for l in p.layers)
    # The daemon goes on serving.
    with cachemgr.Session.attach(d.socket, "next", model("n"), num_blocks=8) as s:
        assert s.step([StepOp.allocate("a", 3)])[0].ok
