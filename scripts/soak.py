#!/usr/bin/env python3
"""Soak and chaos run of cachemgrd: many chaos clients, random faults, invariants checked throughout.

Starts the real cachemgrd (short lease, quarantine, --check_invariants_ms so the daemon checks its
own books and aborts on a violation), spawns --clients cachemgr-chaos processes (every fourth as
uid 65534 when run as root) doing random operations on their own sequences and checking every
answer and every KV byte against their own model, and meanwhile injects faults at random:

  client_kill        SIGKILL a client (it is respawned with a new seed)
  client_stop_short  SIGSTOP a client for less than its lease, then SIGCONT
  client_stop_long   SIGSTOP a client past its lease (its blocks go to quarantine) but for less
                     than the quarantine, then SIGCONT (it finds its session lost, re-attaches)
  daemon_kill        SIGKILL the daemon and start it again on the same socket
  daemon_term        SIGTERM the daemon (graceful shutdown) and start it again
  operator_free      free a client's sequence as the operator (cachemgrctl free; its blocks are
                     quarantined), among those the clients mark as fair game (ids ".o<n>")
  watcher_stop       SIGSTOP the operator's event stream (cachemgrctl watch, running all along)
                     for 1-20 s, so the daemon queues events for it or drops it

Every --check_interval seconds, with the operator credential (cachemgrctl stats --json): free +
used + quarantined == capacity on every layer of every pool, shared <= used, memory used <=
budget; and the daemon's RSS and open descriptors from /proc. Daemon faults happen in the first
--daemon_faults_until of the first phase only. At the end of the phase every client is stopped
(SIGTERM: it checks its live sequences once more, detaches and reports), leases and quarantines
run out, and then no pool, client, sequence or used byte may be left (a quiet point, where the
daemon's RSS and descriptors are sampled). A second wave of clients (--second_wave of the
duration, client faults only) then runs on the same daemon up to a second quiet point: memory or
descriptors that grow from one quiet point to the next with the work done are a leak. Last, the
daemon is stopped with SIGTERM and must exit 0 with no invariant violated.

Exit status 0 when no corruption (a client's digest or byte mismatch, an accounting violation,
a daemon invariant violation), no anomaly (an error no request invites), no stuck or crashed
client and no unexpected daemon exit was seen; 1 otherwise; 2 for bad arguments.

  scripts/soak.py --duration=600 --clients=16 --seed=1        # after scripts/build.sh
  scripts/soak.py --duration=40 --clients=6 --json             # what CTest's soak_short runs

Needs only Python's standard library, util-linux's setpriv, and the build's cachemgrd,
cachemgrctl and cachemgr-chaos.
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

MODELS = ("soak-a", "soak-b", "soak-c")
NOBODY = 65534
FAULT_KINDS = ("client_kill", "client_stop_short", "client_stop_long", "daemon_kill",
               "daemon_term", "operator_free", "watcher_stop")
OPERATOR_FAIR = re.compile(r"\.o[0-9]+$")  # ids the clients let the operator free


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="See the module docstring (head -40 scripts/soak.py) and docs/RELIABILITY.md.")
    p.add_argument("--build_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "..", "build"),
                   help="the build with cachemgrd, cachemgrctl and cachemgr-chaos (default build/)")
    p.add_argument("--duration", type=float, default=60, help="seconds of chaos (default 60)")
    p.add_argument("--clients", type=int, default=8, help="chaos client processes (default 8)")
    p.add_argument("--seed", type=int, default=1, help="seeds faults and clients (default 1)")
    p.add_argument("--lease_ms", type=int, default=1500, help="--lease_timeout_ms (default 1500)")
    p.add_argument("--quarantine_ms", type=int, default=0,
                   help="--quarantine_ms (default 4 x lease)")
    p.add_argument("--client_kill_rate", type=float, default=6,
                   help="client SIGKILLs per minute (default 6)")
    p.add_argument("--client_stop_rate", type=float, default=8,
                   help="client SIGSTOPs per minute, half past the lease (default 8)")
    p.add_argument("--daemon_restart_rate", type=float, default=2,
                   help="daemon SIGKILLs or SIGTERMs per minute (default 2)")
    p.add_argument("--operator_free_rate", type=float, default=10,
                   help="operator frees of marked sequences per minute (default 10)")
    p.add_argument("--watcher_stop_rate", type=float, default=2,
                   help="SIGSTOPs of the event watcher per minute (default 2)")
    p.add_argument("--daemon_faults_until", type=float, default=0.5,
                   help="fraction of the first phase after which the daemon is left alone "
                        "(default 0.5)")
    p.add_argument("--second_wave", type=float, default=0.25,
                   help="fraction of --duration for a second wave of clients on the same daemon "
                        "after the first quiet point, without daemon faults, so that the daemon's "
                        "RSS and descriptors at two quiet points compare (default 0.25)")
    p.add_argument("--check_interval", type=float, default=2,
                   help="seconds between accounting checks and RSS samples (default 2)")
    p.add_argument("--check_invariants_ms", type=int, default=200,
                   help="the daemon's own --check_invariants_ms (default 200; 0: off)")
    p.add_argument("--max_live", type=int, default=8,
                   help="live sequences per client worker (default 8)")
    p.add_argument("--threads", type=int, default=2,
                   help="workers sharing one session in every other client (default 2)")
    p.add_argument("--uids", choices=("auto", "none"), default="auto",
                   help="auto: every fourth client as uid 65534 when root (default); none")
    p.add_argument("--work_dir", default="",
                   help="where sockets and logs go (default: a new directory in /tmp, removed "
                        "after a passing run)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--self_test_corruption", action="store_true",
                   help="a self-test of the checks: client c00 flips one K byte of its own "
                        "sequence behind its model's back 3 s after each start (each quiet point "
                        "waits up to 60 s for one to be caught), so the run must FAIL with a "
                        "corruption")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.clients < 1 or args.lease_ms < 200:
        p.error("--duration must be > 0, --clients >= 1, --lease_ms >= 200")
    if not args.quarantine_ms:
        args.quarantine_ms = 4 * args.lease_ms
    if args.quarantine_ms < args.lease_ms:
        p.error("--quarantine_ms must be at least --lease_ms")
    return args


def now():
    return time.monotonic()


def pdeathsig_prefix(uid=None):
    """setpriv: the child dies with this process; as `uid` (no supplementary groups) if given."""
    prefix = ["setpriv", "--pdeathsig=KILL"]
    if uid is not None:
        prefix += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return prefix + ["--"]


def world_executable(path):
    """Whether another uid can run `path`: the file and every directory above it are o+x."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class Histogram:
    """Merged latency buckets of the clients: bucket i holds latencies below 2^((i+1)/8) us."""

    def __init__(self):
        self.buckets = collections.Counter()

    def add(self, buckets):
        for b, n in buckets.items():
            self.buckets[int(b)] += n

    def count(self):
        return sum(self.buckets.values())

    def percentile(self, p):
        total = self.count()
        if total == 0:
            return None
        rank = math.ceil(p / 100.0 * total)
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return 2 ** ((b + 1) / 8.0)  # the bucket's upper bound, us
        return None


