"""Row links (docs/MULTINODE.md, "Row links"): transfers whose rows travel beside the
ReceiveSequence stream over a link the sender offers in the header. Two real daemons with
--row_links=socket (the CPU twin of the NCCL link: the same offer, join, reuse, deadline and
abort, over TCP): the rows arrive byte for byte (digests), the stream carries only the header,
the coded layers and the end, a link is kept and reused by the next transfer to the same
session, a daemon without links gets the stream, and a receiver that stalls or dies mid-link,
or a hostile header, leaves both daemons consistent with nothing leaked."""

import concurrent.futures
import signal
import time

import grpc
import numpy as np
import pytest

import cachemgr
from cachemgr.v1 import cachemgr_pb2 as pb
from cachemgr.v1 import cachemgr_pb2_grpc as pb_grpc

from test_cachemgrctl import ctl
from test_peers import free_port, peer, peer_in_state, token_file, wait_for
from test_transfer import TOKEN, digests, fill, model, stop, used_blocks


def linked(b_links=("--row_links=socket", "--row_link_host=127.0.0.1")):
    @pytest.fixture
    def fixture(daemon_factory, tmp_path):
        token = token_file(tmp_path, "token", TOKEN)
        port_a, port_b = free_port(), free_port()
        common = ["--tcp_plaintext_loopback", f"--tcp_token_file={token}",
                  "--peer_probe_interval_ms=200"]
        b = daemon_factory(f"--tcp_address=127.0.0.1:{port_b}", f"--peers=127.0.0.1:{port_a}",
                           "--node_name=node-b", *common, *b_links)
        # Small link messages: a sequence of a few hundred rows takes several.
        a = daemon_factory(f"--tcp_address=127.0.0.1:{port_a}", f"--peers=127.0.0.1:{port_b}",
                           "--node_name=node-a", "--row_links=socket",
                           "--row_link_host=127.0.0.1", "--row_link_chunk_bytes=4096", *common)
        wait_for("A to see B", peer_in_state(a, f"127.0.0.1:{port_b}", "PEER_STATE_UP"))
        return a, b, f"127.0.0.1:{port_b}"
    return fixture


pair = linked()
pair_b_without_links = linked(b_links=())


def test_rows_cross_the_link_and_the_link_is_reused(pair):
    a, b, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=512) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(block_size=8), num_blocks=512) as sb:
        assert peer(a, b_address)["row_links"] == ["socket"]
        table = ctl(a, "peers").stdout
        assert "ROW_LINKS" in table and any(
            line.startswith(b_address) and line.split()[-1] == "socket"
            for line in table.splitlines())
        fill(sa, "req-1", 301, seed=1)  # 301 rows of 128 bytes (K and V): 10 link messages
        fill(sa, "req-2", 5, seed=2)
        first = sa.transfer_sequence("req-1", b_address, sb.session_token, "t-1",
                                     destination_sequence_id="copy-1")
        assert first.row_link == "socket" and not first.row_link_reused
        # Every row's K and V crossed, over the link: the stream held the header and the end.
        assert first.payload_bytes == 2 * 3 * 301 * 2 * 8 * 4
        assert first.wire_bytes < 1024, first
        assert digests(sb, "copy-1") == digests(sa, "req-1")
        # The next transfer to the same session takes the same link, no new rendezvous; a move.
        second = sa.transfer_sequence("req-2", "node-b", sb.session_token, "t-2", move=True)
        assert second.row_link == "socket" and second.row_link_reused
        assert second.source_released and digests(sb, "req-2")
        assert [s.sequence_id for s in sa.list_sequences()] == ["req-1"]
        # A retry is answered from the ledger, as on the stream.
        again = sa.transfer_sequence("req-1", b_address, sb.session_token, "t-1",
                                     destination_sequence_id="copy-1")
        assert again.replayed and again.layer_digests == first.layer_digests
        # Sequences on another session of B: another link (the receiver's device may differ).
        with cachemgr.Session.attach(b.socket, "decode-2", model(block_size=8), num_blocks=64) as sc:
            third = sa.transfer_sequence("req-1", b_address, sc.session_token, "t-3")
            assert third.row_link == "socket" and not third.row_link_reused
            assert digests(sc, "req-1") == digests(sa, "req-1")
        sb.free("copy-1")
        sb.free("req-2")
    assert used_blocks(a) == 0 and used_blocks(b) == 0


