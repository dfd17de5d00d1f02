"""Sequences that move between daemons (docs/MULTINODE.md): two real daemons that are each
other's peers, real clients attached to each, TransferSequence on A sending a sequence to a
session on B over the host transport (Peer.ReceiveSequence on B's TCP listener). What B holds
equals what A held (digests), a move frees the source only once B holds the copy, a retry is
answered from the first attempt, and a peer that stalls, restarts or sends garbage leaves both
daemons consistent with nothing leaked."""

import concurrent.futures
import signal
import time

import grpc
import numpy as np
import pytest

import cachemgr
from cachemgr.v1 import cachemgr_pb2 as pb
from cachemgr.v1 import cachemgr_pb2_grpc as pb_grpc

from test_peers import free_port, peer, peer_in_state, token_file, wait_for

TOKEN = "cluster-token-0123456789"


def model(dtype="fp32", block_size=4):
    return cachemgr.ModelSpec(name="xfer", num_layers=3, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype=dtype, block_size=block_size)


@pytest.fixture
def pair(daemon_factory, tmp_path):
    """Daemons A and B, peers of each other on loopback TCP under the cluster token."""
    token = token_file(tmp_path, "token", TOKEN)
    port_a, port_b = free_port(), free_port()
    common = ["--tcp_plaintext_loopback", f"--tcp_token_file={token}",
              "--peer_probe_interval_ms=200"]
    b = daemon_factory(f"--tcp_address=127.0.0.1:{port_b}", f"--peers=127.0.0.1:{port_a}",
                       "--node_name=node-b", *common)
    a = daemon_factory(f"--tcp_address=127.0.0.1:{port_a}", f"--peers=127.0.0.1:{port_b}",
                       "--node_name=node-a", *common)
    wait_for("A to see B", peer_in_state_of(a, f"127.0.0.1:{port_b}"))
    return a, b, f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"


def peer_in_state_of(d, address):
    return peer_in_state(d, address, "PEER_STATE_UP")


def fill(session, sequence_id, tokens, seed):
    alloc = session.allocate(sequence_id, tokens)
    rng = np.random.default_rng(seed)
    for layer in range(3):
        k = rng.standard_normal((tokens, 2, 8)).astype(session.pool.dtype)
        v = rng.standard_normal((tokens, 2, 8)).astype(session.pool.dtype)
        session.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)


def digests(session, sequence_id):
    info = session.get_sequence(sequence_id, include_kv_digest=True)
    return [l.kv_digest for l in info.layers]


