"""cachemgrctl against the numpy reference (spindle_reference.py), on seeded random inputs.

Runs `cachemgrctl codebook` and `cachemgrctl compress` (path from $CACHEMGRCTL, else
build/tools/cachemgrctl) and requires: codebook refs identical, entries within 1e-6 (1e-5 for
keys, which go through RoPE un-rotation), magnitudes within 1e-5; kept token indices and
per-layer budgets identical for every scoring policy, both eq. 2 normalizations, queries or
precomputed scores.

The C++ code computes in float32 and the reference in float64, so inputs are regenerated (next
seed) until no decision is within rounding distance: no cosine within 1e-5 of theta, no
selection boundary with a relative score gap below 1e-5.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import spindle_reference as ref

REPO = pathlib.Path(__file__).resolve().parents[2]
CTL = os.environ.get("CACHEMGRCTL") or str(REPO / "build" / "tools" / "cachemgrctl")

if not os.environ.get("CACHEMGRCTL") and not os.path.exists(CTL):
    pytest.skip(f"{CTL} not built (set CACHEMGRCTL)", allow_module_level=True)

MARGIN = 1e-5
MAX_SEEDS = 30


def run_ctl(*args, expect=0):
    proc = subprocess.run([CTL, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == expect, (
        f"cachemgrctl {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------------
# cachemgrctl codebook


def clustered(rng, n, d, clusters, noise, zeros=0, duplicates=0):
    centers = rng.standard_normal((clusters, d))
    which = rng.integers(0, clusters, n)
    lengths = rng.uniform(0.25, 4.0, n)[:, None]
    x = lengths * (centers[which] / np.linalg.norm(centers[which], axis=1, keepdims=True)
                   + noise * rng.standard_normal((n, d)) / np.sqrt(d))
    x = x.astype(np.float32)
    for _ in range(zeros):
        x[rng.integers(0, n)] = 0.0
    for j in range(duplicates):  # exact copies, and exact power-of-two multiples
        src, dst = rng.integers(0, n, 2)
        x[dst] = x[src] * (np.float32(2.0) if j % 2 else np.float32(1.0))
    return x


CODEBOOK_CASES = [
    # n, d, clusters, noise, theta, zeros, duplicates
    (1, 4, 1, 0.1, 0.9, 0, 0),
    (40, 1, 2, 0.0, 0.9, 2, 0),
    (120, 8, 6, 0.35, 0.9, 3, 5),
    (300, 16, 12, 0.2, 0.95, 0, 10),
    (400, 64, 20, 0.12, 0.98, 2, 10),
    (257, 128, 9, 0.1, 0.98, 0, 0),
    (200, 33, 10, 0.3, 0.8, 1, 4),
    (150, 16, 5, 0.05, 1.0, 2, 30),  # theta = 1: only duplicates merge
]


@pytest.mark.parametrize("n,d,clusters,noise,theta,zeros,duplicates", CODEBOOK_CASES)
def test_codebook_matches_algorithm1(tmp_path, n, d, clusters, noise, theta, zeros, duplicates):
    for seed in range(MAX_SEEDS):
        rng = np.random.default_rng(1000 * n + d + seed)
        x = clustered(rng, n, d, clusters, noise, zeros, duplicates)
        if ref.codebook_margin(x, theta) > MARGIN:
            break
    else:
        pytest.fail("no seed gave inputs clear of theta")
    entries, refs, mags = ref.codebook_algorithm1(x, theta)
    np.save(tmp_path / "x.npy", x)
    run_ctl("codebook", f"--vectors={tmp_path / 'x.npy'}", f"--theta={theta!r}",
            f"--out={tmp_path / 'out'}")
    got_entries = np.load(tmp_path / "out" / "entries.npy")
    got_refs = np.load(tmp_path / "out" / "refs.npy")
    got_mags = np.load(tmp_path / "out" / "magnitudes.npy")
    assert got_entries.dtype == np.float32 and got_refs.dtype == np.uint32
    assert got_mags.dtype == np.float32
    assert got_entries.shape == entries.shape
    np.testing.assert_array_equal(got_refs.astype(np.int64), refs)
    np.testing.assert_allclose(got_entries, entries, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_mags, mags, rtol=1e-5, atol=0)
    if theta < 1.0 and n > 50:
        assert len(entries) < n  # the case exercises merging


def test_codebook_fp16_input(tmp_path):
    rng = np.random.default_rng(5)
    x = clustered(rng, 64, 16, 4, 0.1).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    run_ctl("codebook", f"--vectors={tmp_path / 'x.npy'}", "--theta=0.9",
            f"--out={tmp_path / 'out'}")
    _, refs, mags = ref.codebook_algorithm1(x.astype(np.float32), 0.9)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "refs.npy").astype(np.int64), refs)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "magnitudes.npy"), mags, rtol=1e-5)


def test_codebook_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 4), dtype=np.float32))
    np.save(tmp_path / "bad.npy", np.ones((3, 4), dtype=np.float64))
    out = f"--out={tmp_path / 'out'}"
    p = run_ctl("codebook", f"--vectors={tmp_path / 'x.npy'}", "--theta=1.5", out, expect=2)
    assert "--theta" in p.stderr
    p = run_ctl("codebook", f"--vectors={tmp_path / 'x.npy'}", out, expect=2)
    assert "--theta" in p.stderr
    p = run_ctl("codebook", "--theta=0.9", out, expect=2)
    assert "--vectors" in p.stderr
    p = run_ctl("codebook", f"--vectors={tmp_path / 'x.npy'}", "--theta=0.9", out, "--nope=1",
                expect=2)
    assert "--nope" in p.stderr
    p = run_ctl("codebook", f"--vectors={tmp_path / 'missing.npy'}", "--theta=0.9", out,
                expect=1)
    assert "missing.npy" in p.stderr
    p = run_ctl("codebook", f"--vectors={tmp_path / 'bad.npy'}", "--theta=0.9", out, expect=1)
    assert "bad.npy" in p.stderr and "<f8" in p.stderr
    run_ctl("frobnicate", expect=2)
    assert "compress" in run_ctl("help").stdout


# ---------------------------------------------------------------------------------------------
# cachemgrctl compress: selection and budgets

# The presets as documented (cachemgr/compress/policies/*.cc); stats.json must echo them.
PRESETS = {
    "snapkv": dict(schedule="uniform", scoring="window", window=32, normalization="sum",
                   pooling="avg", pool_kernel=5, gqa="repeat", codebook=False),
    "pyramidkv": dict(schedule="pyramid", beta=0.05, scoring="window", window=32,
                      normalization="sum", pooling="avg", pool_kernel=5, gqa="repeat",
                      codebook=False),
    "pyramidinfer": dict(schedule="pyramid", beta=0.05, scoring="window", window=32,
                         normalization="literal", pooling="none", gqa="mean", codebook=False),
    "spindlekv": dict(schedule="pyramid", beta=0.05, scoring="window", window=32,
                      normalization="sum", pooling="avg", pool_kernel=5, gqa="repeat",
                      codebook=True, theta_k=0.98, theta_v=0.95, codebook_scope="layer"),
    "zigzagkv": dict(schedule="zigzag", zigzag_tau=0.9, zigzag_min_fraction=0.2,
                     scoring="window", window=32, normalization="sum", pooling="avg",
                     pool_kernel=5, gqa="repeat", codebook=False),
    "h2o": dict(schedule="uniform", scoring="accumulated", window=32, pooling="none",
                gqa="mean", codebook=False),
    "streamingllm": dict(schedule="uniform", scoring="sinks_recent", window=32, sinks=4,
                         codebook=False),
}

SHAPES = [
    # layers, tokens, kv heads, q heads, head dim, queries, window override
    dict(L=3, T=96, Hkv=2, Hq=4, D=16, Nq=32, window=None),
    dict(L=4, T=160, Hkv=1, Hq=1, D=8, Nq=32, window=None),
    dict(L=2, T=257, Hkv=2, Hq=8, D=32, Nq=20, window=None),
    dict(L=5, T=70, Hkv=4, Hq=4, D=16, Nq=8, window=8),
]
RATIOS = [0.15, 0.4, 0.8]

SELECTION_CASES = []
for shape_index in range(len(SHAPES)):
    for mode in ("queries", "scores"):
        for policy in ("snapkv", "pyramidkv", "pyramidinfer", "spindlekv", "zigzagkv"):
            for normalization in ("literal", "sum"):
                SELECTION_CASES.append((shape_index, mode, policy, normalization))
        for policy in ("h2o", "streamingllm"):
            SELECTION_CASES.append((shape_index, mode, policy, None))


def make_sequence(rng, s):
    keys = rng.standard_normal((s["L"], s["T"], s["Hkv"], s["D"])).astype(np.float32)
    values = rng.standard_normal((s["L"], s["T"], s["Hkv"], s["D"])).astype(np.float32)
    queries = rng.standard_normal((s["L"], s["Nq"], s["Hq"], s["D"])).astype(np.float32)
    scores = rng.uniform(0.0, 1.0, (s["L"], s["Hq"], s["T"])).astype(np.float32)
    return keys, values, queries, scores


def reference_policy(policy, normalization, window):
    p = dict(beta=0.05, zigzag_tau=0.9, zigzag_min_fraction=0.2, normalization="sum",
             pooling="none", pool_kernel=5, sinks=4, gqa="mean")
    p.update(PRESETS[policy])
    if normalization is not None:
        p["normalization"] = normalization
    if window is not None:
        p["window"] = window
    return p


@pytest.mark.parametrize("shape_index,mode,policy,normalization", SELECTION_CASES)
def test_selection_matches_reference(tmp_path, shape_index, mode, policy, normalization):
    s = SHAPES[shape_index]
    p = reference_policy(policy, normalization, s["window"])
    for seed in range(MAX_SEEDS):
        rng = np.random.default_rng(7919 * shape_index + seed)
        keys, values, queries, scores = make_sequence(rng, s)
        inputs = dict(queries=queries) if mode == "queries" else dict(scores=scores)
        gaps = [ref.boundary_gaps(p, keys, reserve_ratio=r, **inputs) for r in RATIOS]
        if min(gaps) > MARGIN:
            break
    else:
        pytest.fail("no seed gave selection boundaries clear of rounding")

    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "v.npy", values)
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "s.npy", scores)
    l_w, _ = ref.split_window(s["T"], p["window"])
    for r in RATIOS:
        out = tmp_path / f"out_{r}"
        args = ["compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
                f"--policy={policy}", f"--reserve_ratio={r}", f"--out={out}", "--rope=none",
                f"--num_q_heads={s['Hq']}"]
        args.append(f"--queries={tmp_path / 'q.npy'}" if mode == "queries"
                    else f"--scores={tmp_path / 's.npy'}")
        if normalization is not None:
            args.append(f"--normalization={normalization}")
        if s["window"] is not None:
            args.append(f"--window={s['window']}")
        if policy == "spindlekv":
            args.append("--codebook=false")
        run_ctl(*args)

        ratios, counts, kept = ref.compress_kept(p, keys, reserve_ratio=r, **inputs)
        stats = json.loads((out / "stats.json").read_text())
        for key, value in p.items():
            if key == "codebook":
                continue
            if key in PRESETS[policy] or (key == "normalization" and normalization):
                got = stats["policy"][key]
                assert got == pytest.approx(value) if isinstance(value, float) else got == value, key
        assert stats["policy"]["codebook"] is False
        assert stats["target"] == {"kind": "reserve_ratio", "value": r}
        assert len(stats["layers"]) == s["L"]
        held = 0
        for lam in range(s["L"]):
            layer = stats["layers"][lam]
            got = np.load(out / f"layer{lam}_kept.npy")
            assert got.dtype == np.uint32
            assert layer["kept_per_head"] == counts[lam] + l_w, f"layer {lam} budget"
            assert layer["context_ratio"] == pytest.approx(ratios[lam], abs=1e-12)
            assert got.shape == kept[lam].shape, f"layer {lam}"
            np.testing.assert_array_equal(got.astype(np.int64), kept[lam],
                                          err_msg=f"layer {lam} at r = {r}")
            assert layer["codebook"] is False
            held += got.size * s["D"] * 2 * 2
        assert stats["full_bytes"] == s["L"] * s["T"] * s["Hkv"] * s["D"] * 2 * 2
        assert stats["held_bytes"] == held
        assert stats["honest_ratio"] == pytest.approx(held / stats["full_bytes"])


def test_positions_and_fp16_inputs(tmp_path):
    s = SHAPES[0]
    rng = np.random.default_rng(3)
    keys, values, queries, _ = make_sequence(rng, s)
    p = reference_policy("snapkv", None, None)
    assert ref.boundary_gaps(p, keys.astype(np.float16).astype(np.float32),
                             queries=queries.astype(np.float16).astype(np.float32),
                             reserve_ratio=0.3) > MARGIN
    for name, arr in (("k", keys), ("v", values), ("q", queries)):
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float16))
    np.save(tmp_path / "p.npy", np.arange(s["T"], dtype=np.int64) + 7)
    run_ctl("compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
            f"--queries={tmp_path / 'q.npy'}", f"--positions={tmp_path / 'p.npy'}",
            "--policy=snapkv", "--reserve_ratio=0.3", "--rope=none", f"--out={tmp_path / 'o'}")
    _, _, kept = ref.compress_kept(p, keys.astype(np.float16).astype(np.float32),
                                   queries=queries.astype(np.float16).astype(np.float32),
                                   reserve_ratio=0.3)
    for lam in range(s["L"]):
        np.testing.assert_array_equal(
            np.load(tmp_path / "o" / f"layer{lam}_kept.npy").astype(np.int64), kept[lam])


def test_compress_errors(tmp_path):
    s = SHAPES[0]
    keys, values, queries, scores = make_sequence(np.random.default_rng(1), s)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "v.npy", values)
    np.save(tmp_path / "v_bad.npy", values[:, :-1])
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "s.npy", scores)
    base = ["compress", f"--keys={tmp_path / 'k.npy'}", f"--out={tmp_path / 'o'}", "--rope=none"]
    p = run_ctl(*base, f"--values={tmp_path / 'v_bad.npy'}", f"--queries={tmp_path / 'q.npy'}",
                expect=1)
    assert "v_bad.npy" in p.stderr and "--values" in p.stderr
    p = run_ctl(*base, f"--values={tmp_path / 'v.npy'}", f"--queries={tmp_path / 'q.npy'}",
                f"--scores={tmp_path / 's.npy'}", expect=2)
    assert "--scores" in p.stderr
    p = run_ctl(*base, f"--values={tmp_path / 'v.npy'}", f"--queries={tmp_path / 'q.npy'}",
                "--num_q_heads=3", expect=1)
    assert "--num_q_heads" in p.stderr and "q.npy" in p.stderr
    p = run_ctl(*base, f"--values={tmp_path / 'v.npy'}", f"--queries={tmp_path / 'q.npy'}",
                "--gqa=sideways", expect=2)
    assert "--gqa" in p.stderr
    p = run_ctl(*base, f"--values={tmp_path / 'v.npy'}", f"--queries={tmp_path / 'q.npy'}",
                "--reserve_ratio=0.2", "--byte_ratio=0.2", expect=2)
    assert "--byte_ratio" in p.stderr
    p = run_ctl("compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
                f"--queries={tmp_path / 'q.npy'}", f"--out={tmp_path / 'o'}",
                "--policy=spindlekv", expect=2)
    assert "--rope" in p.stderr  # a codebook policy un-rotates K, so it must know the RoPE
    assert not (tmp_path / "o").exists()
    # Without --policy: the daemon's default (snapkv, docs/QUALITY.md), which needs no RoPE.
    p = run_ctl("compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
                f"--queries={tmp_path / 'q.npy'}", f"--out={tmp_path / 'o'}")
    assert p.stdout.startswith("snapkv:")
    assert json.load(open(tmp_path / "o" / "stats.json"))["policy"]["name"] == "snapkv"
    p = run_ctl(*base, f"--values={tmp_path / 'v.npy'}", "--policy=snapkv", "--num_q_heads=4",
                expect=1)
    assert "queries" in p.stderr or "scores" in p.stderr


def test_byte_ratio_target(tmp_path):
    s = SHAPES[2]
    keys, values, queries, _ = make_sequence(np.random.default_rng(11), s)
    for name, arr in (("k", keys), ("v", values), ("q", queries)):
        np.save(tmp_path / f"{name}.npy", arr)
    run_ctl("compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
            f"--queries={tmp_path / 'q.npy'}", "--policy=pyramidinfer", "--byte_ratio=0.4",
            "--rope=none", f"--out={tmp_path / 'o'}")
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["target"] == {"kind": "byte_ratio", "value": 0.4}
    assert abs(stats["honest_ratio"] / 0.4 - 1) <= 0.01
    p = reference_policy("pyramidinfer", None, None)
    _, counts, kept = ref.compress_kept(p, keys, queries=queries,
                                        reserve_ratio=stats["reserve_ratio"])
    for lam in range(s["L"]):
        assert stats["layers"][lam]["kept_per_head"] == counts[lam] + 32


# ---------------------------------------------------------------------------------------------
# cachemgrctl compress: codebooks of the kept vectors (K un-rotated to pre-RoPE first)

CODEBOOK_COMPRESS_CASES = [
    # rope, scope, kv heads, q heads
    ("interleaved", "layer", 2, 4),
    ("half_split", "layer", 1, 4),
    ("interleaved", "kv_head", 2, 8),
    ("none", "kv_head", 4, 4),
]


def clustered_kv(rng, L, T, hkv, d, clusters, noise):
    """[L, T, Hkv, D]: per (layer, KV head) tokens drawn from a few directions."""
    out = np.empty((L, T, hkv, d))
    for lam in range(L):
        for h in range(hkv):
            out[lam, :, h, :] = clustered(rng, T, d, clusters, noise)
    return out


@pytest.mark.parametrize("rope,scope,hkv,hq", CODEBOOK_COMPRESS_CASES)
def test_compress_codebooks_match_algorithm1(tmp_path, rope, scope, hkv, hq):
    L, T, d, nq = 2, 100, 16, 32
    positions = np.arange(T) + 40
    for seed in range(MAX_SEEDS):
        rng = np.random.default_rng(31 * hkv + hq + seed)
        pre_keys = clustered_kv(rng, L, T, hkv, d, 5, 0.03)
        keys = np.stack([ref.rotate(pre_keys[lam], positions, rope) for lam in range(L)])
        keys = keys.astype(np.float32)
        values = clustered_kv(rng, L, T, hkv, d, 4, 0.05).astype(np.float32)
        queries = rng.standard_normal((L, nq, hq, d)).astype(np.float32)
        np.save(tmp_path / "k.npy", keys)
        np.save(tmp_path / "v.npy", values)
        np.save(tmp_path / "q.npy", queries)
        np.save(tmp_path / "p.npy", positions.astype(np.int32))
        out = tmp_path / f"out{seed}"
        run_ctl("compress", f"--keys={tmp_path / 'k.npy'}", f"--values={tmp_path / 'v.npy'}",
                f"--queries={tmp_path / 'q.npy'}", f"--positions={tmp_path / 'p.npy'}",
                "--policy=spindlekv", "--reserve_ratio=0.6", f"--rope={rope}",
                f"--codebook_scope={scope}", "--codebook_only_if_smaller=false",
                f"--out={out}")
        stats = json.loads((out / "stats.json").read_text())
        # Gather the kept vectors [kv head][kept token] as the codebook stage does.
        parts_k, parts_v = [], []
        clear = True
        for lam in range(L):
            kept = np.load(out / f"layer{lam}_kept.npy").astype(np.int64)
            assert kept.shape[0] == hkv
            pre = ref.unrotate(keys[lam], positions, rope)
            kvecs = np.concatenate([pre[kept[h], h, :] for h in range(hkv)])
            vvecs = np.concatenate([values[lam][kept[h], h, :] for h in range(hkv)])
            nparts = hkv if scope == "kv_head" else 1
            per = len(kvecs) // nparts
            parts_k.append([kvecs[i * per:(i + 1) * per].astype(np.float32)
                            for i in range(nparts)])
            parts_v.append([vvecs[i * per:(i + 1) * per] for i in range(nparts)])
            for part in parts_k[-1]:
                clear &= ref.codebook_margin(part, 0.98) > MARGIN
            for part in parts_v[-1]:
                clear &= ref.codebook_margin(part, 0.95) > MARGIN
        if clear:
            break
    else:
        pytest.fail("no seed gave kept vectors clear of theta")

    for lam in range(L):
        assert stats["layers"][lam]["codebook"] is True
        for which, parts, theta, atol in (("k", parts_k[lam], 0.98, 1e-5),
                                          ("v", parts_v[lam], 0.95, 1e-6)):
            entries, refs, mags, offsets = [], [], [], [0]
            for part in parts:
                e, r, m = ref.codebook_algorithm1(part, theta)
                refs.append(r + offsets[-1])
                entries.append(e)
                mags.append(m)
                offsets.append(offsets[-1] + len(e))
            prefix = out / f"layer{lam}_{which}"
            got_refs = np.load(f"{prefix}_refs.npy").astype(np.int64)
            np.testing.assert_array_equal(got_refs, np.concatenate(refs),
                                          err_msg=f"layer {lam} {which}")
            np.testing.assert_array_equal(np.load(f"{prefix}_offsets.npy"), offsets)
            np.testing.assert_allclose(np.load(f"{prefix}_codebook.npy"),
                                       np.concatenate(entries), rtol=0, atol=atol)
            np.testing.assert_allclose(np.load(f"{prefix}_magnitudes.npy"),
                                       np.concatenate(mags), rtol=1e-5)
            assert stats["layers"][lam][f"codebook_size_{which}"] == offsets[-1]
        # The clusters merge: fewer entries than vectors.
        assert stats["layers"][lam]["codebook_size_k"] < len(np.concatenate(parts_k[lam]))