def test_compressed_and_coded_sequences_take_the_link_as_held(pair):
    a, b, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(dtype="bf16"), num_blocks=256) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(dtype="bf16"), num_blocks=256) as sb:
        fill(sa, "req", 96, seed=3)
        r = sa.compress("req", cachemgr.Policy(preset="streamingllm", window=8), reserve_ratio=0.5)
        sent = sa.transfer_sequence("req", b_address, sb.session_token, "t-c")
        assert sent.row_link == "socket"
        assert sent.payload_bytes == sum(layer.bytes_held for layer in r.layers)
        info = sb.get_sequence("req", include_kv_digest=True)
        assert info.compressed and info.compression_policy == "streamingllm"
        assert [l.kv_digest for l in info.layers] == digests(sa, "req")
        assert ([f.positions.tolist() for f in sb.fetch("req")] ==
                [f.positions.tolist() for f in sa.fetch("req")])

        # A codebook sequence: the coded layers ride the stream, the plain ones the link.
        alloc = sa.allocate("cb", 48)
        rng = np.random.default_rng(5)
        directions = rng.standard_normal((3, 2, 8)).astype(np.float32)
        for layer in range(3):
            pick = rng.integers(0, 3, 48)
            scale = rng.uniform(0.5, 2.0, (48, 1, 1)).astype(np.float32)
            k = cachemgr.float32_to_bf16(directions[pick] * scale)
            v = cachemgr.float32_to_bf16(directions[(pick + 1) % 3] * scale)
            sa.pool.write(layer, alloc.layers[layer].slot_mapping, k, v)
        r = sa.compress("cb", cachemgr.Policy(preset="codebook"), reserve_ratio=1.0,
                        scores=np.ones((3, 4, 48), dtype=np.float32))
        held = sa.get_sequence("cb")
        assert any(l.codebook for l in held.layers)
        sent = sa.transfer_sequence("cb", b_address, sb.session_token, "t-cb")
        assert sent.row_link == "socket" and sent.row_link_reused
        assert sent.payload_bytes == sum(layer.bytes_held for layer in r.layers)
        sa.fetch("cb")
        sb.fetch("cb")
        assert digests(sb, "cb") == digests(sa, "cb")


def test_a_daemon_without_links_gets_the_stream(pair_b_without_links):
    a, b, b_address = pair_b_without_links
    assert peer(a, b_address).get("row_links", []) == []
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=64) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=64) as sb:
        fill(sa, "req", 37, seed=4)
        sent = sa.transfer_sequence("req", b_address, sb.session_token, "t")
        assert sent.row_link == "" and sent.wire_bytes > sent.payload_bytes
        assert digests(sb, "req") == digests(sa, "req")


def test_a_stalled_receiver_fails_the_link_within_the_deadline(pair):
    a, b, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=16400) as sa, \
            cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=16400) as sb:
        fill(sa, "warm", 4, seed=5)
        assert sa.transfer_sequence("warm", b_address, sb.session_token, "w",
                                    move=True).row_link == "socket"
        fill(sa, "long", 65536, seed=6)  # 8 MiB of rows: more than the socket buffers hold
        before = digests(sa, "long")
        stop(b)
        try:
            start = time.monotonic()
            with pytest.raises(cachemgr.CacheManagerError) as e:
                sa.transfer_sequence("long", b_address, sb.session_token, "t-stall", move=True,
                                     timeout_ms=1500)
            took = time.monotonic() - start
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
            assert 1.4 < took < 5, took
        finally:
            b.process.send_signal(signal.SIGCONT)
        assert digests(sa, "long") == before and sa.get_sequence("long").busy == ""
        wait_for("B to drop the partial transfer",
                 lambda: [s.sequence_id for s in sb.list_sequences()] == ["warm"])
        # The failed link was closed on both sides: the retry offers a new one.
        wait_for("A to see B up again", peer_in_state(a, b_address, "PEER_STATE_UP"))
        moved = sa.transfer_sequence("long", b_address, sb.session_token, "t-stall", move=True)
        assert moved.source_released and moved.row_link == "socket"
        assert not moved.row_link_reused
        assert digests(sb, "long") == before


