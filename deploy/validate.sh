#!/usr/bin/env bash
# Validates deploy/ without a container engine or cluster: YAML parses, kustomize renders, the
# systemd unit verifies, and the binaries start with the exact flags/env the files use.
#   deploy/validate.sh [postgres-url]     (default postgres://postgres@127.0.0.1:5432/test)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
PG=${1:-postgres://postgres@127.0.0.1:5432/test}
T=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$T"' EXIT
ok() { printf 'OK   %s\n' "$*"; }; bad() { printf 'FAIL %s\n' "$*"; FAILED=1; }; FAILED=0

for f in deploy/compose/*.yml deploy/k8s/*.yaml; do
  python3 -c "import yaml,sys; list(yaml.safe_load_all(open(sys.argv[1])))" "$f" && ok "yaml $f" || bad "yaml $f"
done
if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/k8s >/dev/null && ok "kubectl kustomize deploy/k8s" || bad "kustomize"
fi
if command -v systemd-analyze >/dev/null; then
  mkdir -p "$T/unit"; cp deploy/systemd/agent.env.example "$T/unit/agent.env"
  sed "s#/usr/local/bin/edge-agent#$PWD/$BIN/edge-agent#; s#/etc/adaptivenet/agent.env#$T/unit/agent.env#" \
    deploy/systemd/adaptivenet-agent.service > "$T/unit/adaptivenet-agent.service"
  systemd-analyze verify "$T/unit/adaptivenet-agent.service" && ok "systemd-analyze verify" || bad "systemd-analyze verify"
fi

healthz() { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3 && grep -q '200 OK' <&3; }
# start NAME SECONDS CMD...: runs CMD, fails if it exits within SECONDS.
start() { local name=$1 secs=$2; shift 2; "$@" >"$T/$name.log" 2>&1 & local p=$!; PIDS+=("$p"); sleep "$secs"
  if kill -0 "$p" 2>/dev/null; then ok "$name still running after ${secs}s"; else bad "$name exited: $(tail -n 3 "$T/$name.log")"; fi; }

for db in sqlite postgres; do
  export ADAPTIVENET_DATA_DIR="$T/data-$db"; unset ADAPTIVENET_DATABASE_URL
  [ "$db" = postgres ] && export ADAPTIVENET_DATABASE_URL="$PG"
  port=$((50900 + RANDOM % 50)); mport=$((9900 + RANDOM % 50))
  "$BIN/cloud-server" migrate >"$T/migrate-$db.log" 2>&1 && ok "[$db] cloud-server migrate" || bad "[$db] migrate: $(tail -n 3 "$T/migrate-$db.log")"
  start "api-$db" 3 "$BIN/cloud-server" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" --workers 0
  healthz "$mport" && ok "[$db] /healthz on the metrics listener" || bad "[$db] /healthz"
  start "worker-$db" 3 "$BIN/cloud-server" worker --concurrency 1
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; PIDS=()
  grep -q draining "$T/api-$db.log" && ok "[$db] serve drained on SIGTERM" || bad "[$db] no drain on SIGTERM"
done
unset ADAPTIVENET_DATA_DIR ADAPTIVENET_DATABASE_URL

# edge-agent: every flag the compose file, DaemonSet and systemd unit pass must exist.
help=$("$BIN/edge-agent" run --help)
for flag in --cloud --state --data --budget --threads --label-free; do
  grep -qE -- "^ +$flag( |$)" <<<"$help" && ok "edge-agent run $flag" || bad "edge-agent run lacks $flag"
done
grep -q ADAPTIVENET_ENROLL_TOKEN <<<"$help" && ok "edge-agent reads ADAPTIVENET_ENROLL_TOKEN" || bad "enroll env"
exit $FAILED
