"""The prefix store through the Python client and the real cachemgrd (docs/PREFIX_STORE.md):
blocks stored by one client outlive it and load, bit for bit, into another client's sequence;
precise errors; the daemon's counters and metrics."""

import hashlib

import grpc
import numpy as np
import pytest

import cachemgr

BLOCK = 4


def model():
    return cachemgr.ModelSpec(name="py-prefix", num_layers=3, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype="bf16", block_size=BLOCK)


def chain(tokens):
    """Chained block hashes (as vLLM's: each covers the prefix up to its block's end)."""
    out, parent = [], b""
    for i in range(len(tokens) // BLOCK):
        parent = hashlib.sha256(parent + bytes(tokens[i * BLOCK:(i + 1) * BLOCK])).digest()
        out.append(parent)
    return out


def write_random(session, sequence_id, tokens, seed):
    alloc = session.allocate(sequence_id, tokens)
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(session.model.num_layers):
        k = cachemgr.float32_to_bf16(rng.standard_normal((tokens, 2, 8)).astype(np.float32))
        v = cachemgr.float32_to_bf16(rng.standard_normal((tokens, 2, 8)).astype(np.float32))
        session.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        rows.append((k, v))
    return rows


def test_stored_blocks_outlive_their_client_and_load_bit_for_bit(daemon):
    hashes = chain(list(range(3 * BLOCK)))
    with cachemgr.Session.attach(daemon.socket, "py-writer", model(), num_blocks=32) as a:
        rows = write_random(a, "doc", 3 * BLOCK + 2, seed=1)  # 3 full blocks and a partial one
        stored = a.store_prefix("doc", hashes)
        assert (stored.stored, stored.already_stored) == (3, 0)
        again = a.store_prefix("doc", hashes[1:], first_block=1)
        assert (again.stored, again.already_stored) == (0, 2)
        a.free("doc")  # the store keeps the blocks
    # The writer is gone: the pool stays for its stored prefix.
    pools = cachemgr.stats(daemon.socket).pools
    assert [(p.clients, p.prefix_entries) for p in pools] == [(0, 3)]
    assert pools[0].prefix_only_blocks == 3 * 3
    with cachemgr.Session.attach(daemon.socket, "py-reader", model(), num_blocks=32) as b:
        assert b.match_prefix(hashes) == 3
        assert b.match_prefix(hashes[:1] + [b"unknown"] + hashes[2:]) == 1
        assert b.match_prefix([b"unknown"] + hashes) == 0
        loaded = b.load_prefix("reuse", hashes + [b"not stored"])
        assert (loaded.loaded_blocks, loaded.corrupt_blocks) == (3, 0)
        for table in loaded.sequence.layers:
            assert table.num_tokens == 3 * BLOCK
            k, v = b.pool.read(table.layer, table.block_ids, 3 * BLOCK)
            np.testing.assert_array_equal(k, rows[table.layer][0][:3 * BLOCK])
            np.testing.assert_array_equal(v, rows[table.layer][1][:3 * BLOCK])
        b.free("reuse")
        nothing = b.load_prefix("none", [b"not stored"])
        assert nothing.loaded_blocks == 0 and nothing.sequence is None
        assert b.list_sequences() == []  # a load that served nothing created nothing
    counters = cachemgr.stats(daemon.socket).prefix  # operator view (same user)
    assert counters["stored"] == 3 and counters["hits"] == 3
    assert counters["misses"] == 2  # "not stored" twice


def test_a_block_changed_behind_the_store_is_not_served(daemon):
    hashes = chain(list(range(2 * BLOCK)))
    with cachemgr.Session.attach(daemon.socket, "py-corrupt", model(), num_blocks=32) as s:
        write_random(s, "doc", 2 * BLOCK, seed=2)
        s.store_prefix("doc", hashes)
        second_block = s.get_sequence("doc").layers[2].block_ids[1]
        s.free("doc")
        # A stray write into the second block of layer 2 through the mapping.
        garbage = np.full((1, 2, 8), 0x4000, dtype=s.pool.dtype)
        s.pool.write(2, np.array([second_block * BLOCK]), garbage, garbage)
        loaded = s.load_prefix("reuse", hashes)
        assert (loaded.loaded_blocks, loaded.corrupt_blocks) == (1, 1)
        s.free("reuse")
        assert s.match_prefix(hashes) == 1  # the corrupt entry is gone
    assert cachemgr.stats(daemon.socket).prefix["corrupt"] == 1


@pytest.mark.parametrize("hashes, field", [([], "block_hashes must hold"),
                                           ([b"x" * 65], "block_hashes[0] must be 1-64 bytes"),
                                           ([b"ok", b""], "block_hashes[1] must be 1-64 bytes")])
def test_malformed_hashes_are_refused_naming_the_field(daemon, hashes, field):
    with cachemgr.Session.attach(daemon.socket, "py-errors", model(), num_blocks=8) as s:
        write_random(s, "doc", BLOCK, seed=3)
        for call in (lambda: s.store_prefix("doc", hashes), lambda: s.match_prefix(hashes),
                     lambda: s.load_prefix("other", hashes)):
            with pytest.raises(cachemgr.CacheManagerError) as e:
                call()
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in str(e.value)
        with pytest.raises(cachemgr.CacheManagerError) as e:  # block 1 is not there (not full)
            s.store_prefix("doc", [b"a", b"b"])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "full blocks" in str(e.value)
    assert cachemgr.stats(daemon.socket).prefix["stored"] == 0


def test_codebook_held_blocks_free_their_blocks_and_load_rebuilt(daemon):
    """Rows that are multiples of a few directions: the codebook holds each layer in far fewer
    bytes than its block, the pool keeps no block for it, and another client loads the rows
    rebuilt (to bf16 rounding)."""
    spec = cachemgr.ModelSpec(name="py-prefix-codebook", num_layers=2, num_q_heads=4,
                              num_kv_heads=2, head_dim=8, dtype="bf16", block_size=BLOCK,
                              rope=cachemgr.RopeConfig(style="none"))
    tokens = 2 * BLOCK
    hashes = chain(list(range(tokens)))
    directions = np.eye(8, dtype=np.float32)[:3]
    rng = np.random.default_rng(7)
    rows = []
    with cachemgr.Session.attach(daemon.socket, "py-cb-writer", spec, num_blocks=8) as a:
        alloc = a.allocate("doc", tokens)
        for layer in range(2):
            pick = rng.integers(0, 3, size=(2, tokens, 2))
            scale = rng.uniform(0.5, 2.0, size=(2, tokens, 2, 1)).astype(np.float32)
            k, v = (cachemgr.float32_to_bf16(directions[pick[p]] * scale[p]) for p in range(2))
            a.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
            rows.append((cachemgr.bf16_to_float32(k), cachemgr.bf16_to_float32(v)))
        with pytest.raises(cachemgr.CacheManagerError) as e:
            a.store_prefix("doc", hashes, codebook=cachemgr.PrefixCodebook(theta_k=1.5))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "codebook.theta_k" in str(e.value)
        stored = a.store_prefix("doc", hashes, codebook=cachemgr.PrefixCodebook(0.99, 0.99))
        assert (stored.stored, stored.codebook_layers) == (2, 2 * 2)
        # Per entry and layer, K and V: at most 3 entries of 8 bf16 + per vector a 2-byte
        # reference and a bf16 magnitude, against 8 vectors of 8 bf16 each plainly.
        assert 0 < stored.codebook_bytes <= 2 * 2 * 2 * (3 * 8 * 2 + 2 * BLOCK * (2 + 2))
        assert stored.codebook_bytes < 2 * 2 * 2 * (2 * BLOCK * 8 * 2) * 0.65
        a.free("doc")
    pool = cachemgr.stats(daemon.socket).pools[0]
    assert (pool.prefix_entries, pool.prefix_codebook_layers) == (2, 4)
    assert pool.prefix_codebook_bytes == stored.codebook_bytes
    assert pool.prefix_bytes > pool.prefix_codebook_bytes
    assert pool.prefix_only_blocks == 0  # no block is kept for the store
    assert all(l.free_blocks == 8 for l in pool.layers)
    with cachemgr.Session.attach(daemon.socket, "py-cb-reader", spec, num_blocks=8) as b:
        loaded = b.load_prefix("reuse", hashes)
        assert (loaded.loaded_blocks, loaded.corrupt_blocks) == (2, 0)
        for table in loaded.sequence.layers:
            k, v = b.pool.read(table.layer, table.block_ids, tokens)
            want_k, want_v = rows[table.layer]
            np.testing.assert_allclose(cachemgr.bf16_to_float32(k), want_k, rtol=1e-2)
            np.testing.assert_allclose(cachemgr.bf16_to_float32(v), want_v, rtol=1e-2)
        b.free("reuse")
