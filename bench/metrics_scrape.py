"""Cost of one Prometheus scrape of cachemgrd's --metrics_address, per daemon binary.

For each binary given (e.g. a build before and after a change), in alternating rounds: start it
with --metrics_address=127.0.0.1:0, attach 4 clients (4 pools of a 32-layer model, so 128
series per per-layer gauge), allocate and free through each (RPC counters and histograms), then
scrape /metrics over a fresh connection N times in a row, like Prometheus (which also sends
"Accept-Encoding: gzip": --gzip). Prints per binary: response bytes (as sent), scrape wall time
(p50/p99, milliseconds) and the daemon's CPU time per scrape (utime+stime from /proc/PID/stat
over all N scrapes).

    .venv/bin/python bench/metrics_scrape.py --scrapes=1000 --rounds=2 [--gzip] BEFORE AFTER

Needs the Python client (scripts/test-venv.sh's .venv). Only the loopback interface is used.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request

import cachemgr

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def start(binary, workdir):
    socket_path = os.path.join(workdir, "cachemgr.sock")
    log_path = os.path.join(workdir, "daemon.log")
    proc = subprocess.Popen([binary, f"--socket={socket_path}", "--metrics_address=127.0.0.1:0",
                             "--memory_budget=4G"],
                            stderr=open(log_path, "w"))
    deadline = time.time() + 10
    while time.time() < deadline:
        m = re.search(r'"metrics_port":(\d+)', open(log_path).read())
        if m:
            return proc, socket_path, int(m.group(1))
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{binary}: no metrics_port in its log")


def measure(binary, scrapes, gzip):
    with tempfile.TemporaryDirectory(prefix="cachemgr-scrape-") as workdir:
        proc, socket_path, port = start(binary, workdir)
        sessions = []
        try:
            for i in range(4):
                model = cachemgr.ModelSpec(name=f"model-{i}", num_layers=32, num_q_heads=4,
                                           num_kv_heads=2, head_dim=8, dtype="fp16",
                                           block_size=16, layout="flash_attn")
                s = cachemgr.Session.attach(socket_path, f"client-{i}", model, num_blocks=64)
                sessions.append(s)
                for j in range(8):
                    s.allocate(f"c{i}-seq-{j}", 40)
                s.free(f"c{i}-seq-0")
            url = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Accept-Encoding": "gzip"} if gzip else {})
            size = len(urllib.request.urlopen(url, timeout=10).read())  # warm up
            times = []
            cpu0 = cpu_seconds(proc.pid)
            for _ in range(scrapes):
                t0 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
                times.append(time.perf_counter() - t0)
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            for s in sessions:
                s.detach()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    times.sort()
    return size, statistics.median(times), times[int(0.99 * (len(times) - 1))], cpu / scrapes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gzip", action="store_true", help="ask for a gzip-encoded response")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    print(f"{'binary':<48} {'round':>5} {'bytes':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'daemon CPU ms/scrape':>21}")
    for rnd in range(args.rounds):
        for binary in args.binaries:
            size, p50, p99, cpu = measure(binary, args.scrapes, args.gzip)
            print(f"{binary:<48} {rnd + 1:>5} {size:>7} {p50 * 1e3:>7.3f} {p99 * 1e3:>7.3f} "
                  f"{cpu * 1e3:>21.3f}")


if __name__ == "__main__":
    main()