class Report:
    """Everything the clients said, merged. Thread-safe (reader threads add, the main thread
    reads)."""

    def __init__(self, events_path):
        self.lock = threading.Lock()
        self.outcomes = collections.defaultdict(collections.Counter)
        self.latency = collections.defaultdict(Histogram)
        self.totals = {}  # (client, incarnation) -> the last totals it reported
        self.corruptions = []
        self.anomalies = []
        self.stuck = []
        self.event_counts = collections.Counter()
        self.events = open(events_path, "a", encoding="utf-8")

    def add(self, client, incarnation, line):
        try:
            e = json.loads(line)
        except ValueError:
            e = {"event": "unparseable", "line": line[:200]}
        kind = e.get("event", "?")
        with self.lock:
            self.event_counts[kind] += 1
            if kind != "stats":
                self.events.write(json.dumps(e, sort_keys=True) + "\n")
            if kind in ("stats", "done"):
                for op, d in e.get("ops", {}).items():
                    self.outcomes[op].update(d.get("outcomes", {}))
                    self.latency[op].add(d.get("latency_buckets", {}))
                if "totals" in e:
                    self.totals[(client, incarnation)] = e["totals"]
            elif kind == "corruption":
                self.corruptions.append(e)
            elif kind in ("anomaly", "unparseable", "error"):
                self.anomalies.append(e)
            elif kind == "stuck":
                self.stuck.append(e)

    def total(self, key):
        with self.lock:
            return sum(t.get(key, 0) for t in self.totals.values())