def stop(d):
    """SIGSTOPs the daemon and waits until the kernel shows it stopped (state T)."""
    d.process.send_signal(signal.SIGSTOP)

    def stopped():
        with open(f"/proc/{d.process.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    wait_for("the daemon to be stopped", stopped, timeout=10)


def used_blocks(d):
    return sum(l.used_blocks for p in cachemgr.stats(d.socket).pools for l in p.layers)


def test_copy_then_move_with_equal_digests_and_idempotent_retries(pair):
    a, b, _, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=64) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(block_size=8), num_blocks=64) as sb:
        fill(sa, "req-1", 37, seed=1)
        fill(sb, "mine", 5, seed=2)  # B's blocks are not A's
        copy = sa.transfer_sequence("req-1", b_address, sb.session_token, "t-copy",
                                    destination_sequence_id="req-1-copy")
        assert copy.destination_sequence_id == "req-1-copy" and not copy.replayed
        assert not copy.source_released
        # Bytes on the wire are the honest bytes held: every row's K and V, fp32.
        assert copy.payload_bytes == 2 * 3 * 37 * 2 * 8 * 4
        assert copy.payload_bytes < copy.wire_bytes < copy.payload_bytes * 1.01 + 1024
        assert len(copy.layer_digests) == 3
        # B holds exactly A's rows, in its own blocks of another block size.
        assert digests(sb, "req-1-copy") == digests(sa, "req-1")
        assert sb.get_sequence("req-1-copy").num_positions == 37
        assert sa.get_sequence("req-1").busy == ""
        # A retry is answered, not repeated: B holds one copy.
        again = sa.transfer_sequence("req-1", b_address, sb.session_token, "t-copy",
                                     destination_sequence_id="req-1-copy")
        assert again.replayed and again.layer_digests == copy.layer_digests
        assert [s.sequence_id for s in sb.list_sequences()] == ["mine", "req-1-copy"]
        # The id is bound to its transfer.
        with pytest.raises(cachemgr.CacheManagerError) as e:
            sa.transfer_sequence("req-1", b_address, sb.session_token, "t-copy",
                                 destination_sequence_id="elsewhere")
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "transfer_id" in e.value.message

        # A move: the source goes once B confirmed; by node name this time.
        a_digests = digests(sa, "req-1")
        used_a = used_blocks(a)
        moved = sa.transfer_sequence("req-1", "node-b", sb.session_token, "t-move",
                                     move=True)
        assert moved.source_released and moved.destination_sequence_id == "req-1"
        assert digests(sb, "req-1") == a_digests
        assert used_blocks(a) == used_a - 3 * 10  # 37 tokens in blocks of 4, three layers
        with pytest.raises(cachemgr.CacheManagerError) as e:
            sa.get_sequence("req-1")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        # Retried after the source is gone: still the first outcome.
        assert sa.transfer_sequence("req-1", "node-b", sb.session_token, "t-move",
                                    move=True).replayed
        # The receiver's copy is an ordinary sequence of its session.
        sb.allocate("req-1", 3)
        assert sb.get_sequence("req-1").num_positions == 40
        sb.free("req-1")
        sb.free("req-1-copy")
    assert cachemgr.stats(a.socket).num_sequences == 0
    assert cachemgr.stats(b.socket).num_sequences == 0


def test_a_compressed_sequence_moves_as_held(pair):
    a, b, _, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=64) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=64) as sb:
        fill(sa, "req", 64, seed=3)
        r = sa.compress("req", cachemgr.Policy(preset="streamingllm", window=8),
                        reserve_ratio=0.5)
        held = sum(layer.bytes_held for layer in r.layers)
        sent = sa.transfer_sequence("req", b_address, sb.session_token, "t-c", move=False)
        # The honest bytes held cross the wire, not the uncompressed sequence.
        assert sent.payload_bytes == held < 2 * 3 * 64 * 2 * 8 * 4
        info = sb.get_sequence("req", include_kv_digest=True)
        assert info.compressed and info.compression_policy == "streamingllm"
        assert [l.kv_digest for l in info.layers] == digests(sa, "req")
        assert ([f.positions.tolist() for f in sb.fetch("req")] ==
                [f.positions.tolist() for f in sa.fetch("req")])


