"""cachemgrctl's daemon commands against the real cachemgrd while a real Python client holds
state: tables and --json agree with what the client sees, operator free/compress change the
daemon, watch streams live events, errors are precise and change nothing."""

import json
import os
import re
import subprocess
import time

import grpc
import numpy as np
import pytest

import cachemgr

LAYERS, BLOCK, NUM_BLOCKS = 3, 4, 64


def ctl(daemon, *args, socket=None, check=True):
    binary = os.environ.get("CACHEMGRCTL")
    if not binary:
        raise RuntimeError("set CACHEMGRCTL to the cachemgrctl binary")
    cmd = [binary, *args]
    if socket is not False:
        cmd.append(f"--socket={socket or daemon.socket}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}: {r.stderr}")
    return r


def ctl_json(daemon, *args):
    return json.loads(ctl(daemon, *args, "--json").stdout)


def model():
    return cachemgr.ModelSpec(name="ctl-model", num_layers=LAYERS, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, dtype="fp16", block_size=BLOCK, layout="flash_attn")


def table_rows(text, header_first_word):
    """The rows (split on 2+ spaces) of the table whose header starts with the given word."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:1] == [header_first_word])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_health(daemon):
    r = ctl(daemon, "health")
    assert r.stdout.startswith("SERVING") and "cachemgrd" in r.stdout
    h = ctl_json(daemon, "health")
    assert h["status"] == "SERVING" and h["health_service"] is True
    assert h["services"] == {"": "SERVING", "cachemgr.v1.CacheManager": "SERVING"}
    assert h["version"] and int(h["uptime_ms"]) >= 0


def test_health_of_a_missing_daemon_fails(tmp_path):
    r = ctl(None, "health", socket=str(tmp_path / "none.sock"), check=False)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


def test_health_with_the_health_service_off(daemon_factory):
    d = daemon_factory("--health=false")
    r = ctl(d, "health")
    assert "health service off" in r.stdout
    assert ctl_json(d, "health")["health_service"] is False


def test_state_tables_and_json_match_the_client(daemon):
    with cachemgr.Session.attach(daemon.socket, "ctl-client", model(), num_blocks=NUM_BLOCKS) as s:
        s.allocate("a", 30)  # 8 blocks per layer
        s.allocate("b", 9)   # 3 blocks per layer
        s.fork("a", "a2")    # shares a's 8 blocks

        stats = ctl_json(daemon, "stats")
        assert stats["num_sequences"] == 3 and len(stats["clients"]) == 1
        (pool,) = stats["pools"]
        assert pool["model_name"] == "ctl-model" and pool["backend"] == "BACKEND_HOST"
        assert [l["used_blocks"] for l in pool["layers"]] == [11] * LAYERS
        assert [l["shared_blocks"] for l in pool["layers"]] == [8] * LAYERS
        assert [l["free_blocks"] for l in pool["layers"]] == [NUM_BLOCKS - 11] * LAYERS

        text = ctl(daemon, "stats").stdout
        assert "3 sequences" in text and "1 clients" in text
        layer_rows = table_rows(text, "LAYER")
        assert [row[:5] for row in layer_rows] == [[str(l), "64", "11", "53", "8"]
                                                  for l in range(LAYERS)]
        assert layer_rows[0][5] == "17.2%"
        (pool_row,) = table_rows(text, "POOL")
        assert pool_row[0] == pool["pool_id"] and pool_row[1] == "ctl-model"

        clients = ctl_json(daemon, "clients")["clients"]
        assert [c["client_name"] for c in clients] == ["ctl-client"]
        assert clients[0]["sequences"] == 3 and clients[0]["lease_remaining_ms"] > 0
        (client_row,) = table_rows(ctl(daemon, "clients").stdout, "CLIENT")
        assert client_row[1:4] == ["ctl-client", pool["pool_id"], "3"]

        listed = ctl_json(daemon, "sequences")["sequences"]
        assert [(q["sequence_id"], int(q["num_positions"]), int(q["num_blocks"]))
                for q in listed] == [("a", 30, 24), ("a2", 30, 24), ("b", 9, 9)]
        rows = table_rows(ctl(daemon, "sequences").stdout, "SEQUENCE")
        assert [(r[0], r[3], r[4]) for r in rows] == [("a", "30", "24"), ("a2", "30", "24"),
                                                      ("b", "9", "9")]

        mine = s.get_sequence("a", include_kv_digest=True)
        seq = ctl_json(daemon, "sequence", "--id=a", "--digest")
        assert seq["sequence_id"] == "a" and int(seq["num_positions"]) == 30
        for layer, l in enumerate(seq["layers"]):
            assert l["block_ids"] == list(mine.layers[layer].block_ids)
            assert int(l["kv_digest"]) == mine.layers[layer].kv_digest
        child = ctl_json(daemon, "sequence", "--id=a2")
        assert child["parent_sequence_id"] == "a"
        text = ctl(daemon, "sequence", "--id=a", "--digest").stdout
        assert "30 positions, 3 layers" in text and "compression: none" in text
        rows = table_rows(text, "LAYER")
        assert rows[0][:3] == ["0", "30", "8"]
        assert rows[0][-2] == f"{mine.layers[0].kv_digest:016x}"
        assert rows[0][-1] == ",".join(map(str, mine.layers[0].block_ids))


def test_operator_compress_and_free(daemon):
    with cachemgr.Session.attach(daemon.socket, "ctl-client", model(), num_blocks=NUM_BLOCKS) as s:
        a = s.allocate("long", 64)  # 16 blocks per layer
        rng = np.random.default_rng(3)
        for layer in range(LAYERS):
            k = rng.standard_normal((64, 2, 8)).astype(np.float16)
            s.pool.write(layer, a.layers[layer].slot_mapping, k, k)
        s.allocate("short", 5)

        r = ctl_json(daemon, "compress", "--sequence=long", "--policy=streamingllm",
                     "--reserve_ratio=0.5", "--sinks=4")
        assert r["reserve_ratio"] == pytest.approx(0.5)
        assert [l["kept_per_head"] for l in r["layers"]] == [32] * LAYERS
        assert int(r["blocks_released"]) == 8 * LAYERS
        info = s.get_sequence("long")
        assert info.compressed and info.compression_policy == "streamingllm"
        assert [l.num_tokens for l in info.layers] == [32] * LAYERS
        assert "compression: compressed by streamingllm" in ctl(
            daemon, "sequence", "--id=long").stdout

        # Refusals change nothing and name the problem.
        again = ctl(daemon, "compress", "--sequence=long", "--policy=streamingllm", check=False)
        assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
        needs_scores = ctl(daemon, "compress", "--sequence=short", "--policy=snapkv", check=False)
        assert needs_scores.returncode == 1 and "INVALID_ARGUMENT" in needs_scores.stderr
        assert "input" in needs_scores.stderr
        assert not s.get_sequence("short").compressed
        bad_ratio = ctl(daemon, "compress", "--sequence=short", "--reserve_ratio=1.5",
                        "--policy=streamingllm", check=False)
        assert bad_ratio.returncode == 1 and "reserve_ratio" in bad_ratio.stderr

        before = ctl_json(daemon, "stats")["pools"][0]["layers"][0]["used_blocks"]
        out = ctl(daemon, "free", "--sequence=short").stdout
        assert out == f"freed short: {2 * LAYERS} blocks released\n"
        after = ctl_json(daemon, "stats")["pools"][0]["layers"][0]["used_blocks"]
        assert before - after == 2
        missing = ctl(daemon, "free", "--sequence=short", check=False)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        assert "sequence_id" in missing.stderr
        assert [q.sequence_id for q in s.list_sequences()] == ["long"]


def test_watch_streams_events_live(daemon):
    binary = os.environ["CACHEMGRCTL"]
    watcher = subprocess.Popen(
        [binary, "watch", f"--socket={daemon.socket}", "--json", "--count=4",
         "--types=client_attached,sequence_allocated,sequence_freed,client_detached"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    human = subprocess.Popen([binary, "watch", f"--socket={daemon.socket}", "--count=2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # both subscribed
    with cachemgr.Session.attach(daemon.socket, "watched", model(), num_blocks=NUM_BLOCKS) as s:
        s.allocate("w", 6)
        s.fork("w", "w2")  # filtered out
        s.free("w")
        client_id = s.client_id
    # Leaving the block detaches: the fourth event.
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == [
        "EVENT_TYPE_CLIENT_ATTACHED", "EVENT_TYPE_SEQUENCE_ALLOCATED",
        "EVENT_TYPE_SEQUENCE_FREED", "EVENT_TYPE_CLIENT_DETACHED"]
    assert [e["sequence_id"] for e in events[1:3]] == ["w", "w"]
    assert {e["client_id"] for e in events} == {client_id}
    seqs = [int(e["seq"]) for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    out, _ = human.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "SEQ", "TYPE"]
    assert [l.split()[2] for l in lines[1:]] == ["pool_created", "client_attached"]


def test_watch_for_a_duration_ends_cleanly(daemon):
    start = time.time()
    r = ctl(daemon, "watch", "--for=0.5")
    assert time.time() - start < 10 and r.stdout.startswith("TIME")


def test_usage_errors(daemon):
    for args, needle in [(("sequence",), "--id"),
                         (("sequence", "--id=x", "--bogus=1"), "--bogus"),
                         (("watch", "--types=nope"), "unknown event type \"nope\""),
                         (("free",), "--sequence"),
                         (("stats", "--timeout=0"), "--timeout"),
                         (("compress", "--sequence=x", "--reserve_ratio=0.5",
                           "--byte_ratio=0.5"), "exclude")]:
        r = ctl(daemon, *args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    r = ctl(daemon, "sequence", "--id=none", check=False)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def tcp_port(d):
    return int(re.search(r'"tcp":"127\.0\.0\.1:0 port (\d+)', d.log_text()).group(1))


def test_tcp_with_the_bearer_token(daemon_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    d = daemon_factory("--tcp_address=127.0.0.1:0", "--tcp_plaintext_loopback",
                       f"--tcp_token_file={token}")
    port = tcp_port(d)
    r = ctl(d, "health", f"--address=127.0.0.1:{port}", f"--token_file={token}", socket=False)
    assert r.stdout.startswith("SERVING")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-0123456789\n")
    r = ctl(d, "stats", f"--address=127.0.0.1:{port}", f"--token_file={wrong}", socket=False,
            check=False)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr
    r = ctl(d, "stats", f"--address=127.0.0.1:{port}", socket=False, check=False)
    assert r.returncode == 2 and "--token_file" in r.stderr
    # Python over TCP: the bearer token authenticates, the operator credential authorizes.
    s = cachemgr.stats(f"127.0.0.1:{port}", bearer_token=token.read_text().strip())
    assert s.clients == []
    with pytest.raises(cachemgr.CacheManagerError) as e:
        cachemgr.stats(f"127.0.0.1:{port}")
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_operator_rights_need_the_operator_credential(daemon, tmp_path):
    """A caller of the daemon's own uid that lacks the credential is a tenant, not an operator:
    it sees its uid's clients, and free / compress / watch are refused with a message saying
    how to get the rights."""
    with cachemgr.Session.attach(daemon.socket, "owner", model(), num_blocks=NUM_BLOCKS) as s:
        s.allocate("victim", 10)
        wrong = tmp_path / "not-the-operator"
        wrong.write_text("0123456789abcdef0123456789abcdef\n")
        for args in (("free", "--sequence=victim"),
                     ("compress", "--sequence=victim", "--policy=streamingllm"),
                     ("watch", "--count=1", "--for=5")):
            r = ctl(daemon, *args, f"--operator_token_file={wrong}", check=False)
            assert r.returncode == 1, (args, r.stderr)
            assert "PERMISSION_DENIED" in r.stderr and "operator" in r.stderr, (args, r.stderr)
        # Its own uid's view still works without the credential.
        rows = table_rows(ctl(daemon, "sequences", f"--operator_token_file={wrong}").stdout,
                          "SEQUENCE")
        assert [r[0] for r in rows] == ["victim"]
        assert [x.sequence_id for x in cachemgr.list_all_sequences(
            daemon.socket, operator_token_file=str(wrong))] == ["victim"]
        # The default credential file (SOCKET.operator, mode 0600) makes this user the operator.
        assert os.stat(daemon.socket + ".operator").st_mode & 0o777 == 0o600
        ctl(daemon, "free", "--sequence=victim")
        assert s.list_sequences() == []


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_tls_from_python_and_cachemgrctl(daemon_factory, tmp_path):
    for key in ("ca", "server"):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-out", f"{key}.key", cwd=tmp_path)
    openssl("req", "-x509", "-key", "ca.key", "-out", "ca.pem", "-days", "2", "-subj",
            "/CN=test-ca", cwd=tmp_path)
    openssl("req", "-new", "-key", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
            cwd=tmp_path)
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext", cwd=tmp_path)
    (tmp_path / "server.key").chmod(0o600)
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    d = daemon_factory("--tcp_address=127.0.0.1:0", f"--tls_cert_file={tmp_path}/server.pem",
                       f"--tls_key_file={tmp_path}/server.key", f"--tcp_token_file={token}")
    target = f"127.0.0.1:{tcp_port(d)}"
    tls = cachemgr.TlsOptions(ca_file=str(tmp_path / "ca.pem"))
    assert cachemgr.stats(target, bearer_token="s3cret-token-0123456789", tls=tls).version
    with pytest.raises(cachemgr.CacheManagerError) as e:  # plaintext to a TLS port
        cachemgr.stats(target, bearer_token="s3cret-token-0123456789")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    r = ctl(d, "health", f"--address={target}", f"--tls_ca_file={tmp_path}/ca.pem",
            f"--token_file={token}", socket=False)
    assert r.stdout.startswith("SERVING")
    r = ctl(d, "health", f"--address={target}", f"--token_file={token}", socket=False,
            check=False)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
