#!/usr/bin/env bash
# The main job, end to end on one machine: fetch assets, build, train a demo oracle, start the
# cloud (SQLite + local blobs by default), upload + elastify the oracle as a job, publish it to a
# fleet, start three edge agents as separate processes with different conditions (threads,
# budget, local data mix, a contention episode), and print what each device chose, how its
# label-free choice scores against the labels of its local data, and the fleet aggregates a
# dashboard sees.
#
# Elastification runs 300 + 300 steps of 64 (QS_STAGE_STEPS=N per stage): enough that the
# device with a 0.6 budget keeps about 0.93 of the oracle's accuracy on its local data, and
# the whole run stays within about 10 minutes after the build on 2 cores.
#
#   scripts/quickstart.sh                    # SQLite (embedded default)
#   scripts/quickstart.sh --postgres         # PostgreSQL: a fresh database on 127.0.0.1:5432
#                                            # (created with psql, dropped at the end)
#   scripts/quickstart.sh --postgres URL     # PostgreSQL at URL (an empty database you own)
#   scripts/quickstart.sh --console          # also serve the operator console (web UI) on
#                                            # 127.0.0.1:$QS_CONSOLE_PORT (default 8080), print
#                                            # its address and viewer token, and keep it up
#                                            # after the run until Ctrl-C
#
# Output (logs, per-device state, SVG plots) goes to $QS_OUT (default <repo>/.run/quickstart).
#
# Quick presets keep this to a few minutes on 2 cores; the full-size figures come from the
# benchmarks (cargo bench --bench kernels / accuracy_latency / search / fleet).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The same build directory as the test command (scripts/test.sh), so a user builds the
# dependencies once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/adaptivenet/target}"
export ADAPTIVENET_ASSETS="${ADAPTIVENET_ASSETS:-$ROOT/.assets}"
RUN="${QS_OUT:-$ROOT/.run/quickstart}"
PORT="${ADAPTIVENET_PORT:-50151}"
ENDPOINT="http://127.0.0.1:$PORT"
PG_URL=""      # set by --postgres
PG_DROP=""     # a database this script created (dropped on exit)
CONSOLE=""     # set by --console
CONSOLE_ADDR="127.0.0.1:${QS_CONSOLE_PORT:-8080}"
while [ $# -gt 0 ]; do
  case "$1" in
    --postgres)
      if [ -n "${2:-}" ] && [ "${2#--}" = "$2" ]; then PG_URL="$2"; shift; else PG_URL="fresh"; fi ;;
    --console) CONSOLE=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --postgres [URL], --console)" >&2; exit 2 ;;
  esac
  shift
done

step() { printf '\n== %s\n' "$*"; }
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$PG_DROP" ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $PG_DROP WITH (FORCE)" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

DB_ARGS=()
if [ "$PG_URL" = "fresh" ]; then
  command -v psql >/dev/null || { echo "--postgres without a URL needs psql (apt install postgresql-client)" >&2; exit 1; }
  PG_DB="adaptivenet_qs_$(date +%s)_$$"
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $PG_DB" \
    || { echo "cannot create a database on 127.0.0.1:5432 as postgres; pass --postgres URL" >&2; exit 1; }
  PG_DROP="$PG_DB"
  PG_URL="postgres://postgres@127.0.0.1:5432/$PG_DB"
fi
if [ -n "$PG_URL" ]; then
  DB_ARGS=(--database-url "$PG_URL")
  echo "database: PostgreSQL ${PG_URL%%\?*}"
else
  echo "database: SQLite in $RUN/cloud"
fi

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

DEMO_ORACLE="$ROOT/cloud-server/assets/oracle"
if [ -f "$DEMO_ORACLE/oracle.safetensors" ] && [ -z "${QS_ORACLE_STEPS:-}" ]; then
  step "demo oracle: ResNet-20 on Fashion-MNIST, trained with the full recipe ('cloud-server train-oracle' defaults; set QS_ORACLE_STEPS=N to train a quick one instead)"
  mkdir -p "$RUN/oracle" && cp "$DEMO_ORACLE"/oracle.arch.json "$DEMO_ORACLE"/oracle.safetensors "$RUN/oracle/"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("test accuracy %.2f%% after %d steps" % (100 * r["test_accuracy"], r["steps"]))' \
    "$DEMO_ORACLE/train-report.json" 2>/dev/null || true
