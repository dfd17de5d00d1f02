"""Tensor-parallel groups against the real cachemgrd (docs/MULTINODE.md, "Groups"): an engine's
ranks attach one session each, from separate processes (group_rank.py), and the daemon keeps
each rank's shard of the KV heads in that rank's memory under one block table per layer.
Compress over the group, with every rank's share of the window queries, makes the decisions
compressing the unsharded model makes (an unsharded session of the same model in the same
daemon is the reference), and every rank's mapping then holds its heads of the unsharded
result."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cachemgr
from cachemgr.v1 import cachemgr_pb2 as pb

from test_cachemgrctl import ctl, table_rows
from group_rank import LAYERS, QUERIES, group_model, read_rows, sequence_data, write_share

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = 40


class RankProcess:
    """group_rank.py in its own process: one rank's session."""

    def __init__(self, socket, group, rank, size, dtype):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "group_rank.py"), socket, group, str(rank),
             str(size), dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.attached = self._answer()
        assert self.attached["event"] == "attached", self.attached

    def _answer(self):
        line = self.process.stdout.readline()
        assert line, f"rank process exited with {self.process.wait()}"
        return json.loads(line)

    def command(self, text):
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self):
        if self.process.poll() is None:
            self.command("detach")
            self.process.wait(timeout=30)


@pytest.fixture
def ranks_of(daemon):
    started = []

    def start(group, size, dtype, first=1):
        procs = [RankProcess(daemon.socket, group, r, size, dtype) for r in range(first, size)]
        started.extend(procs)
        return procs
    yield start
    for p in started:
        p.close()


def assert_same_result(g, w):
    assert len(g.layers) == len(w.layers) == LAYERS
    for gl, wl in zip(g.layers, w.layers):
        assert gl.kept_per_head == wl.kept_per_head
        assert np.array_equal(gl.kept_positions, wl.kept_positions)
        assert gl.codebook == wl.codebook
        assert (gl.key_codebook_size, gl.value_codebook_size) == \
            (wl.key_codebook_size, wl.value_codebook_size)
        assert gl.bytes_held == wl.bytes_held
    assert (g.bytes_before, g.bytes_after, g.honest_ratio) == \
        (w.bytes_before, w.bytes_after, w.honest_ratio)


def digests(session, sequence_id):
    return [l.kv_digest for l in
            session.get_sequence(sequence_id, include_kv_digest=True).layers]


def assert_shards_hold(whole, rank_rows, size):
    """Rank r's rows (its heads) equal the unsharded session's rows of those heads."""
    whole_rows = read_rows(whole, "w")
    hkv = whole.model.num_kv_heads // size
    for r, rows in enumerate(rank_rows):
        for layer in range(LAYERS):
            if whole_rows[layer] is None:
                assert rows[layer] is None
                continue
            for plane in ("keys", "values"):
                w = np.asarray(whole_rows[layer][plane]).reshape(-1, whole.model.num_kv_heads,
                                                                 whole.model.head_dim)
                got = np.asarray(rows[layer][plane]).reshape(-1, hkv, whole.model.head_dim)
                assert np.array_equal(got, w[:, r * hkv:(r + 1) * hkv]), (r, layer, plane)


@pytest.mark.parametrize("preset,target,size,dtype", [
    ("snapkv", {"reserve_ratio": 0.3}, 2, "fp32"),
    ("pyramidkv", {"reserve_ratio": 0.4}, 4, "bf16"),
    ("spindlekv", {"byte_ratio": 0.2}, 2, "fp16"),
    ("spindlekv", {"byte_ratio": 0.25}, 4, "fp32"),
])
def test_group_compress_equals_unsharded(daemon, ranks_of, preset, target, size, dtype):
    model = group_model(dtype)
    with cachemgr.Session.attach(daemon.socket, "whole", model, num_blocks=64) as whole, \
            cachemgr.Session.attach(daemon.socket, "rank0", model, num_blocks=64,
                                    group=("tp-engine", 0, size)) as rank0:
        others = ranks_of("tp-engine", size, dtype)
        assert rank0.group_size == size and rank0.group_rank == 0
        assert rank0.model.num_kv_heads == model.num_kv_heads // size
        assert rank0.whole_model.num_kv_heads == model.num_kv_heads
        assert rank0.pool_id != whole.pool_id
        assert all(p.attached["pool_id"] == rank0.pool_id for p in others)

        whole.allocate("w", TOKENS)
        rank0.allocate("g", TOKENS)  # one allocation for every rank
        write_share(whole, "w", 7, TOKENS)
        write_share(rank0, "g", 7, TOKENS)
        for p in others:
            assert p.command(f"write g 7 {TOKENS}")["event"] == "written"
        assert digests(rank0, "g") == digests(whole, "w")

        policy = cachemgr.Policy(preset, window=QUERIES)
        w = whole.compress("w", policy, **target, queries=sequence_data(7, TOKENS)[2])
        g = rank0.compress("g", policy, **target, input_written="queries",
                           num_queries=QUERIES)
        assert_same_result(g, w)
        assert digests(rank0, "g") == digests(whole, "w")
        rank_rows = [read_rows(rank0, "g")] + [p.command("read g")["layers"] for p in others]
        assert_shards_hold(whole, rank_rows, size)

        fw, fg = whole.fetch("w"), rank0.fetch("g")
        for a, b in zip(fg, fw):
            assert np.array_equal(a.positions, b.positions)
        assert digests(rank0, "g") == digests(whole, "w")
        rank_rows = [read_rows(rank0, "g")] + [p.command("read g")["layers"] for p in others]
        assert_shards_hold(whole, rank_rows, size)

        # The operator's view: the group's pool, its ranks, every rank's memory.
        stats = cachemgr.session.stats(daemon.socket)
        pool = next(p for p in stats.pools if p.pool_id == rank0.pool_id)
        assert (pool.group_name, pool.group_size, pool.group_ranks_attached) == \
            ("tp-engine", size, size)
        assert sorted(c.group_rank for c in stats.clients if c.pool_id == rank0.pool_id) == \
            list(range(size))
        # cachemgrctl shows them too.
        (row,) = [r for r in table_rows(ctl(daemon, "stats").stdout, "POOL")
                  if r[0] == rank0.pool_id]
        assert row[-1] == f"tp-engine {size}/{size}"
        ranks = {r[1]: r[-1] for r in table_rows(ctl(daemon, "clients").stdout, "CLIENT")}
        assert ranks == {"whole": "-", **{f"rank{r}": str(r) for r in range(size)}}