def test_a_codebook_sequence_travels_coded(pair):
    """Parked codebook layers cross as codebooks: the payload is the arena's honest bytes, the
    receiver holds them parked, and fetched on both sides every layer holds the same rows."""
    a, b, _, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(dtype="bf16"), num_blocks=64) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(dtype="bf16"), num_blocks=64) as sb:
        alloc = sa.allocate("cb", 48)
        rng = np.random.default_rng(5)
        directions = rng.standard_normal((3, 2, 8)).astype(np.float32)
        for layer in range(3):  # three directions per head, varied magnitudes: codebooks pay
            pick = rng.integers(0, 3, 48)
            scale = rng.uniform(0.5, 2.0, (48, 1, 1)).astype(np.float32)
            k = cachemgr.float32_to_bf16(directions[pick] * scale)
            v = cachemgr.float32_to_bf16(directions[(pick + 1) % 3] * scale)
            sa.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        r = sa.compress("cb", cachemgr.Policy(preset="codebook"), reserve_ratio=1.0,
                        scores=np.ones((3, 4, 48), dtype=np.float32))
        held = sa.get_sequence("cb")
        coded = [l for l in held.layers if l.codebook]
        assert coded and all(l.parked for l in coded), held
        arena = sum(l.arena_bytes for l in coded)
        plain_rows = sum(l.num_tokens for l in held.layers if not l.codebook)
        sent = sa.transfer_sequence("cb", b_address, sb.session_token, "t-cb")
        # Bytes on the wire: the codebooks' honest bytes and the plain layers' rows, bf16.
        assert sent.payload_bytes == arena + plain_rows * 2 * 2 * 8 * 2
        assert sent.payload_bytes == sum(layer.bytes_held for layer in r.layers)
        got = sb.get_sequence("cb")
        for mine, theirs in zip(held.layers, got.layers):
            assert (theirs.codebook, theirs.parked, theirs.arena_bytes, theirs.key_codebook_size,
                    theirs.num_tokens) == (mine.codebook, mine.parked, mine.arena_bytes,
                                           mine.key_codebook_size, mine.num_tokens)
        sa.fetch("cb")
        sb.fetch("cb")
        assert digests(sb, "cb") == digests(sa, "cb")
        # A fetched codebook layer does not travel: Park it first.
        with pytest.raises(cachemgr.CacheManagerError) as e:
            sa.transfer_sequence("cb", b_address, sb.session_token, "t-cb-2",
                                 destination_sequence_id="cb2")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "Park" in e.value.message
        sa.park("cb")
        sa.transfer_sequence("cb", b_address, sb.session_token, "t-cb-2",
                             destination_sequence_id="cb2")
        sb.fetch("cb2")
        sa.fetch("cb")
        assert digests(sb, "cb2") == digests(sa, "cb")


def test_bad_requests_name_the_field_and_change_nothing(pair):
    a, b, _, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=64) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=64) as sb, \
            cachemgr.Session.attach(b.socket, "other", cachemgr.ModelSpec(
                name="other", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=16,
                dtype="fp32", block_size=4), num_blocks=8) as sc:
        fill(sa, "req", 9, seed=4)
        cases = [
            (dict(peer="10.9.9.9:1"), grpc.StatusCode.NOT_FOUND, "peer"),
            (dict(transfer_id=""), grpc.StatusCode.INVALID_ARGUMENT, "transfer_id"),
            (dict(transfer_id="has space"), grpc.StatusCode.INVALID_ARGUMENT, "transfer_id"),
            (dict(destination_session_token=""), grpc.StatusCode.INVALID_ARGUMENT,
             "destination_session_token"),
            (dict(destination_session_token="forged"), grpc.StatusCode.NOT_FOUND,
             "session_token"),
            (dict(destination_session_token=sc.session_token), grpc.StatusCode.INVALID_ARGUMENT,
             "header"),
            (dict(sequence_id="missing"), grpc.StatusCode.NOT_FOUND, "sequence_id"),
        ]
        for i, (change, code, words) in enumerate(cases):
            args = dict(sequence_id="req", peer=b_address,
                        destination_session_token=sb.session_token, transfer_id=f"bad-{i}")
            args.update(change)
            with pytest.raises(cachemgr.CacheManagerError) as e:
                sa.transfer_sequence(**args)
            assert e.value.code == code, (change, e.value)
            assert words in e.value.message, (change, e.value.message)
        assert sb.list_sequences() == [] and sc.list_sequences() == []
        assert sa.get_sequence("req").busy == ""
    assert used_blocks(b) == 0


