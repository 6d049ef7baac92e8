#!/usr/bin/env bash
# The main job, end to end on one machine: fetch assets, build, train a demo oracle, start the
# cloud (SQLite + local blobs by default), upload + elastify the oracle as a job, publish it to a
# fleet, start three edge agents as separate processes with different conditions (threads,
# budget, local data mix, a contention episode), and print what each device chose plus the
# fleet aggregates a dashboard sees.
#
#   scripts/quickstart.sh              # SQLite (embedded default)
#   scripts/quickstart.sh --postgres   # PostgreSQL at $ADAPTIVENET_PG_URL (default 127.0.0.1:5432/test)
#
# Quick presets keep this to a few minutes on 2 cores; the full-size figures come from the
# benchmarks (cargo bench --bench kernels / accuracy_latency / search / fleet).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export ADAPTIVENET_ASSETS="${ADAPTIVENET_ASSETS:-$ROOT/.assets}"
RUN="$ROOT/.run/quickstart"
PORT="${ADAPTIVENET_PORT:-50151}"
ENDPOINT="http://127.0.0.1:$PORT"
DB_ARGS=()
if [ "${1:-}" = "--postgres" ]; then
  DB_ARGS=(--database-url "${ADAPTIVENET_PG_URL:-postgres://postgres@127.0.0.1:5432/test}")
fi

step() { printf '\n== %s\n' "$*"; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "assets"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1
fi
scripts/fetch-assets.sh

step "build (dev profile: dependencies at opt-level 3)"
cargo build --bins -p adaptivenet-cloud -p adaptivenet-edge
BIN="$CARGO_TARGET_DIR/debug"
CLOUD=("$BIN/cloud-server" --data-dir "$RUN/cloud" "${DB_ARGS[@]}")
rm -rf "$RUN"; mkdir -p "$RUN"
T0=$(date +%s)

step "demo oracle: ResNet-20 on Fashion-MNIST (quick preset; the full recipe is 'cloud-server train-oracle' with its defaults)"
"$BIN/cloud-server" train-oracle --out-dir "$RUN/oracle" --max-steps "${QS_ORACLE_STEPS:-120}" --batch 64 --lr 0.05 \
  --data-dir "$ADAPTIVENET_ASSETS/fashion-mnist" | tail -n 12

step "cloud server on $ENDPOINT"
"${CLOUD[@]}" migrate
ADMIN=$("${CLOUD[@]}" token create-api --role admin --description quickstart | awk '/^token:/ {print $2}')
VIEWER=$("${CLOUD[@]}" token create-api --role viewer --description dashboard | awk '/^token:/ {print $2}')
FLEET=$("${CLOUD[@]}" fleet create demo-fleet | tail -n 1)
ENROLL=$("${CLOUD[@]}" token create-enrollment --fleet demo-fleet --uses 3 | awk '/^token:/ {print $2}')
"${CLOUD[@]}" serve --listen "127.0.0.1:$PORT" --workers 1 > "$RUN/cloud.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q "cloud-server ready" "$RUN/cloud.log" && break; sleep 0.2; done
CLIENT=("$BIN/cloud-server" client --endpoint "$ENDPOINT" --token "$ADMIN")

step "upload the oracle and elastify it as a job"
ORACLE=$("${CLIENT[@]}" upload --name resnet20-fmnist --arch "$RUN/oracle/oracle.arch.json" "$RUN/oracle/oracle.safetensors" | awk '{print $3}')
DATASET=$("${CLIENT[@]}" register-dataset --name fashion-mnist --uri "$ADAPTIVENET_ASSETS/fashion-mnist" --num-samples 60000 | awk '{print $2}')
PARAMS='{"stage0_steps":'"${QS_STAGE_STEPS:-40}"',"stage1_steps":'"${QS_STAGE_STEPS:-40}"',"batch":64,"max_train_images":8000,"val_size":500,"priors":24,"checkpoint_every":20}'
"${CLIENT[@]}" elastify "$ORACLE" --dataset-id "$DATASET" --params "$PARAMS" --watch | tee "$RUN/job.txt"
SUPERNET=$(awk '/ Succeeded / {print $4}' "$RUN/job.txt")
[ -n "$SUPERNET" ] || { echo "elastification did not succeed (see $RUN/cloud.log)" >&2; exit 1; }
"${CLIENT[@]}" publish "$SUPERNET" --fleet "$FLEET" --label stable
"${CLIENT[@]}" desire --fleet "$FLEET" --label stable --budget-fraction 0.6

step "three edge agents (separate processes, different conditions)"
python3 scripts/make-device-data.py "$ADAPTIVENET_ASSETS/fashion-mnist" "$RUN/devices" 600
agent() { # name threads budget data
  "$BIN/edge-agent" run --cloud "$ENDPOINT" --enroll-token "$ENROLL" --state "$RUN/agents/$1" \
    --threads "$2" --budget "$3" --data "$RUN/devices/$4" --images 300 --population 16 --generations 3 \
    --rounds 15 --validate 10 --label-free --duration "${QS_SERVE_S:-60}" --heartbeat-ms 2000 --report-every 2 \
    > "$RUN/agent-$1.log" 2>&1
}
agent phone 1 0.6 all & PIDS+=($!); A1=$!
agent camera 1 0.5 footwear & PIDS+=($!); A2=$!
agent gateway 2 0.8 dirichlet & PIDS+=($!); A3=$!
# A contention episode on the machine while the agents serve (every agent shares these cores).
( sleep "${QS_CONTENTION_AT:-40}"; timeout 10 sh -c 'while :; do :; done' ) & PIDS+=($!)
wait "$A1" "$A2" "$A3" || true

step "per-device summary"
for spec in "phone 1 all" "camera 1 footwear" "gateway 2 dirichlet"; do
  set -- $spec
  log="$RUN/agent-$1.log"
  echo "-- $1 (threads $2, local data: $3)"
  grep -E "latency model|^search: |^budget |^served " "$log" | sed 's/\x1b\[[0-9;]*m//g; s/^.*INFO edge_agent: //' || true
  echo "   switches: $(grep -c '^switched ' "$log" || true)"
  grep -E "^pareto front|^  [0-9xPp]+ " "$log" | sed 's/^/   /' || true
done

step "fleet aggregates (as a dashboard queries them)"
"$BIN/cloud-server" client --endpoint "$ENDPOINT" --token "$VIEWER" aggregates

echo; echo "quickstart finished in $(( $(date +%s) - T0 )) s after the build; logs in $RUN"
