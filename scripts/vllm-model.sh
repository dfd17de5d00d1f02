#!/usr/bin/env bash
# Converts SmolLM2-135M-Instruct from the GGUF that scripts/fetch-smollm2.sh fetches into Hugging
# Face form (safetensors, config, tokenizer) for vLLM, once, into a cache outside the checkout,
# and prints its directory. transformers reads the GGUF with gguf and dequantizes it (Q4_1 ->
# floating point); the weights are saved in the model's own dtype (bfloat16, its config's).
# Needs the vLLM environment (scripts/vllm-env.sh; CACHEMGR_VLLM_ENV_PYTHON names its python if
# the caller has it already), whose python it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(scripts/fetch-smollm2.sh)
python=${CACHEMGR_VLLM_ENV_PYTHON:-$(scripts/vllm-env.sh)}
recipe=$(sha256sum scripts/vllm-model.sh | cut -c1-8)
out="$(dirname "$gguf")/SmolLM2-135M-Instruct-hf-$recipe"
exec 9>"$out.lock"
flock 9  # one conversion at a time (see scripts/vllm-env.sh)
if [ -f "$out/complete" ]; then
  echo "$out"
  exit 0
fi
rm -rf "$out.part"
HF_HUB_OFFLINE=1 "$python" - "$gguf" "$out.part" <<'PY' >&2
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

gguf, out = sys.argv[1], sys.argv[2]
directory, name = os.path.split(gguf)
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(
    directory, gguf_file=name, dtype=torch.bfloat16,
    quantization_config=GgufConfig(dequantize=True))
model.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
print(f"converted {gguf} -> {out}: {sum(p.numel() for p in model.parameters())} parameters")
PY
touch "$out.part/complete"
rm -rf "$out"
mv "$out.part" "$out"
echo "$out"
