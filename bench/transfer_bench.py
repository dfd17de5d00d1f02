"""The host transport of transfers between daemons (docs/MULTINODE.md "Measured"), in one run:

- throughput: TransferSequence of a sequence of --mib MiB between two real daemons on loopback
  TCP (A's worker reads the rows from its pool, streams them, B writes them into its pool and
  checks the digests), beside a raw socket copy of the same bytes between two threads of this
  process (1 MiB sends into a preallocated buffer: the floor any transport on this machine has);
- control-plane cost: a transfer of a one-token sequence (header, one row, end, the digests and
  both daemons' bookkeeping), beside a GetSequence round trip to the same daemon.

    python3 bench/transfer_bench.py --cachemgrd build/cachemgr/cachemgrd [--mib 64] [--repeats 5]
        [--row_link socket]

With --row_link socket both daemons run --row_links=socket, so the rows cross beside the stream
over a socket row link (docs/MULTINODE.md "Row links") and every transfer must say so.

Needs the Python client (scripts/test-venv.sh has it).
"""

import argparse
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import cachemgr

TOKEN = "transfer-bench-token-0123456789"
LAYERS, HEADS, DIM = 30, 3, 64  # SmolLM2-135M's KV shape, fp32: 1,536 bytes a row (K or V)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(binary, workdir, name, port, peer_port, token_file, extra=()):
    sock = os.path.join(workdir, f"{name}.sock")
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    p = subprocess.Popen([binary, f"--socket={sock}", f"--tcp_address=127.0.0.1:{port}",
                          "--tcp_plaintext_loopback", f"--tcp_token_file={token_file}",
                          f"--peers=127.0.0.1:{peer_port}", "--peer_probe_interval_ms=200",
                          f"--node_name={name}", "--memory_budget=4G", *extra],
                         stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError(f"{name} did not start: see {log.name}")
        time.sleep(0.05)
    return p, sock


def raw_socket_seconds(nbytes):
    """Seconds to push `nbytes` through a loopback TCP connection into a preallocated buffer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sink = bytearray(nbytes)
    done = threading.Event()

    def receive():
        conn, _ = server.accept()
        view = memoryview(sink)
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(1 << 20, nbytes - got))
            if n == 0:
                break
            got += n
        conn.close()
        done.set()

    t = threading.Thread(target=receive)
    t.start()
    payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    client = socket.create_connection(server.getsockname())
    start = time.perf_counter()
    view = memoryview(payload)
    for off in range(0, nbytes, 1 << 20):
        client.sendall(view[off:off + (1 << 20)])
    done.wait()
    seconds = time.perf_counter() - start
    client.close()
    t.join()
    server.close()
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cachemgrd", required=True)
    ap.add_argument("--mib", type=int, default=64, help="payload (K and V) of the big sequence")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", type=int, default=50, help="one-token transfers to time")
    ap.add_argument("--row_link", choices=["", "socket"], default="",
                    help="rows over this row link kind (default: on the stream)")
    args = ap.parse_args()
    extra = (["--row_links=socket", "--row_link_host=127.0.0.1"] if args.row_link else [])

    row_pair = 2 * HEADS * DIM * 4
    tokens = max(1, (args.mib << 20) // (row_pair * LAYERS))
    payload = tokens * LAYERS * row_pair
    model = cachemgr.ModelSpec(name="bench", num_layers=LAYERS, num_q_heads=9, num_kv_heads=HEADS,
                               head_dim=DIM, dtype="fp32", block_size=16)
    blocks = (tokens + 15) // 16 + 64
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as work:
        token_file = pathlib.Path(work, "token")
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        port_a, port_b = free_port(), free_port()
        a, sock_a = start_daemon(args.cachemgrd, work, "a", port_a, port_b, token_file, extra)
        b, sock_b = start_daemon(args.cachemgrd, work, "b", port_b, port_a, token_file, extra)
        try:
            sa = cachemgr.Session.attach(sock_a, "bench-a", model, num_blocks=blocks)
            sb = cachemgr.Session.attach(sock_b, "bench-b", model, num_blocks=blocks)
            alloc = sa.allocate("big", tokens)
            rng = np.random.default_rng(1)
            for layer in range(LAYERS):
                kv = rng.standard_normal((2, tokens, HEADS, DIM)).astype(np.float32)
                sa.pool.write(layer, alloc.layers[layer].slot_mapping, kv[0], kv[1])
            sa.allocate("one", 1)
            deadline = time.monotonic() + 20
            while True:  # A's prober must have seen B up
                try:
                    sa.transfer_sequence("one", "b", sb.session_token, "warmup")
                    sb.free("one")
                    break
                except cachemgr.CacheManagerError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

            transfer, raw = [], []
            for i in range(args.repeats):  # alternated, so drift hits both sides alike
                start = time.perf_counter()
                r = sa.transfer_sequence("big", "b", sb.session_token, f"big-{i}",
                                         timeout_ms=600000)
                transfer.append(time.perf_counter() - start)
                assert r.payload_bytes == payload, (r.payload_bytes, payload)
                assert r.row_link == args.row_link, r
                sb.free("big")
                raw.append(raw_socket_seconds(payload))
            small, get = [], []
            for i in range(args.small):
                start = time.perf_counter()
                sa.transfer_sequence("one", "b", sb.session_token, f"one-{i}")
                small.append(time.perf_counter() - start)
                sb.free("one")
                start = time.perf_counter()
                sa.get_sequence("one")
                get.append(time.perf_counter() - start)
            wire = r.wire_bytes
            sa.detach()
            sb.detach()
        finally:
            for p in (a, b):
                p.terminate()
                p.wait(timeout=15)

    gbps = lambda s: payload / s / 1e9  # noqa: E731
    best_t, best_r = min(transfer), min(raw)
    print(f"rows over: {args.row_link or 'the stream'}")
    stream = (f"stream {wire / 2**10:.1f} KiB (the rows over the link)" if args.row_link else
              f"wire {wire / 2**20:.1f} MiB (+{100 * (wire - payload) / payload:.2f}%)")
    print(f"payload {payload / 2**20:.1f} MiB ({tokens} tokens x {LAYERS} layers, fp32), "
          f"{stream}")
    print(f"transfer  best {best_t * 1e3:8.1f} ms  {gbps(best_t):6.2f} GB/s   "
          f"median {statistics.median(transfer) * 1e3:8.1f} ms")
    print(f"raw TCP   best {best_r * 1e3:8.1f} ms  {gbps(best_r):6.2f} GB/s   "
          f"median {statistics.median(raw) * 1e3:8.1f} ms")
    print(f"transfer / raw socket throughput (best of each): {best_r / best_t:.2f}")
    s50, s99 = np.percentile(small, 50) * 1e3, np.percentile(small, 99) * 1e3
    g50 = np.percentile(get, 50) * 1e3
    print(f"one-token transfer p50 {s50:.2f} ms p99 {s99:.2f} ms; GetSequence p50 {g50:.3f} ms "
          f"(control plane per transfer ~{s50 / g50:.1f} round trips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