def test_a_receiver_killed_mid_link_and_restarted(pair):
    a, b, b_address = pair
    with cachemgr.Session.attach(a.socket, "prefill", model(), num_blocks=16384) as sa:
        fill(sa, "long", 65536, seed=7)
        before = digests(sa, "long")
        with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=16384) as sb:
            old_boot = peer(a, b_address)["boot_id"]
            stop(b)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                inflight = pool.submit(sa.transfer_sequence, "long", b_address, sb.session_token,
                                       "k-1", move=True, timeout_ms=20000)
                time.sleep(0.5)
                assert not inflight.done()
                b.kill()
                with pytest.raises(cachemgr.CacheManagerError) as e:
                    inflight.result(timeout=10)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
        assert digests(sa, "long") == before and sa.get_sequence("long").busy == ""
        b.restart()
        wait_for("A to see B back", lambda: (peer_in_state(a, b_address, "PEER_STATE_UP")() or {})
                 .get("boot_id", old_boot) != old_boot)
        with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=16384) as sb:
            moved = sa.transfer_sequence("long", b_address, sb.session_token, "k-1", move=True)
            assert moved.row_link == "socket" and not moved.row_link_reused
            assert digests(sb, "long") == before
    assert used_blocks(a) == 0


def header_chunk(token, row_link, transfer_id="h-1", tokens=8):
    h = pb.SequenceImageHeader(
        transfer_id=transfer_id, destination_session_token=token,
        destination_sequence_id="evil", sender_boot_id="0" * 16, num_layers=3, num_kv_heads=2,
        head_dim=8, dtype=pb.DTYPE_FP32, num_positions=tokens,
        layers=[pb.SequenceImageLayer(num_tokens=tokens) for _ in range(3)], row_link=row_link)
    return pb.SequenceChunk(header=h)


def test_a_hostile_row_link_header_names_the_field_and_leaves_nothing(pair):
    a, b, b_address = pair
    channel = grpc.insecure_channel(b_address)
    stub = pb_grpc.PeerStub(channel)
    auth = [("authorization", f"Bearer {TOKEN}")]
    with cachemgr.Session.attach(b.socket, "decode", model(), num_blocks=64) as sb:
        cases = [
            (pb.RowLinkOffer(kind="carrier-pigeon", link_id="l1", offer=b"x", chunk_rows=4),
             grpc.StatusCode.FAILED_PRECONDITION, "header.row_link.kind"),
            (pb.RowLinkOffer(kind="socket", link_id="", offer=b"x", chunk_rows=4),
             grpc.StatusCode.INVALID_ARGUMENT, "header.row_link.link_id"),
            (pb.RowLinkOffer(kind="socket", link_id="l1", offer=b"x", chunk_rows=0),
             grpc.StatusCode.INVALID_ARGUMENT, "header.row_link.chunk_rows"),
            (pb.RowLinkOffer(kind="socket", link_id="l1", offer=b"x", chunk_rows=1 << 30),
             grpc.StatusCode.INVALID_ARGUMENT, "header.row_link.chunk_rows"),
            (pb.RowLinkOffer(kind="socket", link_id="never-joined", chunk_rows=4),
             grpc.StatusCode.FAILED_PRECONDITION, "header.row_link.link_id"),
            (pb.RowLinkOffer(kind="socket", link_id="l1", offer=b"not an offer", chunk_rows=4),
             grpc.StatusCode.INVALID_ARGUMENT, "header.row_link.offer"),
            # An offer nobody listens at: the join fails, within the call.
            (pb.RowLinkOffer(kind="socket", link_id="l1",
                             offer=f"127.0.0.1 {free_port()} {'0' * 32}".encode(), chunk_rows=4),
             grpc.StatusCode.UNAVAILABLE, "row link"),
        ]
        for i, (offer, code, field) in enumerate(cases):
            chunks = [header_chunk(sb.session_token, offer, transfer_id=f"h-{i}"),
                      pb.SequenceChunk(end=pb.SequenceImageEnd(layer_digests=[0, 0, 0]))]
            with pytest.raises(grpc.RpcError) as e:
                stub.ReceiveSequence(iter(chunks), metadata=auth, timeout=10)
            assert e.value.code() == code, (i, e.value)
            assert field in e.value.details(), (i, e.value.details())
        # Rows on the stream of a linked transfer are refused.
        chunks = [header_chunk(sb.session_token, pb.RowLinkOffer(
                      kind="socket", link_id="l2",
                      offer=f"127.0.0.1 {free_port()} {'0' * 32}".encode(), chunk_rows=4),
                      transfer_id="h-rows"),
                  pb.SequenceChunk(rows=pb.SequenceRows(layer=0, first_row=0, num_rows=1,
                                                        keys=b"\0" * 64, values=b"\0" * 64))]
        with pytest.raises(grpc.RpcError) as e:
            stub.ReceiveSequence(iter(chunks), metadata=auth, timeout=10)
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
        assert sb.list_sequences() == []
    wait_for("B to hold nothing", lambda: used_blocks(b) == 0 and
             cachemgr.stats(b.socket).num_sequences == 0)
    channel.close()