else
  step "demo oracle: ResNet-20 on Fashion-MNIST (quick preset; the full recipe is 'cloud-server train-oracle --hflip')"
  "$BIN/cloud-server" train-oracle --out-dir "$RUN/oracle" --max-steps "${QS_ORACLE_STEPS:-120}" --batch 64 --lr 0.05 \
    --data "$ADAPTIVENET_ASSETS/fashion-mnist" --hflip | tail -n 12
fi

step "cloud server on $ENDPOINT"
RUST_LOG=warn "${CLOUD[@]}" migrate
ADMIN=$(RUST_LOG=warn "${CLOUD[@]}" token create-api --role admin --description quickstart | awk '/^token:/ {print $2}')
VIEWER=$(RUST_LOG=warn "${CLOUD[@]}" token create-api --role viewer --description dashboard | awk '/^token:/ {print $2}')
FLEET=$(RUST_LOG=warn "${CLOUD[@]}" fleet create demo-fleet | tail -n 1)
ENROLL=$(RUST_LOG=warn "${CLOUD[@]}" token create-enrollment --fleet demo-fleet --uses 3 | awk '/^token:/ {print $2}')
WEB_ARGS=()
[ -n "$CONSOLE" ] && WEB_ARGS=(--web-listen "$CONSOLE_ADDR")
# A demo fleet of three devices: the dashboard's privacy floor (default 5 devices per group)
# would suppress its only group, so it is lowered to 3 here.
"${CLOUD[@]}" serve --listen "127.0.0.1:$PORT" --workers 1 --dataset-root "$ADAPTIVENET_ASSETS" \
  --min-group-devices 3 "${WEB_ARGS[@]}" > "$RUN/cloud.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q "cloud-server ready" "$RUN/cloud.log" && break; sleep 0.2; done
CLIENT=("$BIN/cloud-server" client --endpoint "$ENDPOINT" --token "$ADMIN")
console_banner() {
  echo "operator console: http://$CONSOLE_ADDR/  (sign in with the viewer token: $VIEWER)"
}
[ -n "$CONSOLE" ] && console_banner

step "upload the oracle and elastify it as a job"
ORACLE=$("${CLIENT[@]}" upload --name resnet20-fmnist --arch "$RUN/oracle/oracle.arch.json" "$RUN/oracle/oracle.safetensors" | awk '{print $3}')
DATASET=$("${CLIENT[@]}" register-dataset --name fashion-mnist --uri "$ADAPTIVENET_ASSETS/fashion-mnist" --num-samples 60000 | awk '{print $2}')
PARAMS='{"stage0_steps":'"${QS_STAGE_STEPS:-300}"',"stage1_steps":'"${QS_STAGE_STEPS:-300}"',"batch":64,"max_train_images":8000,"val_size":500,"priors":24,"checkpoint_every":100}'
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
    --rounds 15 --validate 10 --label-free --bn-recal auto --duration "${QS_SERVE_S:-60}" --heartbeat-ms 2000 --report-every 2 \
    > "$RUN/agent-$1.log" 2>&1
}
agent phone 1 0.6 all & PIDS+=($!); A1=$!
agent camera 1 0.55 footwear & PIDS+=($!); A2=$!
agent gateway 2 0.8 dirichlet & PIDS+=($!); A3=$!
# A contention episode on the machine while the agents serve (every agent shares these cores).
( sleep "${QS_CONTENTION_AT:-40}"; timeout 10 sh -c 'while :; do :; done' ) & PIDS+=($!)
wait "$A1" "$A2" "$A3" || true

step "per-device summary"
# One row per device from its log: the search's choice for the budget (predicted latency per the
# calibrated table, local quality), search time, then what serving measured and how often the
# controller switched.
printf '%-8s %-3s %-9s %-10s %-11s %-12s %-8s %-9s %-10s %-8s %s\n' \
  device thr data budget_ms chosen predicted_ms quality search_s measured_p50 switches active
