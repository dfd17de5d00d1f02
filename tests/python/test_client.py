"""The Python client (client/python, pip-installed) against the real cachemgrd: attach as a
context manager, zero-copy numpy views in both vLLM layouts (checked against the daemon's own
digest of the bytes), compress / fetch / park / fork / free, errors as exceptions, leases."""

import time

import grpc
import numpy as np
import pytest

import cachemgr

FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def fnv1a(data: bytes, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def model(layout="flash_attn", dtype="fp16", name="py-model", layers=3):
    return cachemgr.ModelSpec(name=name, num_layers=layers, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype=dtype, block_size=4, layout=layout)


@pytest.mark.parametrize("layout", ["flash_attn", "flashinfer"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_views_write_what_the_daemon_reads(daemon, layout, dtype):
    m = model(layout, dtype)
    with cachemgr.Session.attach(daemon.socket, "py-writer", m, num_blocks=32) as s:
        assert s.pool.layer(0).shape == ((2, 32, 4, 2, 8) if layout == "flash_attn"
                                         else (32, 2, 4, 2, 8))
        assert s.pool.key_cache(1).shape == (32, 4, 2, 8)
        alloc = s.allocate("seq", 10)
        assert alloc.created and alloc.first_position == 0 and alloc.num_positions == 10
        rng = np.random.default_rng(7)
        written = []
        for layer in range(3):
            k = rng.standard_normal((10, 2, 8)).astype(np.float32)
            v = rng.standard_normal((10, 2, 8)).astype(np.float32)
            if dtype == "bf16":
                k, v = cachemgr.float32_to_bf16(k), cachemgr.float32_to_bf16(v)
            else:
                k, v = k.astype(s.pool.dtype), v.astype(s.pool.dtype)
            s.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
            written.append((k, v))
        info = s.get_sequence("seq", include_kv_digest=True)
        for layer, (k, v) in enumerate(written):
            h = FNV_OFFSET
            for t in range(10):
                h = fnv1a(k[t].tobytes(), h)
                h = fnv1a(v[t].tobytes(), h)
            assert info.layers[layer].kv_digest == h, f"layer {layer}"
            rk, rv = s.pool.read(layer, info.layers[layer].block_ids, 10)
            np.testing.assert_array_equal(rk, k)
            np.testing.assert_array_equal(rv, v)
        if dtype == "bf16":  # the round trip of the helpers
            x = np.array([1.0, -2.5, 3.14159, 1e-3], dtype=np.float32)
            back = cachemgr.bf16_to_float32(cachemgr.float32_to_bf16(x))
            np.testing.assert_allclose(back, x, rtol=1 / 128)


def test_background_compress_keeps_rows_appended_meanwhile(daemon):
    """compress(background=True) returns at once; decoding appends go on; finish_compress puts
    the appended rows after the kept ones, each with its position and its KV."""
    m = model(dtype="fp32", name="py-background")
    with cachemgr.Session.attach(daemon.socket, "py-background", m, num_blocks=64) as s:
        alloc = s.allocate("seq", 40)
        rng = np.random.default_rng(5)
        for layer in range(3):
            k = rng.standard_normal((40, 2, 8)).astype(np.float32)
            s.pool.write(layer, alloc.layers[layer].slot_mapping, k, 2 * k)
        queries = rng.standard_normal((3, 8, 4, 8)).astype(np.float32)
        started = s.compress("seq", cachemgr.Policy("snapkv", window=8), reserve_ratio=0.5,
                             queries=queries, background=True)
        assert started.pending and not started.layers
        assert s.get_sequence("seq").compress_pending
        more = s.allocate("seq", 5)
        appended = {}
        for layer in range(3):
            k = rng.standard_normal((5, 2, 8)).astype(np.float32)
            s.pool.write(layer, more.layers[layer].slot_mapping, k, 2 * k)
            appended[layer] = k
        r = s.finish_compress("seq")
        assert not r.pending and r.rows_appended == 5
        for layer in range(3):
            cl = r.layers[layer]
            assert cl.num_tokens == cl.kept_per_head + 5
            assert (cl.kept_positions[:, cl.kept_per_head:] == np.arange(40, 45)).all()
            keys, values = s.pool.read(layer, cl.block_ids, cl.num_tokens)
            np.testing.assert_array_equal(keys[cl.kept_per_head:], appended[layer])
            np.testing.assert_array_equal(values[cl.kept_per_head:], 2 * appended[layer])
        info = s.get_sequence("seq")
        assert info.compressed and not info.compress_pending
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.finish_compress("seq")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "no background Compress" in e.value.message


def test_compress_fetch_park_fork_free(daemon):
    m = model(dtype="fp32")
    with cachemgr.Session.attach(daemon.socket, "py-compress", m, num_blocks=64) as s:
        alloc = s.allocate("seq", 40)
        rng = np.random.default_rng(3)
        for layer in range(3):
            base = rng.standard_normal((1, 2, 8)).astype(np.float32)
            k = (base + 0.01 * rng.standard_normal((40, 2, 8))).astype(np.float32)
            v = (base * 2 + 0.01 * rng.standard_normal((40, 2, 8))).astype(np.float32)
            s.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        queries = rng.standard_normal((3, 8, 4, 8)).astype(np.float32)
        before = cachemgr.stats(daemon.socket).pools[0]
        used_before = sum(l.used_blocks for l in before.layers)
        r = s.compress("seq", cachemgr.Policy("snapkv", window=8), reserve_ratio=0.5,
                       queries=queries)
        assert 0.45 < r.honest_ratio < 0.55
        assert r.blocks_released > 0
        assert r.layers[0].kept_positions.shape == (2, r.layers[0].num_tokens)
        after = cachemgr.stats(daemon.socket).pools[0]
        assert sum(l.used_blocks for l in after.layers) == used_before - r.blocks_released
        info = s.get_sequence("seq")
        assert info.compressed and info.compression_policy == "snapkv"
        fetched = s.fetch("seq")
        assert [f.layer for f in fetched] == [0, 1, 2]
        assert all(f.new_blocks == 0 for f in fetched)  # snapkv keeps plain rows
        np.testing.assert_array_equal(fetched[0].positions, r.layers[0].kept_positions)
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.compress("seq", cachemgr.Policy("snapkv"), reserve_ratio=0.5, queries=queries)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION

        # A codebook-only fork parks its layers; decode appends are coded by Park.
        s.allocate("cb", 40)
        r2 = s.compress("cb", cachemgr.Policy("codebook", codebook_only_if_smaller=False,
                                              append_batch=4), reserve_ratio=1.0)
        assert all(l.codebook for l in r2.layers)
        assert r2.bytes_after < r2.bytes_before
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.allocate("cb", 1)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        s.fetch("cb")
        s.allocate("cb", 6)
        parked = s.park("cb")
        assert [p.rows_appended for p in parked] == [6, 6, 6]
        assert all(p.matched + p.queued == 6 * 2 * 2 for p in parked)
        child = s.fork("seq", "seq-child")
        assert child.parent_sequence_id == "seq"
        names = sorted(x.sequence_id for x in s.list_sequences())
        assert names == ["cb", "seq", "seq-child"]
        for sid in names:
            s.free(sid)
        assert sum(l.used_blocks for l in cachemgr.stats(daemon.socket).pools[0].layers) == 0


def test_codebook_search_exact_and_hashed(daemon):
    # 1200 tokens x 2 KV heads: 2400 vectors per layer codebook, enough for the hashed search
    # to hash (below 2048 it runs the exact pass).
    m = model(dtype="fp32", layers=2)
    tokens = 1200
    with cachemgr.Session.attach(daemon.socket, "py-search", m, num_blocks=2 * tokens // 4) as s:
        alloc = s.allocate("base", tokens)
        rng = np.random.default_rng(5)
        centres = rng.standard_normal((150, 8)).astype(np.float32)
        for layer in range(2):
            pick = rng.integers(0, 150, size=(tokens, 2))
            k = centres[pick] + 0.02 * rng.standard_normal((tokens, 2, 8)).astype(np.float32)
            v = centres[pick] * 2 + 0.02 * rng.standard_normal((tokens, 2, 8)).astype(np.float32)
            s.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        ratios = {}
        for search in ("exact", "lsh"):
            s.fork("base", search)
            r = s.compress(search, cachemgr.Policy("codebook", codebook_only_if_smaller=False,
                                                   codebook_search=search), reserve_ratio=1.0)
            assert all(l.codebook for l in r.layers)
            ratios[search] = r.honest_ratio
        assert ratios["exact"] < 0.9  # V clusters (K is un-rotated at its positions first)
        assert ratios["lsh"] <= ratios["exact"] * 1.02  # about as many entries
        with pytest.raises(ValueError, match="codebook_search"):
            s.compress("base", cachemgr.Policy("codebook", codebook_search="fast"),
                       reserve_ratio=1.0)
        for sid in ("base", "exact", "lsh"):
            s.free(sid)


def test_errors_carry_status_and_field(daemon):
    with cachemgr.Session.attach(daemon.socket, "py-errors", model(), num_blocks=16) as s:
        for call, code, field in (
                (lambda: s.allocate("", 4), grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
                (lambda: s.allocate("x", 0), grpc.StatusCode.INVALID_ARGUMENT, "num_new_tokens"),
                (lambda: s.allocate("big", 10_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "layer"),
                (lambda: s.free("missing"), grpc.StatusCode.NOT_FOUND, "sequence_id"),
                (lambda: s.fetch("missing"), grpc.StatusCode.NOT_FOUND, "sequence_id")):
            with pytest.raises(cachemgr.CacheManagerError) as e:
                call()
            assert e.value.code == code
            assert field in e.value.message
        s.allocate("x", 4)
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.compress("x", cachemgr.Policy("spindlekv", theta_k=1.5), reserve_ratio=0.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "policy.theta_k" in e.value.message
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.compress("x", cachemgr.Policy("nope"), reserve_ratio=0.5)
        assert "policy.preset" in e.value.message
        with pytest.raises(ValueError):
            s.compress("x", reserve_ratio=0.5, byte_ratio=0.5)
        with pytest.raises(cachemgr.CacheManagerError) as e:
            s.record_kv_writes()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "host memory" in e.value.message
    with pytest.raises(ValueError):
        cachemgr.Session.attach(daemon.socket, "bad", cachemgr.ModelSpec(
            "m", 1, 1, 1, 8, dtype="int4"))
    with pytest.raises(cachemgr.CacheManagerError) as e:
        cachemgr.Session.attach(daemon.socket, "bad", cachemgr.ModelSpec("m", 0, 1, 1, 8))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "num_layers" in e.value.message


def test_heartbeats_keep_the_lease_and_detach_frees(daemon_factory):
    d = daemon_factory("--lease_timeout_ms=600", "--heartbeat_interval_ms=100")
    alive = cachemgr.Session.attach(d.socket, "beating", model(name="lease"), num_blocks=16)
    silent = cachemgr.Session.attach(d.socket, "silent", model(name="lease"), heartbeat=False)
    alive.allocate("a", 8)
    silent.allocate("b", 8)
    time.sleep(1.5)
    clients = {c.client_name for c in cachemgr.stats(d.socket).clients}
    assert "beating" in clients
    assert "silent" not in clients  # its lease expired and its blocks came back
    assert [x.sequence_id for x in cachemgr.list_all_sequences(d.socket)] == ["a"]
    assert alive.detach() == 1
    assert alive.detach() is None
    assert cachemgr.stats(d.socket).num_sequences == 0
    # The silent client knows its lease ran out without asking the daemon.
    assert not silent.lease_ok
    with pytest.raises(cachemgr.CacheManagerError) as e:
        silent.allocate("b", 1)
    assert e.value.code == grpc.StatusCode.ABORTED
    assert "lease expired at" in e.value.message
    assert silent.detach() is None


@pytest.mark.parametrize("layout", ["flash_attn", "flashinfer"])
def test_whole_block_writes_match_row_by_row_writes(daemon, layout):
    """HostPool.write's path for whole blocks (one index per block) writes what the row path
    writes; a mapping that is not whole blocks in order takes the row path."""
    m = model(layout, "fp32")
    with cachemgr.Session.attach(daemon.socket, "py-blocks", m, num_blocks=32) as s:
        rng = np.random.default_rng(11)
        k = rng.standard_normal((12, 2, 8)).astype(np.float32)
        v = rng.standard_normal((12, 2, 8)).astype(np.float32)
        whole = s.allocate("whole", 12)
        rows = s.allocate("rows", 12)
        shuffled = s.allocate("shuffled", 12)
        for layer in range(3):
            s.pool.write(layer, whole.layers[layer].slot_mapping, k, v)
            for t in range(12):  # one row at a time
                s.pool.write(layer, rows.layers[layer].slot_mapping[t:t + 1], k[t:t + 1],
                             v[t:t + 1])
            order = rng.permutation(12)  # whole blocks, rows out of order
            s.pool.write(layer, shuffled.layers[layer].slot_mapping[order], k[order], v[order])
        digests = {name: [l.kv_digest for l in
                          s.get_sequence(name, include_kv_digest=True).layers]
                   for name in ("whole", "rows", "shuffled")}
        assert digests["whole"] == digests["rows"] == digests["shuffled"]
        info = s.get_sequence("whole")
        for layer in range(3):
            rk, rv = s.pool.read(layer, info.layers[layer].block_ids, 12)
            np.testing.assert_array_equal(rk, k)
            np.testing.assert_array_equal(rv, v)