def test_a_stalled_peer_fails_within_the_deadline_and_keeps_nothing(pair):
    a, b, _, b_address = pair
    # 24 MiB of rows: more than loopback's socket buffers and HTTP/2's windows hold, so the
    # sender is still writing when the deadline passes and the end never leaves it.
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=16384) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=16384) as sb:
        fill(sa, "long", 65536, seed=6)
        before = digests(sa, "long")
        stop(b)
        try:
            start = time.monotonic()
            with pytest.raises(cachemgr.CacheManagerError) as e:
                sa.transfer_sequence("long", b_address, sb.session_token, "t-stall", move=True,
                                     timeout_ms=1500)
            took = time.monotonic() - start
            # The stream started before any probe could see B stopped: the deadline ended it,
            # although B's connection was wedged (B reads nothing, A's writes cannot flush).
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
            assert "within the deadline" in e.value.message
            assert 1.4 < took < 5, took
        finally:
            b.process.send_signal(signal.SIGCONT)
        # The sender still holds its sequence, unchanged and usable.
        assert digests(sa, "long") == before and sa.get_sequence("long").busy == ""
        # The receiver dropped whatever it had allocated once it saw the stream fail.
        wait_for("B to drop the partial transfer",
                 lambda: cachemgr.stats(b.socket).num_sequences == 0 and used_blocks(b) == 0)
        # The retry (same id: the failed attempt was forgotten) goes through.
        wait_for("A to see B up again", peer_in_state_of(a, b_address))
        moved = sa.transfer_sequence("long", b_address, sb.session_token, "t-stall", move=True)
        assert moved.source_released and not moved.replayed
        assert digests(sb, "long") == before


def test_a_peer_killed_mid_transfer_and_restarted_leaves_both_sides_consistent(pair):
    a, b, _, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=256) as sa:
        for i in range(4):
            fill(sa, f"r{i}", 100, seed=10 + i)
        with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=256) as sb:
            sa.transfer_sequence("r0", b_address, sb.session_token, "s-0", move=True)
            old_token = sb.session_token
            old_boot = peer(a, b_address)["boot_id"]
            # B dies while r1 is on its way: stopped first so that the stream is surely in
            # flight (sent, unanswered), then killed.
            stop(b)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                inflight = pool.submit(sa.transfer_sequence, "r1", b_address, old_token, "s-1",
                                       move=True, timeout_ms=20000)
                time.sleep(0.5)
                assert not inflight.done(), (inflight.result(), open(
                    f"/proc/{b.process.pid}/stat").read())
                b.kill()
                with pytest.raises(cachemgr.CacheManagerError) as e:
                    inflight.result(timeout=10)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
            b.restart()
            wait_for("A to see B back", lambda: (peer_in_state_of(a, b_address)() or {}).get(
                "boot_id", old_boot) != old_boot)
            # The old session died with B: refused by B, nothing moved.
            with pytest.raises(cachemgr.CacheManagerError) as e:
                sa.transfer_sequence("r1", b_address, old_token, "s-1", move=True)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "earlier cachemgrd" in e.value.message
        assert sorted(s.sequence_id for s in sa.list_sequences()) == ["r1", "r2", "r3"]
        assert all(sa.get_sequence(f"r{i}").busy == "" for i in (1, 2, 3))
        # Retries against a new session succeed, each sequence once.
        with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=256) as sb:
            for i in (1, 2, 3):
                before = digests(sa, f"r{i}")
                sa.transfer_sequence(f"r{i}", b_address, sb.session_token, f"s-{i}", move=True)
                assert digests(sb, f"r{i}") == before
            assert sa.list_sequences() == []
    assert used_blocks(a) == 0


def raw_chunks(header_fields, rows=(), end=None):
    chunks = []
    if header_fields is not None:
        chunks.append(pb.SequenceChunk(header=pb.SequenceImageHeader(**header_fields)))
    chunks.extend(pb.SequenceChunk(rows=r) for r in rows)
    if end is not None:
        chunks.append(pb.SequenceChunk(end=pb.SequenceImageEnd(layer_digests=end)))
    return chunks