for spec in "phone 1 all" "camera 1 footwear" "gateway 2 dirichlet"; do
  set -- $spec
  log="$RUN/agent-$1.log"
  clean=$(sed 's/\x1b\[[0-9;]*m//g' "$log")
  b=$(grep -m1 -E '^budget [0-9.]+ ms: ' <<<"$clean" || true)
  s=$(grep -m1 -E '^search: ' <<<"$clean" || true)
  v=$(grep -m1 -E '^served ' <<<"$clean" || true)
  if [ -z "$b" ]; then
    printf '%-8s %-3s %-9s failed: %s\n' "$1" "$2" "$3" "$(grep -m1 '^error' <<<"$clean" || tail -n 1 <<<"$clean")"
    continue
  fi
  printf '%-8s %-3s %-9s %-10s %-11s %-12s %-8s %-9s %-10s %-8s %s\n' "$1" "$2" "$3" \
    "$(awk '{print $2}' <<<"$b")" "$(awk '{print $4}' <<<"$b")" "$(awk '{print $6}' <<<"$b")" \
    "$(awk '{print $9}' <<<"$b")" "$(awk '{print $5}' <<<"${s:-x x x x -}")" \
    "$(sed -n 's/.*live p50 \([0-9.]*\) ms.*/\1/p' <<<"$v")" \
    "$(sed -n 's/.*; \([0-9]*\) switches.*/\1/p' <<<"$v")" "$(sed -n 's/.*; active \([^;]*\).*/\1/p' <<<"$v")"
done
for name in phone camera gateway; do
  echo "-- $name"
  sed 's/\x1b\[[0-9;]*m//g' "$RUN/agent-$name.log" \
    | grep -E "latency model|^BN recalibration|^pareto front|^  [0-9xPp]+ " | sed 's/^.*INFO [A-Za-z_:]*: //; s/^/   /' || true
done

step "labelled check on each device (the demo's local data has labels; a real device may not)"
# The agents searched label-free (agreement with the oracle on 300 local images). Here each
# device scores its plan against the labels of all its local images, as `edge-agent evaluate`
# does on a device: the chosen subnet as it serves, the shipped oracle, retained = chosen /
# oracle, and whether a search by labels would have picked the same subnet from the front.
printf '%-8s %-9s %-10s %-11s %-10s %-9s %-9s %-9s %s\n' \
  device data budget_ms chosen agreement accuracy oracle retained labelled_pick
for spec in "phone all" "camera footwear" "gateway dirichlet"; do
  set -- $spec
  if ! "$BIN/edge-agent" evaluate --state "$RUN/agents/$1" --data "$RUN/devices/$2" --label-free \
      --bn-recal auto --json > "$RUN/evaluate-$1.json" 2> "$RUN/evaluate-$1.log"; then
    printf '%-8s %-9s failed: %s\n' "$1" "$2" "$(tail -n 1 "$RUN/evaluate-$1.log")"
    continue
  fi
  python3 - "$1" "$2" "$RUN/evaluate-$1.json" <<'PY'
import json, sys
name, data, path = sys.argv[1:4]
e = json.load(open(path))
for b in e["budgets"]:
    c, p = b["chosen"], b["labelled_pick"]
    pick = "same" if p["subnet"] == c["subnet"] else "%s (%.1f%%)" % (p["subnet"], p["accuracy"])
    print("%-8s %-9s %-10.3f %-11s %-10s %-9s %-9s %-9.3f %s" % (
        name, data, b["budget_ms"], c["subnet"], "%.1f%%" % c["agreement"], "%.1f%%" % c["accuracy"],
        "%.1f%%" % e["oracle_accuracy"], b["retained"], pick))
PY
done

step "fleet aggregates (as a dashboard queries them)"
"$BIN/cloud-server" client --endpoint "$ENDPOINT" --token "$VIEWER" aggregates

step "plots (SVG): Pareto front and adaptation timeline per device"
for name in phone camera gateway; do
  "$BIN/edge-agent" plot --state-dir "$RUN/agents/$name" --out "$RUN/plots/$name" --title "$name" \
    | sed "s/^/   $name: /" || echo "   $name: no plots (see $RUN/agent-$name.log)"
done

echo; echo "quickstart finished in $(( $(date +%s) - T0 )) s after the build; logs in $RUN"

if [ -n "$CONSOLE" ]; then
  step "operator console"
  console_banner
  echo "the cloud keeps serving it; press Ctrl-C to stop"
  wait "${PIDS[0]}" || true
fi
