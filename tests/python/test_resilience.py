"""The Python client through lease loss and daemon restarts, against the real cachemgrd: a client
process stalled (SIGSTOP) past its lease cannot write into the blocks the daemon gave to another
client; a session reports a SIGKILLed daemon (every call failing promptly) and re-attaches on its
own when it is back; a workload keeps going through a daemon SIGKILL and restart with right
books and digests."""

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

import cachemgr

HERE = pathlib.Path(__file__).resolve().parent
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def fnv1a(data: bytes, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def model(name, layers=2):
    return cachemgr.ModelSpec(name=name, num_layers=layers, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype="fp16", block_size=4)


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def used_blocks(socket):
    return sum(l.used_blocks for p in cachemgr.stats(socket).pools for l in p.layers)


def write_sequence(s, sequence_id, tokens, seed):
    """Allocates and writes seeded K/V; returns the rows written per layer."""
    alloc = s.allocate(sequence_id, tokens)
    rng = np.random.default_rng(seed)
    written = []
    for layer in range(s.model.num_layers):
        k = rng.standard_normal((tokens, 2, 8)).astype(np.float16)
        v = rng.standard_normal((tokens, 2, 8)).astype(np.float16)
        s.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        written.append((k, v))
    return alloc, written


def digests_match(s, sequence_id, written):
    """Whether the daemon's digests are those of `written` (and what the pool shows us)."""
    info = s.get_sequence(sequence_id, include_kv_digest=True)
    for layer, (k, v) in enumerate(written):
        h = FNV_OFFSET
        for t in range(len(k)):
            h = fnv1a(k[t].tobytes(), h)
            h = fnv1a(v[t].tobytes(), h)
        if info.layers[layer].kv_digest != h:
            return False
        rk, rv = s.pool.read(layer, info.layers[layer].block_ids, len(k))
        if not (np.array_equal(rk, k) and np.array_equal(rv, v)):
            return False
    return True


class Lines:
    """A child's stdout, line by line as JSON, with timeouts."""

    def __init__(self, stream):
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def until(self, event, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"the child exited before {event}"
            record = json.loads(line)
            if record["event"] == event:
                return record


def test_stalled_client_cannot_write_into_blocks_given_to_another(daemon_factory):
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=1000")
    # The other tenant attaches first and keeps the 4-block pool alive throughout.
    other = cachemgr.Session.attach(d.socket, "other", model("stall"), num_blocks=4)
    child = subprocess.Popen([sys.executable, str(HERE / "stalled_writer.py"), d.socket, "stall"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(child.stdout)
        stalled_blocks = lines.until("attached")["blocks"]
        assert len(stalled_blocks) == 4 and used_blocks(d.socket) == 8

        os.kill(child.pid, signal.SIGSTOP)  # heartbeat thread included
        wait_for(lambda: used_blocks(d.socket) == 0, what="the daemon to expire the client")
        deadline = time.monotonic() + 30
        while True:  # the blocks may be held back for a while after the expiry
            try:
                alloc, written = write_sequence(other, "victim", 16, seed=3)
                break
            except cachemgr.CacheManagerError as e:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert sorted(alloc.layers[0].new_block_ids) == sorted(stalled_blocks)
        before = [l.kv_digest for l in other.get_sequence("victim", True).layers]
        assert digests_match(other, "victim", written)

        os.kill(child.pid, signal.SIGCONT)
        lost = lines.until("lost")
        assert lost["generation"] == 1 and lost["status"].startswith("ABORTED: ")
        child.stdin.write("write\n")
        child.stdin.flush()
        after = lines.until("after_stall")
        assert after["lease_ok"] is False and after["revoked"] is True
        assert after["call"].startswith("ABORTED: ") and "reattach()" in after["call"]
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The other tenant's KV is untouched.
    assert [l.kv_digest for l in other.get_sequence("victim", True).layers] == before
    assert digests_match(other, "victim", written)
    other.free("victim")
    other.detach()
    assert cachemgr.stats(d.socket).clients == []


def test_session_reports_a_daemon_restart_and_reattaches(daemon_factory):
    # A lease long enough that the restart, not the lease, ends the session.
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=30000")
    events = []
    s = cachemgr.Session.attach(d.socket, "survivor", model("restart"), num_blocks=16,
                                on_event=events.append)
    assert s.generation == 1 and len(s.boot_id) == 16 and s.lease_ok and s.status is None
    old_boot = s.boot_id
    alloc, written = write_sequence(s, "s", 10, seed=1)
    old_view = s.pool.key_cache(0)
    assert np.any(old_view != 0)
    with pytest.raises(cachemgr.CacheManagerError) as e:
        s.reattach()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION

    d.kill()
    # The daemon is gone: calls fail at once with UNAVAILABLE (not after their deadline).
    with pytest.raises(cachemgr.CacheManagerError) as e:
        s.allocate("t", 1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE

    d.restart()
    # The heartbeat thread hears "earlier boot", revokes the mapping and reports the loss...
    wait_for(lambda: not s.lease_ok, what="the loss")
    why = s.status
    assert why.code == grpc.StatusCode.ABORTED
    assert f"from an earlier cachemgrd (boot {old_boot}" in why.message
    assert s.mapping_revoked_at is not None
    assert not np.any(old_view != 0), "the old views reach private memory now"
    with pytest.raises(cachemgr.CacheManagerError) as e:
        s.allocate("s", 1)  # every call, without reaching the daemon
    assert e.value is why
    # ...then attaches a new session in the background.
    wait_for(lambda: any(e.kind == "ready" for e in events), what="the ready event")
    assert events[0].kind == "lost" and events[0].generation == 1 and events[0].error is why
    assert events[1].kind == "ready" and events[1].generation == 2
    with pytest.raises(cachemgr.CacheManagerError):
        s.allocate("s", 1)  # until the engine adopts it

    assert s.reattach() == 2
    assert s.generation == 2 and s.lease_ok and s.boot_id != old_boot
    assert s.mapping_revoked_at is None
    with pytest.raises(cachemgr.CacheManagerError) as e:
        s.get_sequence("s")
    assert e.value.code == grpc.StatusCode.NOT_FOUND  # gone with the old session
    alloc, written = write_sequence(s, "s", 10, seed=2)
    assert alloc.created and digests_match(s, "s", written)
    assert len(cachemgr.stats(d.socket).clients) == 1
    assert s.detach() == 1
    assert cachemgr.stats(d.socket).clients == []


def test_workload_survives_a_daemon_sigkill_and_restart(daemon_factory):
    d = daemon_factory("--heartbeat_interval_ms=100", "--lease_timeout_ms=2000")
    s = cachemgr.Session.attach(d.socket, "workload", model("workload"), num_blocks=64)
    state = dict(ops=0, ops_in_generation=0, outages=[], reattached=[], mismatches=0,
                 failure=None, live={})
    stop = threading.Event()

    def workload():
        serial = 0
        in_outage = False
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if s.generation >= 2 and state["ops_in_generation"] >= 30:
                return
            if not s.lease_ok:
                if not in_outage:
                    state["outages"].append(s.status.code)
                    in_outage = True
                try:
                    state["reattached"].append(s.reattach())
                except cachemgr.CacheManagerError:
                    time.sleep(0.02)
                    continue
                state["live"].clear()  # gone with the old session: an engine recomputes them
                state["ops_in_generation"] = 0
                in_outage = False
                continue
            serial += 1
            sequence_id = f"w{s.generation}-{serial}"
            try:
                _, written = write_sequence(s, sequence_id, 1 + serial % 20, serial)
                if not digests_match(s, sequence_id, written):
                    state["mismatches"] += 1
                state["live"][sequence_id] = written
                while len(state["live"]) > 4:
                    oldest = next(iter(state["live"]))
                    s.free(oldest)
                    del state["live"][oldest]
            except cachemgr.CacheManagerError as e:
                if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                    state["failure"] = e
                    return
                if not in_outage:
                    state["outages"].append(e.code)
                    in_outage = True
                time.sleep(0.02)
                continue
            in_outage = False
            state["ops"] += 1
            state["ops_in_generation"] += 1

    thread = threading.Thread(target=workload)
    thread.start()
    try:
        wait_for(lambda: state["ops"] >= 20 or not thread.is_alive(), what="the workload")
        d.kill()
        time.sleep(0.3)  # the workload meets the outage
        d.restart()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the workload hangs"
    finally:
        stop.set()
        thread.join()
    assert state["failure"] is None
    assert state["outages"], "the outage was reported"
    assert state["reattached"] == [2] and s.generation == 2
    assert state["ops_in_generation"] >= 30 and state["mismatches"] == 0
    # The new daemon's books match what the workload holds, and its digests are right.
    live_blocks = 0
    for sequence_id, written in state["live"].items():
        assert digests_match(s, sequence_id, written)
        live_blocks += sum(len(l.block_ids) for l in s.get_sequence(sequence_id).layers)
    assert len(state["live"]) == 4 and used_blocks(d.socket) == live_blocks > 0
    pool = cachemgr.stats(d.socket).pools[0]
    assert all(l.free_blocks + l.used_blocks == l.capacity_blocks for l in pool.layers)
    assert s.detach() == 4
    assert cachemgr.stats(d.socket).clients == []
