"""cachemgr-engine's GPT-2 byte-level BPE tokenizer against Hugging Face `tokenizers`, both built
from SmolLM2's GGUF vocabulary (tokens, merges, control tokens) with SmolLM's pre-tokenizer
(every digit apart, then GPT-2's pattern), on the texts the evaluation uses. Token ids must be
identical.

Environment: CACHEMGR_ENGINE (the cachemgr-engine binary), CACHEMGR_SMOLLM2_GGUF. The texts are
the repository's excerpts in testdata/text (testdata/README.md).
"""

import json
import os
import pathlib
import subprocess

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

import gguf_vocab

ENGINE = os.environ["CACHEMGR_ENGINE"]
GGUF = os.environ["CACHEMGR_SMOLLM2_GGUF"]
DATA = pathlib.Path(__file__).resolve().parents[2] / "testdata" / "text"


@pytest.fixture(scope="module")
def reference():
    meta = gguf_vocab.read_metadata(GGUF)
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]])
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]
    tk.add_special_tokens([AddedToken(t, special=True) for t in control])
    return tk


def engine_ids(tmp_path, text, special):
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    args = [ENGINE, "--tokenize", f"--model={GGUF}", f"--text_file={path}"]
    if special:
        args.append("--special")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def texts():
    brown = (DATA / "brown" / "brown_plain.txt").read_text(encoding="utf-8")
    news = [json.loads(line) for line in (DATA / "longbench" / "multi_news.jsonl").open()]
    ruler = [json.loads(line) for line in (DATA / "ruler_4096" / "niah_multikey_3.jsonl").open()]
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    stories = (DATA / "tinystories" / "tiny_stories_train_head.txt").read_text(encoding="utf-8")
    return {
        "brown": brown[:80000],
        "multi_news": "\n".join(n["context"] for n in news[:6]),
        "ruler": ruler[0]["input"],
        "shakespeare": shakespeare[:50000],
        "tinystories": stories[:50000],
        "edge cases": "Don't  stop\t\tnow!!\n\n  OK 3.14159 ¿Qué? naïve café — “quotes” 日本語 "
                      "x²+y² = 1000000 A-B_C   \n",
    }


@pytest.mark.parametrize("name", list(texts().keys()))
def test_ids_match_huggingface(tmp_path, reference, name):
    text = texts()[name]
    got = engine_ids(tmp_path, text, special=False)
    want = reference.encode(text, add_special_tokens=False).ids
    assert len(got) > 0
    assert got == want


def test_chat_template_control_tokens(tmp_path, reference):
    text = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n"
            "What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    got = engine_ids(tmp_path, text, special=True)
    assert got == reference.encode(text).ids
    assert got[0] == 1 and got.count(2) == 2  # <|im_start|>, <|im_end|> as single tokens
