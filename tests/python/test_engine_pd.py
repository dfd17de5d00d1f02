"""Prefill on one daemon, decode on another (docs/MULTINODE.md): two real daemons that are peers,
two real cachemgr-engine processes on the real models. The prefill engine prefills (and
compresses) the prompt through daemon A, which moves the sequence to daemon B into the decode
engine's session; the decode engine continues it. Its greedy continuation must equal a
single-daemon run: with FullKV, and compress-then-decode when the transfer carries a compressed
sequence (SnapKV's kept rows, or codebook layers that travel coded)."""

import json
import os
import pathlib
import subprocess

import pytest

import cachemgr
from test_peers import wait_for
from test_transfer import pair  # noqa: F401  (the two-daemon fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
STORIES = (str(ROOT / "testdata/models/stories260K.bin"), str(ROOT / "testdata/models/tok512.bin"))
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play with her"


def models():
    out = [pytest.param(STORIES, id="stories260K")]
    gguf = os.environ.get("CACHEMGR_SMOLLM2_GGUF")
    if gguf:
        out.append(pytest.param((gguf, ""), id="smollm2"))
    return out


def engine_argv(socket, model, steps, *extra):
    path, tokenizer = model
    argv = [os.environ["CACHEMGR_ENGINE"], f"--socket={socket}", f"--model={path}",
            f"--prompt={PROMPT}", f"--steps={steps}", *extra]
    if tokenizer:
        argv.append(f"--tokenizer={tokenizer}")
    return argv


def run(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


POLICIES = {
    "fullkv": [],
    "snapkv": ["--policy=snapkv", "--reserve_ratio=0.5", "--window=8"],
    "codebook": ["--policy=codebook", "--reserve_ratio=1.0"],
}


@pytest.mark.parametrize("model", models())
@pytest.mark.parametrize("policy", list(POLICIES))
def test_prefill_on_a_decode_on_b_equals_one_daemon(pair, tmp_path, model, policy):  # noqa: F811
    prefill_then_decode(pair, tmp_path, model, policy)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 4)])
@pytest.mark.parametrize("policy", ["snapkv", "codebook"])
def test_prefill_and_decode_with_other_tensor_parallelism(pair, tmp_path, policy,  # noqa: F811
                                                          prefill_tp, decode_tp):
    """A group's sequence (every rank's heads) moves to an engine of another tensor parallelism
    (docs/MULTINODE.md, "Groups"): 2 ranks prefill, 1 decodes; 1 prefills, 4 decode."""
    prefill_then_decode(pair, tmp_path, models()[0].values[0], policy,
                        prefill_extra=[f"--tensor_parallel={prefill_tp}"],
                        decode_extra=[f"--tensor_parallel={decode_tp}"])


def prefill_then_decode(pair, tmp_path, model, policy, prefill_extra=(), decode_extra=()):
    a, b, _, b_address = pair
    steps = 24 if model[0].endswith(".bin") else 12
    compress = [*POLICIES[policy], *prefill_extra]
    reference = run(engine_argv(a.socket, model, steps, *POLICIES[policy]))

    # (tmp_path/"token" is the cluster token of the pair fixture)
    token_file, first_token_file = tmp_path / "decode-session-token", tmp_path / "first-token"
    decode = subprocess.Popen(
        engine_argv(b.socket, model, steps, "--decode_from=req", f"--token_file={token_file}",
                    f"--first_token_file={first_token_file}", "--wait_ms=300000",
                    *decode_extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the decode engine's session token", token_file.exists, timeout=120)
        assert token_file.stat().st_mode & 0o077 == 0  # a secret
        r = subprocess.run(engine_argv(
            a.socket, model, steps, *compress, "--prefill_only", "--sequence=req",
            f"--transfer_to={b_address}", f"--transfer_token_file={token_file}",
            f"--transfer_id=pd-{policy}"), capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            decode.kill()
            _, decode_err = decode.communicate()
            raise AssertionError(f"prefill failed: {r.stderr}\ntoken file: {token_file.read_text()!r}\n"
                                 f"decode engine: {decode_err}\n"
                                 f"daemon B: {b.log_text()[-4000:]}")
        prefilled = json.loads(r.stdout)
        assert prefilled["payload_bytes"] > 0
        first_token_file.write_text(f"{prefilled['first_token']}\n")
        out, err = decode.communicate(timeout=600)
        assert decode.returncode == 0, err
    finally:
        if decode.poll() is None:
            decode.kill()
            decode.wait()
    assert out == reference
    assert len(out) > len(PROMPT) + 10  # it generated something
    # Moved, not copied; both engines freed what they held.
    wait_for("both daemons empty", lambda: all(
        cachemgr.stats(d.socket).num_sequences == 0 for d in (a, b)), timeout=20)
