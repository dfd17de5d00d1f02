"""The Prometheus endpoint (--metrics_address) scraped over real HTTP while a real client acts:
gauges follow the pool, counters and histograms move by exactly what the test did, and every
metric the daemon exports is documented in docs/OPERATIONS.md."""

import pathlib
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import cachemgr

LAYERS, BLOCK, NUM_BLOCKS = 2, 4, 32
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value} plus {name: type} from the text exposition."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"malformed sample line: {line!r}"
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        key = (m.group(1), labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(m.group(4))
    return samples, types


def metrics_port(daemon):
    # The "cachemgrd serving" line follows the socket the fixture waited for by a moment.
    deadline = time.time() + 10
    while (m := re.search(r'"metrics_port":(\d+)', daemon.log_text())) is None:
        assert time.time() < deadline, "no metrics_port in the daemon's log"
        time.sleep(0.02)
    return int(m.group(1))


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        # The text format: prometheus-cpp's exposer sends "text/plain; charset=utf-8" (no version
        # parameter), which Prometheus reads as format 0.0.4.
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def value(samples, name, **labels):
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def model():
    return cachemgr.ModelSpec(name="metrics-model", num_layers=LAYERS, num_q_heads=4,
                              num_kv_heads=2, head_dim=8, dtype="fp16", block_size=BLOCK,
                              layout="flash_attn")


@pytest.fixture
def daemon_with_metrics(daemon_factory):
    d = daemon_factory("--metrics_address=127.0.0.1:0")
    return d, metrics_port(d)


def test_values_move_as_the_client_acts(daemon_with_metrics):
    d, port = daemon_with_metrics
    s0, _ = scrape(port)
    assert value(s0, "cachemgr_clients") == 0 and value(s0, "cachemgr_sequences") == 0
    assert value(s0, "cachemgr_build_info", version="0.1.0") == 1

    with cachemgr.Session.attach(d.socket, "metrics-client", model(), num_blocks=NUM_BLOCKS) as s:
        pool = s.pool_id
        a = s.allocate("a", 40)  # 10 blocks per layer
        rng = np.random.default_rng(0)
        for layer in range(LAYERS):
            k = rng.standard_normal((40, 2, 8)).astype(np.float16)
            s.pool.write(layer, a.layers[layer].slot_mapping, k, k)
        s.allocate("b", 8)  # 2 blocks per layer
        s.fork("a", "a2")
        with pytest.raises(cachemgr.CacheManagerError):
            s.free("missing")
        s1, _ = scrape(port)
        assert value(s1, "cachemgr_clients") == 1 and value(s1, "cachemgr_sequences") == 3
        for layer in range(LAYERS):
            labels = dict(pool=pool, device="host", layer=layer)
            assert value(s1, "cachemgr_pool_capacity_blocks", **labels) == NUM_BLOCKS
            assert value(s1, "cachemgr_pool_used_blocks", **labels) == 12
            assert value(s1, "cachemgr_pool_free_blocks", **labels) == NUM_BLOCKS - 12
            assert value(s1, "cachemgr_pool_shared_blocks", **labels) == 10
            assert value(s1, "cachemgr_pool_quarantined_blocks", **labels) == 0
        assert value(s1, "cachemgr_pool_clients", pool=pool, device="host") == 1
        bytes_ = value(s1, "cachemgr_pool_bytes", pool=pool, model="metrics-model", device="host")
        assert bytes_ == LAYERS * NUM_BLOCKS * 2 * BLOCK * 2 * 8 * 2
        # The budget also charges 16 bytes of bookkeeping per block and layer, the client's
        # input buffer (whole pages) and the sequences' own bookkeeping.
        input_bytes = -(-s.input_buffer.nbytes // 4096) * 4096
        sequence_bytes = value(s1, "cachemgr_sequence_bytes")
        assert sequence_bytes > 0
        assert value(s1, "cachemgr_memory_used_bytes") == \
            bytes_ + LAYERS * NUM_BLOCKS * 16 + input_bytes + sequence_bytes
        delta = lambda name, **l: value(s1, name, **l) - value(s0, name, **l)  # noqa: E731
        assert delta("cachemgr_rpc_requests_total", method="Allocate", code="OK") == 2
        assert delta("cachemgr_rpc_requests_total", method="Fork", code="OK") == 1
        assert delta("cachemgr_rpc_requests_total", method="Free", code="NOT_FOUND") == 1
        assert delta("cachemgr_rpc_requests_total", method="Attach", code="OK") == 1
        assert value(s1, "cachemgr_events_total", type="sequence_allocated") == 2
        assert value(s1, "cachemgr_events_total", type="sequence_forked") == 1

        r = s.compress("b", cachemgr.Policy("streamingllm", sinks=2, window=2),
                       reserve_ratio=0.5)
        s2, _ = scrape(port)
        assert value(s2, "cachemgr_compress_total", policy="streamingllm") == 1
        assert value(s2, "cachemgr_rpc_requests_total", method="Compress", code="OK") == 1
        before = value(s2, "cachemgr_compress_bytes_before_total", policy="streamingllm")
        saved = value(s2, "cachemgr_compress_bytes_saved_total", policy="streamingllm")
        assert before == r.bytes_before and saved == r.bytes_before - r.bytes_after > 0
        assert value(s2, "cachemgr_compress_honest_ratio_count", policy="streamingllm") == 1
        assert value(s2, "cachemgr_compress_honest_ratio_sum",
                     policy="streamingllm") == pytest.approx(r.honest_ratio)
        assert value(s2, "cachemgr_compress_honest_ratio_bucket", policy="streamingllm",
                     le="0.5") == 1
        assert value(s2, "cachemgr_compress_honest_ratio_bucket", policy="streamingllm",
                     le="0.4") == 0
        assert value(s2, "cachemgr_pool_compressed_sequences", pool=pool, device="host") == 1
        assert value(s2, "cachemgr_pool_used_blocks", pool=pool, device="host", layer=0) == 11

        r = s.compress("a2", cachemgr.Policy("codebook", codebook_only_if_smaller=False,
                                             theta_k=0.5, theta_v=0.5), reserve_ratio=1.0)
        s3, _ = scrape(port)
        assert value(s3, "cachemgr_pool_arena_bytes", pool=pool, device="host") > 0
        s.fetch("a2")
        s4, _ = scrape(port)
        assert value(s4, "cachemgr_fetch_reconstructed_blocks_total") == 10 * LAYERS
        extra = s.allocate("a2", 4)
        s.park("a2")
        s5, _ = scrape(port)
        assert value(s5, "cachemgr_park_coded_rows_total") == 4 * LAYERS
        assert value(s5, "cachemgr_park_released_blocks_total") >= 10 * LAYERS
        del extra

    s6, _ = scrape(port)
    assert value(s6, "cachemgr_clients") == 0 and value(s6, "cachemgr_sequences") == 0
    assert value(s6, "cachemgr_memory_used_bytes") == 0
    assert value(s6, "cachemgr_events_total", type="client_detached") == 1
    assert value(s6, "cachemgr_events_total", type="pool_released") == 1


def test_histograms_are_consistent(daemon_with_metrics):
    d, port = daemon_with_metrics
    with cachemgr.Session.attach(d.socket, "h", model(), num_blocks=NUM_BLOCKS) as s:
        for i in range(5):
            s.allocate(f"s{i}", 3)
    samples, types = scrape(port)
    assert types["cachemgr_rpc_latency_seconds"] == "histogram"
    count = value(samples, "cachemgr_rpc_latency_seconds_count", method="Allocate", code="OK")
    assert count == 5 == value(samples, "cachemgr_rpc_requests_total", method="Allocate",
                               code="OK")
    buckets = sorted(((float(dict(l)["le"]), v) for (n, l), v in samples.items()
                      if n == "cachemgr_rpc_latency_seconds_bucket"
                      and dict(l)["method"] == "Allocate"), key=lambda b: b[0])
    assert buckets[-1] == (float("inf"), 5)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets are cumulative"
    assert value(samples, "cachemgr_rpc_latency_seconds_sum", method="Allocate", code="OK") > 0


def test_other_paths_and_methods(daemon_with_metrics):
    _, port = daemon_with_metrics
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_every_metric_is_documented(daemon_with_metrics):
    d, port = daemon_with_metrics
    with cachemgr.Session.attach(d.socket, "doc", model(), num_blocks=NUM_BLOCKS) as s:
        s.allocate("x", 3)
        _, types = scrape(port)
    docs = DOCS.read_text()
    missing = [name for name in types if f"`{name}`" not in docs]
    assert not missing, f"undocumented metrics: {missing}"
    assert len(types) >= 20


def test_bad_metrics_address_fails_to_start(tmp_path):
    import os
    import subprocess
    r = subprocess.run([os.environ["CACHEMGRD"], f"--socket={tmp_path}/s.sock",
                        "--metrics_address=nohostport"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "metrics_address" in r.stderr