class Client:
    """One chaos client slot; respawned with a new incarnation after each kill."""

    def __init__(self, soak, index, uid):
        self.soak = soak
        self.index = index
        self.uid = uid
        self.name = f"c{index:02d}"
        self.model = MODELS[index % len(MODELS)]
        self.threads = soak.args.threads if index % 2 == 1 else 1
        self.incarnation = -1
        self.proc = None
        self.reader = None
        self.stopped_until = None  # SIGCONT time while SIGSTOPped
        self.stderr = open(os.path.join(soak.dir, f"{self.name}.err"), "ab")

    def spawn(self):
        self.incarnation += 1
        seed = self.soak.args.seed * 1000003 + self.index * 1009 + self.incarnation
        cmd = pdeathsig_prefix(self.uid) + [
            self.soak.chaos, f"--socket={self.soak.socket}", f"--name={self.name}",
            f"--model={self.model}", f"--seed={seed}", f"--max_live={self.soak.args.max_live}",
            f"--threads={self.threads}"]
        if self.soak.args.self_test_corruption and self.index == 0:
            cmd.append("--corrupt_after_s=3")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL)
        self.stopped_until = None
        incarnation, proc = self.incarnation, self.proc
        self.reader = threading.Thread(target=self._read, args=(proc, incarnation), daemon=True)
        self.reader.start()

    def _read(self, proc, incarnation):
        for raw in proc.stdout:
            self.soak.report.add(self.name, incarnation, raw.decode("utf-8", "replace").strip())

    def signal(self, sig):
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def running(self):
        return self.proc is not None and self.proc.poll() is None


class Daemon:
    """The cachemgrd under test: started, killed and restarted on the same socket."""

    def __init__(self, soak):
        self.soak = soak
        self.proc = None
        self.starts = 0
        self.log = open(os.path.join(soak.dir, "daemon.log"), "ab")
        a = soak.args
        self.cmd = pdeathsig_prefix() + [
            soak.daemon_path, f"--socket={soak.socket}", f"--lease_timeout_ms={a.lease_ms}",
            f"--heartbeat_interval_ms={max(50, a.lease_ms // 5)}",
            f"--quarantine_ms={a.quarantine_ms}", f"--check_invariants_ms={a.check_invariants_ms}",
            "--shutdown_grace_ms=1000"]
        if soak.other_uid:
            self.cmd.append(f"--allowed_uids={NOBODY}")

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        self.starts += 1

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pid(self):
        return self.proc.pid if self.alive() else None


