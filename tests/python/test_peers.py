"""Daemons that know each other (--peers): each probes its peers' TCP listeners with Peer.Hello,
authenticated as every TCP call is (the cluster's bearer token, or certificates under mutual
TLS); `cachemgrctl peers` and the metrics show what the probes saw: peers up with their boot id
and node, a dead or restarted peer, a peer that refuses the credentials, this daemon itself
among a DNS name's addresses. Real daemons, real sockets, real cachemgrctl."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest

from test_cachemgrctl import ctl, ctl_json, openssl


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def peer(d, address):
    """The daemon's view of one peer address (None if it has none)."""
    return next((p for p in ctl_json(d, "peers").get("peers", []) if p["address"] == address),
                None)


def peer_in_state(d, address, state):
    def check():
        p = peer(d, address)
        return p if p is not None and p["state"] == state else None
    return check


def metrics_text(d):
    port = int(re.search(r'"metrics_port":(\d+)', d.log_text()).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def token_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_two_daemons_probe_each_other_through_a_restart(daemon_factory, tmp_path):
    token = token_file(tmp_path, "token", "cluster-token-0123456789")
    port_a, port_b = free_port(), free_port()
    common = ["--tcp_plaintext_loopback", f"--tcp_token_file={token}",
              "--peer_probe_interval_ms=200"]
    b = daemon_factory(f"--tcp_address=127.0.0.1:{port_b}", f"--peers=127.0.0.1:{port_a}",
                       "--node_name=node-b", *common)
    # A's DNS entry resolves to A itself (and maybe [::1], where nobody listens).
    a = daemon_factory(f"--tcp_address=127.0.0.1:{port_a}",
                       f"--peers=127.0.0.1:{port_b}, dns:localhost:{port_a}",
                       "--node_name=node-a", "--metrics_address=127.0.0.1:0", *common)
    b_view = ctl_json(b, "peers")
    assert b_view["node_name"] == "node-b"
    seen = wait_for("A to see B up", peer_in_state(a, f"127.0.0.1:{port_b}", "PEER_STATE_UP"))
    assert seen["boot_id"] == b_view["boot_id"] and seen["node_name"] == "node-b"
    assert seen["source"] == f"127.0.0.1:{port_b}" and seen["version"]
    assert float(seen["rtt_ms"]) > 0 and int(seen["last_seen_unix_ms"]) > 0
    me = wait_for("A to find itself", peer_in_state(a, f"127.0.0.1:{port_a}", "PEER_STATE_SELF"))
    assert me["source"] == f"dns:localhost:{port_a}"
    assert me["boot_id"] == ctl_json(a, "peers")["boot_id"]
    wait_for("B to see A up", peer_in_state(b, f"127.0.0.1:{port_a}", "PEER_STATE_UP"))
    table = ctl(a, "peers").stdout
    assert "this daemon: node node-a" in table
    row = next(line for line in table.splitlines() if line.startswith(f"127.0.0.1:{port_b} "))
    assert " up " in row and "node-b" in row
    up = f'cachemgr_peer_up{{peer="127.0.0.1:{port_b}",source="127.0.0.1:{port_b}"}} 1'
    assert up in metrics_text(a)
    assert f'peer="127.0.0.1:{port_a}"' not in metrics_text(a)  # itself is no peer

    # B dies: A marks it down, saying why; B comes back under a new boot id: up again.
    b.kill()
    down = wait_for("A to see B down", peer_in_state(a, f"127.0.0.1:{port_b}",
                                                     "PEER_STATE_DOWN"))
    assert down["last_error"].startswith("UNAVAILABLE"), down
    assert int(down["probes_failed"]) >= 1 and int(down["probes_ok"]) >= 1
    assert up.replace("} 1", "} 0") in metrics_text(a)
    b.restart()
    back = wait_for("A to see B again", peer_in_state(a, f"127.0.0.1:{port_b}", "PEER_STATE_UP"))
    assert back["boot_id"] != seen["boot_id"] and back["last_error"] == ""


def test_a_peer_that_refuses_the_token_is_down_unauthenticated(daemon_factory, tmp_path):
    port_a, port_b = free_port(), free_port()
    daemon_factory(f"--tcp_address=127.0.0.1:{port_b}", "--tcp_plaintext_loopback",
                   f"--tcp_token_file={token_file(tmp_path, 'b', 'another-token-0123456789')}")
    a = daemon_factory(f"--tcp_address=127.0.0.1:{port_a}", "--tcp_plaintext_loopback",
                       f"--tcp_token_file={token_file(tmp_path, 'a', 'cluster-token-0123456789')}",
                       f"--peers=127.0.0.1:{port_b}", "--peer_probe_interval_ms=200")
    down = wait_for("A's probe of B to fail", peer_in_state(a, f"127.0.0.1:{port_b}",
                                                            "PEER_STATE_DOWN"))
    assert down["last_error"].startswith("UNAUTHENTICATED"), down
    assert down.get("boot_id", "") == ""  # B said nothing about itself


def test_peers_under_mutual_tls(daemon_factory, tmp_path):
    """The production setting: certificates from one CA, no token; each daemon's certificate
    is its client certificate to the others."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out",
            "ca.key", cwd=tmp_path)
    openssl("req", "-x509", "-key", "ca.key", "-out", "ca.pem", "-days", "2", "-subj",
            "/CN=test-ca", cwd=tmp_path)
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("a", "b"):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-out", f"{name}.key", cwd=tmp_path)
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN=daemon-{name}", cwd=tmp_path)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "ext",
                cwd=tmp_path)
        (tmp_path / f"{name}.key").chmod(0o600)
    port_a, port_b = free_port(), free_port()

    def tls(name):
        return [f"--tls_cert_file={tmp_path}/{name}.pem", f"--tls_key_file={tmp_path}/{name}.key",
                f"--tls_client_ca_file={tmp_path}/ca.pem", "--peer_probe_interval_ms=200"]
    daemon_factory(f"--tcp_address=127.0.0.1:{port_b}", f"--peers=127.0.0.1:{port_a}", *tls("b"))
    a = daemon_factory(f"--tcp_address=127.0.0.1:{port_a}", f"--peers=127.0.0.1:{port_b}",
                       *tls("a"))
    wait_for("A to see B up over mutual TLS",
             peer_in_state(a, f"127.0.0.1:{port_b}", "PEER_STATE_UP"))


def test_listing_peers_needs_the_operator_credential(daemon, tmp_path):
    wrong = token_file(tmp_path, "not-the-operator", "0123456789abcdef0123456789abcdef")
    r = ctl(daemon, "peers", f"--operator_token_file={wrong}", check=False)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr and "operator" in r.stderr
    view = ctl_json(daemon, "peers")
    assert view.get("peers", []) == [] and view["boot_id"]
    assert "no peers" in ctl(daemon, "peers").stdout


@pytest.mark.parametrize("args, message", [
    (["--peers=127.0.0.1"], "no port"),
    (["--peers=127.0.0.1:0"], "1..65535"),
    (["--peers=127.0.0.1:7001,127.0.0.1:7001"], "listed twice"),
    (["--peers=::1:7001"], "brackets"),
    (["--peers=[::1:7001"], "unclosed"),
    (["--peers=127.0.0.1:7001"], "--peers needs --tcp_address"),
    (["--peers=10.1.2.3:7001", "--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
      "--tcp_token_file=TOKEN"], "not on loopback"),
    (["--peer_ca_file=/nonexistent"], "need --peers"),
])
def test_bad_peer_settings_stop_the_daemon_naming_them(tmp_path, args, message):
    token = token_file(tmp_path, "token", "cluster-token-0123456789")
    argv = [os.environ["CACHEMGRD"], f"--socket={tmp_path}/cachemgr.sock"] + [
        a.replace("TOKEN", str(token)) for a in args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stdout + r.stderr
    assert message in r.stderr + r.stdout, r.stderr + r.stdout
    assert not os.path.exists(f"{tmp_path}/cachemgr.sock")