def test_group_members_share_sequences_and_errors_name_fields(daemon, ranks_of):
    model = group_model("fp32")
    with cachemgr.Session.attach(daemon.socket, "rank0", model, num_blocks=64,
                                 group=("g", 0, 2)) as rank0, \
            cachemgr.Session.attach(daemon.socket, "outsider", model, num_blocks=64) as outsider:
        (rank1,) = ranks_of("g", 2, "fp32")
        rank0.allocate("s", TOKENS)
        assert rank1.command(f"write s 3 {TOKENS}")["event"] == "written"
        # Not the group's: the same user's other session may not touch it.
        with pytest.raises(cachemgr.CacheManagerError) as e:
            outsider.get_sequence("s")
        assert e.value.code.name == "PERMISSION_DENIED"
        # Malformed or conflicting memberships: the field named, nothing attached.
        for group, code, text in [
                (("g", 1, 2), "ALREADY_EXISTS", "group.rank 1"),
                (("g", 0, 4), "FAILED_PRECONDITION", "group.size 4"),
                (("g", 2, 2), "INVALID_ARGUMENT", "group.rank"),
                (("g", 0, 3), "INVALID_ARGUMENT", "group.size 3 must divide"),
                (("g g", 0, 2), "INVALID_ARGUMENT", "group.name")]:
            with pytest.raises(cachemgr.CacheManagerError) as e:
                cachemgr.Session.attach(daemon.socket, "bad", model, num_blocks=64, group=group)
            assert e.value.code.name == code and text in e.value.message, e.value
        stats = cachemgr.session.stats(daemon.socket)
        assert len(stats.clients) == 3
        # A rank that left: Compress with inputs names it; the sequence stays as it was.
        rank1.close()
        with pytest.raises(cachemgr.CacheManagerError) as e:
            rank0.compress("s", cachemgr.Policy("snapkv", window=QUERIES), reserve_ratio=0.5,
                           input_written="queries", num_queries=QUERIES)
        assert e.value.code.name == "FAILED_PRECONDITION" and "group.rank 1" in e.value.message
        assert not rank0.get_sequence("s").compressed
        # Its rank is free again for a restarted worker.
        (again,) = ranks_of("g", 2, "fp32")
        assert again.attached["group_rank"] == 1
        assert again.command(f"write s 3 {TOKENS}")["event"] == "written"
        write_share(rank0, "s", 3, TOKENS)
        result = rank0.compress("s", cachemgr.Policy("snapkv", window=QUERIES),
                                reserve_ratio=0.5, input_written="queries", num_queries=QUERIES)
        assert result.layers[0].kept_per_head == TOKENS // 2


def test_device_names_one_of_the_daemons(daemon):
    """A host daemon has one device, "host": naming it works, naming another is refused with
    the daemon's devices listed (a GPU daemon lists its GPUs' UUIDs)."""
    model = group_model("fp16")
    with cachemgr.Session.attach(daemon.socket, "on-host", model, num_blocks=8,
                                 device="host") as s:
        assert s.pool.num_blocks == 8
    for kwargs, field in [({"device": "GPU-00000000"}, "device"),
                          ({"group": ("g", 0, 2, ["host", "GPU-1"])}, "group.devices[1]")]:
        with pytest.raises(cachemgr.CacheManagerError) as e:
            cachemgr.Session.attach(daemon.socket, "elsewhere", model, num_blocks=8, **kwargs)
        assert e.value.code.name == "INVALID_ARGUMENT"
        assert f"{field} \"" in e.value.message and "(it has host)" in e.value.message