class Watcher:
    """The operator's event stream (cachemgrctl watch --json), restarted whenever it ends."""

    def __init__(self, soak):
        self.soak = soak
        self.proc = None
        self.streams = 0
        self.events = 0
        self.ended = collections.Counter()  # exit status -> count
        self.stopped_until = None
        self.lock = threading.Lock()
        self.stderr = open(os.path.join(soak.dir, "watch.err"), "ab")

    def start(self):
        self.proc = subprocess.Popen(
            pdeathsig_prefix() + [self.soak.ctl, "watch", "--json", f"--socket={self.soak.socket}"],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.streams += 1
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc):
        for _ in proc.stdout:
            with self.lock:
                self.events += 1

    def tend(self, daemon_serving):
        if self.stopped_until is not None and now() >= self.stopped_until:
            self.proc.send_signal(signal.SIGCONT)
            self.stopped_until = None
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            self.ended[self.proc.returncode] += 1
            self.proc = None
        if daemon_serving:
            self.start()

    def stop_for(self, seconds):
        if self.proc is None or self.proc.poll() is not None or self.stopped_until is not None:
            return False
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped_until = now() + seconds
        return True

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait()
            self.ended[self.proc.returncode] += 1


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        build = os.path.abspath(args.build_dir)
        self.daemon_path = os.path.join(build, "cachemgr", "cachemgrd")
        self.ctl = os.path.join(build, "tools", "cachemgrctl")
        self.chaos = os.path.join(build, "tools", "soak", "cachemgr-chaos")
        for path in (self.daemon_path, self.ctl, self.chaos):
            if not os.access(path, os.X_OK):
                raise SystemExit(f"soak: {path} is missing: build first (scripts/build.sh)")
        self.own_dir = not args.work_dir
        self.dir = args.work_dir or tempfile.mkdtemp(prefix="cachemgr-soak.", dir="/tmp")
        os.makedirs(self.dir, exist_ok=True)
        self.socket = os.path.join(self.dir, "cachemgr.sock")
        self.other_uid = (args.uids == "auto" and os.geteuid() == 0 and args.clients >= 4 and
                          world_executable(self.chaos))
        if self.other_uid:
            os.chmod(self.dir, 0o755)  # uid 65534 reaches the socket (the daemon makes it 0666)
        self.report = Report(os.path.join(self.dir, "events.jsonl"))
        self.daemon = Daemon(self)
        self.watcher = Watcher(self)
        self.operator_frees = collections.Counter()  # OK / the cachemgrctl error
        self.clients = [Client(self, i, NOBODY if self.other_uid and i % 4 == 3 else None)
                        for i in range(args.clients)]
        self.faults = collections.Counter()
        self.failures = []  # sentences: what went wrong besides the clients' reports
        self.violations = []  # accounting violations seen in Stats
        self.stats_checks = 0
        self.samples = []  # the daemon's RSS and descriptors: {t, start, when, rss_kib, fds}
        self.expected_exit = None  # the signal we sent the daemon, while it goes down
        self.restart_at = None
        self.phase_ops = []  # (quiet point, client calls so far)
        self.t0 = now()

    # ---- Daemon --------------------------------------------------------------------------

    def ctl_json(self, *args, timeout=10):
        out = subprocess.run([self.ctl, *args, f"--socket={self.socket}", "--json", "--timeout=5"],
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            return None, (out.stdout + out.stderr).strip()
        return json.loads(out.stdout), None

    def wait_serving(self, seconds=30):
        deadline = now() + seconds
        while now() < deadline:
            if not self.daemon.alive():
                return False
            stats, _ = self.ctl_json("stats")
            if stats is not None:
                return True
            time.sleep(0.1)
        return False

    def start_daemon(self):
        self.daemon.start()
        if not self.wait_serving():
            self.failures.append(f"cachemgrd start {self.daemon.starts} did not serve within 30 s "
                                 f"(see {self.dir}/daemon.log)")
            return False
        self.sample("start")
        return True

    def daemon_fault(self, kind):
        sig = signal.SIGKILL if kind == "daemon_kill" else signal.SIGTERM
        self.faults[kind] += 1
        self.expected_exit = sig
        self.daemon.proc.send_signal(sig)

    def tend_daemon(self):
        """Restarts the daemon after a fault; notices an exit nobody asked for."""
        if self.daemon.alive():
            return
        code = self.daemon.proc.returncode
        if self.expected_exit is not None:
            want = -signal.SIGKILL if self.expected_exit == signal.SIGKILL else 0
            if code != want:
                self.failures.append(f"cachemgrd exited with {code} after "
                                     f"{signal.Signals(self.expected_exit).name}, expected {want}")
            self.expected_exit = None
            self.restart_at = now() + self.rng.uniform(0, 1.0)  # down for a moment
        elif self.restart_at is None:
            self.failures.append(f"cachemgrd exited by itself with {code} "
                                 f"(see {self.dir}/daemon.log)")
            self.restart_at = now()
        if now() >= self.restart_at:
            self.restart_at = None
            self.start_daemon()

    # ---- Checks --------------------------------------------------------------------------

    def sample(self, when):
        pid = self.daemon.pid()
        if pid is None:
            return
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            return
        self.samples.append({"t": round(now() - self.t0, 1), "start": self.daemon.starts,
                             "when": when, "rss_kib": rss, "fds": fds})

    def check_stats(self):
        """The accounting as the operator sees it; returns the Stats (None if unreachable)."""
        if not self.daemon.alive() or self.restart_at is not None:
            return None
        try:
            stats, _ = self.ctl_json("stats")
        except subprocess.TimeoutExpired:
            return None
        if stats is None:
            return None  # down or restarting
        self.stats_checks += 1
        used_bytes = int(stats.get("memory_used_bytes", 0))
        budget = int(stats.get("memory_budget_bytes", 0))
        problems = []
        if used_bytes > budget:
            problems.append(f"memory used {used_bytes} > budget {budget}")
        for pool in stats.get("pools", []):
            for layer in pool.get("layers", []):
                cap, used, free, shared, quar = (int(layer.get(k, 0)) for k in (
                    "capacity_blocks", "used_blocks", "free_blocks", "shared_blocks",
                    "quarantined_blocks"))
                if free + used + quar != cap or shared > used:
                    problems.append(f"pool {pool.get('pool_id')} layer {layer.get('layer', 0)}: "
                                    f"free {free} + used {used} + quarantined {quar} vs capacity "
                                    f"{cap}, shared {shared}")
        if problems:
            self.violations.append({"t": round(now() - self.t0, 1), "problems": problems[:8]})
        return stats

    # ---- Faults --------------------------------------------------------------------------

    def fault(self, kind, daemon_ok):
        if kind == "operator_free":
            if daemon_ok:
                self.operator_free()
        elif kind == "watcher_stop":
            if self.watcher.stop_for(self.rng.uniform(1, 20)):
                self.faults[kind] += 1
        else:
            self.client_fault(kind)

    def pick_client(self):
        candidates = [c for c in self.clients if c.running() and c.stopped_until is None]
        return self.rng.choice(candidates) if candidates else None

    def client_fault(self, kind):
        c = self.pick_client()
        if c is None:
            return
        self.faults[kind] += 1
        if kind == "client_kill":
            c.signal(signal.SIGKILL)
            c.proc.wait()
            c.spawn()
            return
        lease = self.args.lease_ms / 1000.0
        quarantine = self.args.quarantine_ms / 1000.0
        if kind == "client_stop_short":
            pause = self.rng.uniform(0.05, 0.5 * lease)
        else:
            # Past the lease (the daemon expires the client and quarantines its blocks), but
            # shorter than the quarantine by 2 s, so a store the client was about to make lands
            # in quarantined blocks, never in another client's (docs/OPERATIONS.md, "Remaining
            # hazard"): a longer stall is the hazard the docs admit, not a defect.
            longest = max(1.3 * lease, min(2.5 * lease, quarantine - 2.0))
            pause = self.rng.uniform(1.3 * lease, longest)
        c.signal(signal.SIGSTOP)
        c.stopped_until = now() + pause

    def operator_free(self):
        """Frees a marked sequence of some client as the operator."""
        try:
            listed, _ = self.ctl_json("sequences")
            if listed is None:
                return
            fair = [s["sequence_id"] for s in listed.get("sequences", [])
                    if OPERATOR_FAIR.search(s["sequence_id"])]
            if not fair:
                return
            self.faults["operator_free"] += 1
            out = subprocess.run([self.ctl, "free", f"--sequence={self.rng.choice(fair)}",
                                  f"--socket={self.socket}", "--timeout=5"],
                                 capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            self.operator_frees["timeout"] += 1
            return
        # NOT_FOUND: its client freed it first.
        code = re.search(r"\b([A-Z][A-Z_]+):", out.stdout + out.stderr)
        self.operator_frees["OK" if out.returncode == 0 else
                            code.group(1) if code else f"exit {out.returncode}"] += 1

    def resume_clients(self, everyone=False):
        for c in self.clients:
            if c.stopped_until is not None and (everyone or now() >= c.stopped_until):
                c.signal(signal.SIGCONT)
                c.stopped_until = None

    def tend_clients(self):
        for c in self.clients:
            if c.proc.poll() is not None:
                self.failures.append(f"client {c.name} (incarnation {c.incarnation}) exited by "
                                     f"itself with {c.proc.returncode} (see {self.dir}/{c.name}.err)")
                c.spawn()

    # ---- The run -------------------------------------------------------------------------

    def run(self):
        """The chaos, a quiet point, a second wave on the same daemon, a quiet point, the end."""
        a = self.args
        if not self.start_daemon():
            return self.finish(None)
        self.sample("fresh")
        for c in self.clients:
            c.spawn()
        first = a.duration * (1 - a.second_wave)
        self.run_chaos(first, daemon_faults=True)
        final = self.quiesce("quiet_1")
        if a.second_wave > 0 and final is not None:
            for c in self.clients:
                c.spawn()
            self.run_chaos(a.duration * a.second_wave, daemon_faults=False)
            final = self.quiesce("quiet_2")
        self.stop_daemon()
        return self.finish(final)

    def run_chaos(self, seconds, daemon_faults):
        """Clients work while faults are injected at random; checks every --check_interval."""
        a = self.args
        start = now()
        end = start + seconds
        daemon_window_end = start + seconds * a.daemon_faults_until if daemon_faults else start
        next_check = now() + a.check_interval
        tick = 0.05
        rates = {"client_kill": a.client_kill_rate, "client_stop_short": a.client_stop_rate / 2,
                 "client_stop_long": a.client_stop_rate / 2,
                 "operator_free": a.operator_free_rate, "watcher_stop": a.watcher_stop_rate}
        # Kinds still to come by these fractions of the first phase get one injected then, so
        # even a short run sees every kind.
        forced = [(0.25, k) for k in ("client_kill", "client_stop_short", "client_stop_long",
                                      "operator_free", "watcher_stop")]
        if daemon_faults and a.daemon_restart_rate > 0:
            forced += [(0.4 * a.daemon_faults_until, "daemon_kill"),
                       (0.7 * a.daemon_faults_until, "daemon_term")]
        while now() < end:
            time.sleep(tick)
            self.resume_clients()
            self.tend_daemon()
            self.tend_clients()
            daemon_ok = self.daemon.alive() and self.restart_at is None
            self.watcher.tend(daemon_ok)
            for kind, rate in rates.items():
                if self.rng.random() < rate * tick / 60.0:
                    self.fault(kind, daemon_ok)
            if daemon_ok and now() < daemon_window_end and a.daemon_restart_rate > 0:
                if self.rng.random() < a.daemon_restart_rate * tick / 60.0:
                    self.daemon_fault(self.rng.choice(("daemon_kill", "daemon_term")))
                    daemon_ok = False
            for fraction, kind in forced:
                if self.faults[kind] == 0 and now() >= start + fraction * seconds:
                    if kind.startswith("daemon"):
                        if daemon_ok:
                            self.daemon_fault(kind)
                            daemon_ok = False
                    else:
                        self.fault(kind, daemon_ok)
            if now() >= next_check:
                next_check = now() + a.check_interval
                self.check_stats()
                self.sample("run")

    def await_planted_corruption(self):
        """Self-test: a fault may have taken c00's planted corruption away before its check (a
        kill, a lost lease, a daemon restart), and c00 plants again only after it recovers; with
        the faults over, give it the time to plant and catch one before the clients stop."""
        deadline = now() + 60
        while now() < deadline:
            with self.report.lock:
                if self.report.corruptions:
                    return
            time.sleep(0.1)
            self.tend_clients()
        self.failures.append("self-test: c00 planted no corruption it could check within 60 s "
                             "of the quiet point")

    def quiesce(self, label):
        """Stops every client, lets leases and quarantines end, checks that nothing is left,
        and samples the daemon (label). Returns the last Stats."""
        a = self.args
        self.resume_clients(everyone=True)
        self.watcher.close()
        # A daemon fault of the last moments may still be under way (a SIGTERMed daemon shuts
        # down gracefully for up to its grace period): wait for that exit and the restart.
        while not (self.daemon.alive() and self.restart_at is None and
                   self.expected_exit is None):
            time.sleep(0.05)
            self.tend_daemon()
        self.wait_serving()
        if a.self_test_corruption:
            self.await_planted_corruption()
        for c in self.clients:
            c.signal(signal.SIGTERM)
        deadline = now() + 60
        for c in self.clients:
            try:
                c.proc.wait(timeout=max(0.1, deadline - now()))
            except subprocess.TimeoutExpired:
                self.failures.append(f"client {c.name} did not finish within 60 s of SIGTERM")
                c.signal(signal.SIGKILL)
                c.proc.wait()
            if c.proc.returncode not in (0, -signal.SIGKILL):
                self.failures.append(f"client {c.name} ended with {c.proc.returncode} "
                                     f"(see {self.dir}/{c.name}.err)")
            c.reader.join(timeout=10)
        # Leases of killed clients run out, then their quarantines.
        deadline = now() + (a.lease_ms + a.quarantine_ms) / 1000.0 + 20
        final = None
        while now() < deadline:
            final = self.check_stats()
            if final is not None and not final.get("pools") and not final.get("clients") and \
                    int(final.get("memory_used_bytes", 0)) == 0 and \
                    int(final.get("num_sequences", 0)) == 0:
                break
            time.sleep(0.25)
        time.sleep(0.5)
        self.sample(label)
        self.phase_ops.append((label, sum(sum(o.values()) for o in self.report.outcomes.values())))
        if final is None:
            self.failures.append(f"no Stats at {label}")
            return None
        left = []
        for pool in final.get("pools", []):
            for layer in pool.get("layers", []):
                if int(layer.get("used_blocks", 0)) or int(layer.get("quarantined_blocks", 0)):
                    left.append(f"pool {pool.get('pool_id')} layer {layer.get('layer', 0)}: "
                                f"used {layer.get('used_blocks', 0)}, quarantined "
                                f"{layer.get('quarantined_blocks', 0)}")
            left.append(f"pool {pool.get('pool_id')} still exists")
        if final.get("clients"):
            left.append(f"{len(final['clients'])} clients still attached")
        if int(final.get("num_sequences", 0)):
            left.append(f"{final['num_sequences']} sequences left")
        if int(final.get("memory_used_bytes", 0)):
            left.append(f"{final['memory_used_bytes']} bytes still charged to the budget")
        if left:
            self.violations.append({"t": round(now() - self.t0, 1), "at": label,
                                    "problems": left[:8]})
        return final

    def stop_daemon(self):
        """The daemon's own verdict: a clean exit at SIGTERM (no invariant violation aborted it)."""
        if not self.daemon.alive():
            self.failures.append(f"cachemgrd was not running at the end "
                                 f"({self.daemon.proc.returncode})")
            return
        self.daemon.proc.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.proc.kill()
            code = "timeout"
        if code != 0:
            self.failures.append(f"cachemgrd exited with {code} at SIGTERM")

    def daemon_log_findings(self):
        """Invariant checks per daemon start (the last report of each) and violations."""
        checks, violations, start_checks = 0, [], 0
        path = os.path.join(self.dir, "daemon.log")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"msg":"cachemgrd serving"' in line:
                    checks += start_checks
                    start_checks = 0
                elif '"msg":"invariants hold"' in line:
                    try:
                        start_checks = int(json.loads(line).get("checks", 0))
                    except ValueError:
                        pass
                elif '"msg":"invariant violated"' in line:
                    violations.append(line.strip()[:500])
        return checks + start_checks, violations

    def finish(self, final):
        a = self.args
        invariant_checks, invariant_violations = self.daemon_log_findings()
        r = self.report
        ops = {}
        for op in sorted(r.outcomes):
            outcomes = r.outcomes[op]
            hist = r.latency[op]
            p50, p99 = hist.percentile(50), hist.percentile(99)
            ops[op] = {"calls": sum(outcomes.values()), "ok": outcomes.get("OK", 0),
                       "outcomes": dict(sorted(outcomes.items())),
                       "p50_us": round(p50) if p50 else None,
                       "p99_us": round(p99) if p99 else None}
        def at(when):
            return next((dict(s, client_calls_so_far=dict(self.phase_ops).get(when))
                         for s in self.samples if s["when"] == when), None)
        # The first daemon before any client; the daemon at the quiet point after the chaos
        # (clients gone, quarantines over); the same daemon after a second wave.
        resources = {
            "fresh": at("fresh"), "quiet_1": at("quiet_1"), "quiet_2": at("quiet_2"),
            "peak_rss_kib": max((s["rss_kib"] for s in self.samples), default=None),
            "peak_fds": max((s["fds"] for s in self.samples), default=None),
        }
        totals = {k: r.total(k) for k in (
            "ops", "verified", "losses", "reattaches", "sequences_lost", "refusals", "transients",
            "operator_freed",
            "vectors_exact", "vectors_reconstructed", "vectors_unchanged")}
        corruptions = len(r.corruptions) + len(self.violations) + len(invariant_violations)
        summary = {
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "duration_s": a.duration, "wall_s": round(now() - self.t0, 1),
            "clients": a.clients,
            "clients_as_uid_65534": sum(1 for c in self.clients if c.uid is not None),
            "client_processes": sum(c.incarnation + 1 for c in self.clients),
            "seed": a.seed, "lease_ms": a.lease_ms, "quarantine_ms": a.quarantine_ms,
            "daemon_starts": self.daemon.starts,
            "ops_total": sum(o["calls"] for o in ops.values()), "ops": ops,
            "faults": {k: self.faults.get(k, 0) for k in FAULT_KINDS},
            "client_totals": totals,
            "stats_checks": self.stats_checks,
            "operator_frees": dict(self.operator_frees),
            "watch": {"streams": self.watcher.streams, "events": self.watcher.events,
                      "ended": {str(k): v for k, v in self.watcher.ended.items()}},
            "daemon_invariant_checks": invariant_checks,
            "resources": resources,
            "corruptions": corruptions,
            "corruption_reports": r.corruptions[:20],
            "accounting_violations": self.violations[:20],
            "daemon_invariant_violations": invariant_violations[:5],
            "anomalies": len(r.anomalies), "anomaly_reports": r.anomalies[:20],
            "stuck_clients": len(r.stuck), "failures": self.failures[:20],
            "work_dir": self.dir,
        }
        passed = (corruptions == 0 and not r.anomalies and not r.stuck and not self.failures and
                  final is not None)
        summary["result"] = "PASS" if passed else "FAIL"
        with open(os.path.join(self.dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        r.events.close()
        print(json.dumps(summary, indent=1) if a.json else render(summary))
        if passed and self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0 if passed else 1


def fmt_us(us):
    if us is None:
        return "-"
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} us"


def render(s):
    lines = [f"cachemgr soak: {s['duration_s']:g} s ({s['wall_s']} s wall), {s['clients']} clients "
             f"({s['clients_as_uid_65534']} as uid 65534), {s['client_processes']} client "
             f"processes, seed {s['seed']}, lease {s['lease_ms']} ms, quarantine "
             f"{s['quarantine_ms']} ms, {s['daemon_starts']} daemon starts",
             f"ops: {s['ops_total']}",
             f"  {'op':<16}{'calls':>10}{'ok':>10}  {'p50':>9}{'p99':>10}  other outcomes"]
    for op, o in s["ops"].items():
        other = ", ".join(f"{k} {v}" for k, v in o["outcomes"].items() if k != "OK")
        lines.append(f"  {op:<16}{o['calls']:>10}{o['ok']:>10}  {fmt_us(o['p50_us']):>9}"
                     f"{fmt_us(o['p99_us']):>10}  {other}")
    lines.append("faults injected: " + ", ".join(f"{k} {v}" for k, v in s["faults"].items()))
    t = s["client_totals"]
    lines.append(f"clients: {t['losses']} sessions lost, {t['reattaches']} re-attaches, "
                 f"{t['sequences_lost']} sequences lost with them, {t['verified']} sequence "
                 f"checks, head vectors compared: {t['vectors_exact']} exact, "
                 f"{t['vectors_reconstructed']} reconstructed within tolerance, "
                 f"{t['vectors_unchanged']} reconstructed re-read")
    lines.append(f"operator: frees {s['operator_frees']} (clients noticed {t['operator_freed']}); "
                 f"event streams {s['watch']['streams']}, {s['watch']['events']} events, ended "
                 f"{s['watch']['ended']}")
    lines.append(f"accounting checks (operator Stats): {s['stats_checks']}; daemon "
                 f"CheckInvariants runs: {s['daemon_invariant_checks']}")
    res = s["resources"]

    def sample(x):
        if not x:
            return "-"
        calls = x.get("client_calls_so_far")
        return (f"RSS {x['rss_kib'] / 1024:.1f} MiB, {x['fds']} fds" +
                (f" (after {calls} client calls)" if calls is not None else ""))
    lines.append(f"daemon: fresh {sample(res['fresh'])}; quiet after the chaos "
                 f"{sample(res['quiet_1'])}; quiet after the second wave, same daemon "
                 f"{sample(res['quiet_2'])}; peak RSS {(res['peak_rss_kib'] or 0) / 1024:.1f} MiB, "
                 f"{res['peak_fds']} fds")
    lines.append(f"corruptions found: {s['corruptions']} (client reports "
                 f"{len(s['corruption_reports'])}, accounting violations "
                 f"{len(s['accounting_violations'])}, daemon invariant violations "
                 f"{len(s['daemon_invariant_violations'])}); anomalies: {s['anomalies']}; stuck "
                 f"clients: {s['stuck_clients']}")
    for item in (s["corruption_reports"] + s["accounting_violations"] +
                 s["daemon_invariant_violations"] + s["anomaly_reports"])[:10]:
        lines.append("  " + json.dumps(item)[:400])
    for f in s["failures"]:
        lines.append("  failure: " + f)
    lines.append(f"RESULT: {s['result']}" + ("" if s["result"] == "PASS" else
                                              f" (logs in {s['work_dir']})"))
    return "\n".join(lines)


def main(argv):
    args = parse_args(argv)
    soak = Soak(args)
    # A SIGTERM or SIGINT ends the run early, with the usual wind-down and report.
    def stop(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        return soak.run()
    except KeyboardInterrupt:
        soak.failures.append("interrupted")
        final = soak.quiesce("interrupted")
        soak.stop_daemon()
        return soak.finish(final)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