def test_a_hostile_stream_leaves_nothing_behind(pair):
    """Peer.ReceiveSequence driven by hand, as a broken or hostile peer would: every bad stream
    is refused naming what is wrong, and the receiver holds nothing of it."""
    a, b, _, b_address = pair
    with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=64) as sb:
        channel = grpc.insecure_channel(b_address)
        stub = pb_grpc.PeerStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        header = dict(transfer_id="h-1", destination_session_token=sb.session_token,
                      destination_sequence_id="evil", num_layers=3, num_kv_heads=2, head_dim=8,
                      dtype=pb.DTYPE_FP32, num_positions=4,
                      layers=[pb.SequenceImageLayer(num_tokens=4)] * 3)

        def row(layer, first=0, n=4, size=None):
            size = n * 2 * 8 * 4 if size is None else size
            return pb.SequenceRows(layer=layer, first_row=first, num_rows=n, keys=b"\0" * size,
                                   values=b"\0" * size)
        cases = [
            (raw_chunks(None, [row(0)]), grpc.StatusCode.INVALID_ARGUMENT, "before the header"),
            (raw_chunks(header, [row(0), row(1), row(2)]), grpc.StatusCode.ABORTED,
             "before its end"),
            (raw_chunks(header, [row(0, size=7)]), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
            (raw_chunks(header, [row(0, first=2, n=2)]), grpc.StatusCode.INVALID_ARGUMENT,
             "first_row"),
            (raw_chunks(header, [row(5)]), grpc.StatusCode.INVALID_ARGUMENT, "layer"),
            (raw_chunks(header, [row(0), row(1)], end=[0, 0, 0]),
             grpc.StatusCode.INVALID_ARGUMENT, "received 0 of its 4 rows"),
            (raw_chunks(header, [row(0), row(1), row(2)], end=[1, 2, 3]),
             grpc.StatusCode.DATA_LOSS, "digest"),
            (raw_chunks({**header, "num_positions": 5}), grpc.StatusCode.INVALID_ARGUMENT,
             "header.layers[0]"),
            (raw_chunks({**header, "num_layers": 2}), grpc.StatusCode.INVALID_ARGUMENT,
             "header"),
            (raw_chunks({**header, "dtype": 9}), grpc.StatusCode.INVALID_ARGUMENT,
             "header.dtype"),
            (raw_chunks({**header, "transfer_id": ""}), grpc.StatusCode.INVALID_ARGUMENT,
             "transfer_id"),
            (raw_chunks({**header, "destination_session_token": "forged"}),
             grpc.StatusCode.NOT_FOUND, "session_token"),
            (raw_chunks(header) * 2, grpc.StatusCode.INVALID_ARGUMENT, "one header"),
            (raw_chunks(header) + [pb.SequenceChunk(coded=pb.CodedLayerImage(layer=0))],
             grpc.StatusCode.INVALID_ARGUMENT, "not a coded layer"),
            (raw_chunks({**header,
                         "layers": [pb.SequenceImageLayer(num_tokens=4, coded=True)] * 3}),
             grpc.StatusCode.INVALID_ARGUMENT, "only a compressed sequence"),
        ]
        for i, (chunks, code, words) in enumerate(cases):
            for c in chunks:
                if c.HasField("header") and c.header.transfer_id:
                    c.header.transfer_id = f"h-{i}"
            with pytest.raises(grpc.RpcError) as e:
                stub.ReceiveSequence(iter(chunks), metadata=auth, timeout=10)
            assert e.value.code() == code, (i, e.value)
            assert words in e.value.details(), (i, e.value.details())
            assert sb.list_sequences() == [], i
        assert used_blocks(b) == 0
        # Without the cluster credential: refused before any handler.
        with pytest.raises(grpc.RpcError) as e:
            stub.ReceiveSequence(iter(raw_chunks(header)), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Over the Unix socket (a local user with someone's token): refused.
        local = pb_grpc.PeerStub(grpc.insecure_channel(f"unix://{b.socket}"))
        with pytest.raises(grpc.RpcError) as e:
            local.ReceiveSequence(iter(raw_chunks(header)), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert sb.list_sequences() == []
