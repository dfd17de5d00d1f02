"""A tensor-parallel engine against the real daemon (docs/MULTINODE.md, "Groups"):
cachemgr-engine --tensor_parallel=N attaches one session per rank as a group, each rank's
mapping holding its share of the KV heads (the engine writes and reads every rank's shard), and
compresses through the group with each rank's share of the window queries or scores. Its greedy
output must equal the unsharded engine's, byte for byte, with every policy: the group's
Compress decides what the unsharded one decides. The real models: stories260K (8 query and 4
KV heads: 2 and 4 ranks) and SmolLM2-135M when fetched (9 and 3: 3 ranks)."""

import os
import subprocess

import pytest

from test_engine_pd import STORIES, engine_argv

POLICIES = {
    "fullkv": [],
    "snapkv": ["--policy=snapkv", "--reserve_ratio=0.4", "--window=8"],
    "h2o": ["--policy=h2o", "--reserve_ratio=0.4"],
    "pyramidkv": ["--policy=pyramidkv", "--reserve_ratio=0.4", "--window=8"],
    "spindlekv": ["--policy=spindlekv", "--byte_ratio=0.5", "--window=8"],
    "codebook": ["--policy=codebook", "--reserve_ratio=1.0"],
}


def cases():
    out = [pytest.param(STORIES, tp, id=f"stories260K-tp{tp}") for tp in (2, 4)]
    gguf = os.environ.get("CACHEMGR_SMOLLM2_GGUF")
    if gguf:
        out.append(pytest.param((gguf, ""), 3, id="smollm2-tp3"))
    return out


def generate(socket, model, steps, *extra):
    r = subprocess.run(engine_argv(socket, model, steps, *extra), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


@pytest.mark.parametrize("model,tp", cases())
def test_tensor_parallel_engine_equals_unsharded(daemon, model, tp):
    steps = 40 if model[0].endswith(".bin") else 16
    for policy, args in POLICIES.items():
        whole, whole_log = generate(daemon.socket, model, steps, *args)
        sharded, sharded_log = generate(daemon.socket, model, steps, *args,
                                        f"--tensor_parallel={tp}")
        assert sharded == whole, policy
        if policy != "fullkv":  # the same honest ratio, reported by the group's Compress
            line = next(l for l in whole_log.splitlines() if f"compressed with {policy}" in l)
            assert line in sharded_log.splitlines()


def test_tensor_parallel_must_divide_the_heads(daemon):
    path, tokenizer = STORIES
    r = subprocess.run([os.environ["CACHEMGR_ENGINE"], f"--socket={daemon.socket}",
                        f"--model={path}", f"--tokenizer={tokenizer}", "--steps=2",
                        "--tensor_parallel=3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "group.size 3 must divide model.num_kv_heads (4)" in r.stderr
