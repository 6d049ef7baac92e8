#!/usr/bin/env bash
# Validates deploy/ without a container engine or cluster: YAML parses, kustomize renders, the
# systemd unit verifies, and the binaries start with the exact flags/env the files use, TLS
# included (development certificates from deploy/dev-certs.sh, in a temporary directory).
#   deploy/validate.sh [postgres-url]     (default postgres://postgres@127.0.0.1:5432/test)
# The binaries must be TLS builds, as the images are:
#   cargo build -p adaptivenet-cloud -p adaptivenet-edge --features adaptivenet-cloud/tls,adaptivenet-edge/tls
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
BIN=$(cd "$BIN" 2>/dev/null && pwd || echo "$PWD/$BIN") # absolute: the systemd unit needs it
PG=${1:-postgres://postgres@127.0.0.1:5432/test}
T=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$T"' EXIT
ok() { printf 'OK   %s\n' "$*"; }; bad() { printf 'FAIL %s\n' "$*"; FAILED=1; }; FAILED=0

for f in deploy/compose/*.yml deploy/k8s/*.yaml; do
  python3 -c "import yaml,sys; list(yaml.safe_load_all(open(sys.argv[1])))" "$f" && ok "yaml $f" || bad "yaml $f"
done
for f in deploy/prometheus/*.yml deploy/grafana/provisioning/*/*.yml; do
  python3 -c "import yaml,sys; yaml.safe_load(open(sys.argv[1]))" "$f" && ok "yaml $f" || bad "yaml $f"
done
# Monitoring: the dashboard is JSON whose panels all have PromQL targets; every rule has an
# alert name, an expression and a summary (the metric names themselves are checked against a
# live /metrics by cloud-server/tests/monitoring.rs).
python3 - <<'PY' && ok "grafana dashboard and alert rules are well-formed" || bad "grafana/alerts structure"
import json, yaml
d = json.load(open("deploy/grafana/adaptivenet.json"))
panels = [p for p in d["panels"] if p["type"] != "row"]
assert panels and all(p.get("targets") and all(t["expr"].strip() for t in p["targets"]) for p in panels)
rules = [r for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"] for r in g["rules"]]
assert rules and all(r["alert"] and r["expr"].strip() and r["annotations"]["summary"] for r in rules)
PY
if command -v promtool >/dev/null; then
  promtool check rules deploy/prometheus/alerts.yml >/dev/null && ok "promtool check rules" || bad "promtool check rules"
fi
if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/k8s >/dev/null && ok "kubectl kustomize deploy/k8s" || bad "kustomize"
fi
if command -v systemd-analyze >/dev/null; then
  mkdir -p "$T/unit"; cp deploy/systemd/agent.env.example "$T/unit/agent.env"
  sed "s#/usr/local/bin/edge-agent#$BIN/edge-agent#; s#/etc/adaptivenet/agent.env#$T/unit/agent.env#" \
    deploy/systemd/adaptivenet-agent.service > "$T/unit/adaptivenet-agent.service"
  systemd-analyze verify "$T/unit/adaptivenet-agent.service" && ok "systemd-analyze verify" || bad "systemd-analyze verify"
fi

deploy/dev-certs.sh "$T/certs" device-1 >"$T/dev-certs.log" 2>&1 \
  && openssl verify -CAfile "$T/certs/ca.pem" "$T/certs/server.pem" >/dev/null \
  && openssl verify -CAfile "$T/certs/devices-ca.pem" "$T/certs/device-device-1.pem" >/dev/null \
  && ok "deploy/dev-certs.sh: CA, server and device certificates verify" || bad "dev-certs.sh: $(tail -n 3 "$T/dev-certs.log")"
TLS=(--tls-cert "$T/certs/server.pem" --tls-key "$T/certs/server.key")

# A port nothing listens on now (bound and released by the kernel's choice).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
healthz() { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3 && grep -q '200 OK' <&3; }
# start NAME SECONDS CMD...: runs CMD, fails if it exits within SECONDS.
start() { local name=$1 secs=$2; shift 2; "$@" >"$T/$name.log" 2>&1 & local p=$!; PIDS+=("$p"); sleep "$secs"
  if kill -0 "$p" 2>/dev/null; then ok "$name still running after ${secs}s"; else bad "$name exited: $(tail -n 3 "$T/$name.log")"; fi; }

for db in sqlite postgres; do
  export ADAPTIVENET_DATA_DIR="$T/data-$db"; unset ADAPTIVENET_DATABASE_URL
  [ "$db" = postgres ] && export ADAPTIVENET_DATABASE_URL="$PG"
  port=$(free_port); mport=$(free_port)
  "$BIN/cloud-server" migrate >"$T/migrate-$db.log" 2>&1 && ok "[$db] cloud-server migrate" || bad "[$db] migrate: $(tail -n 3 "$T/migrate-$db.log")"
  start "api-$db" 3 "$BIN/cloud-server" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" --workers 0 "${TLS[@]}"
  healthz "$mport" && ok "[$db] /healthz on the metrics listener" || bad "[$db] /healthz"
  # A TLS handshake against the development CA: the call gets as far as authentication.
  out=$("$BIN/cloud-server" client --endpoint "https://localhost:$port" --ca-file "$T/certs/ca.pem" \
        --token anv1_api_validate list oracles 2>&1)
  grep -qi unauthenticated <<<"$out" && ok "[$db] gRPC over TLS with the development CA" || bad "[$db] TLS call: $(tail -n 2 <<<"$out")"
  start "worker-$db" 3 "$BIN/cloud-server" worker --concurrency 1
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; PIDS=()
  grep -q draining "$T/api-$db.log" && ok "[$db] serve drained on SIGTERM" || bad "[$db] no drain on SIGTERM"
done
unset ADAPTIVENET_DATA_DIR ADAPTIVENET_DATABASE_URL

# The exact command lines of compose, the k8s manifests and the systemd unit (variables
# substituted from the compose defaults, the ConfigMap and agent.env.example), run for real
# with hosts and volumes pointed at local stand-ins: each must get past argument parsing
# (clap exits 2 on a usage error) to its first real step.
mkdir -p "$T/state" "$T/data"
BIN="$BIN" T="$T" PG="$PG" python3 - <<'PY' || FAILED=1
import json, os, re, socket, subprocess, sys, yaml
BIN, T, PG = os.environ["BIN"], os.environ["T"], os.environ["PG"]
cm = {}
for d in yaml.safe_load_all(open("deploy/k8s/configmap.yaml")):
    if d and d.get("kind") == "ConfigMap":
        cm.update(d.get("data", {}))
envfile = dict(l.split("=", 1) for l in open("deploy/systemd/agent.env.example").read().splitlines()
               if l and not l.startswith("#") and "=" in l)
cmds = []  # (source, binary, args)
compose = yaml.safe_load(open("deploy/compose/docker-compose.yml"))
for name, svc in compose["services"].items():
    img = str(svc.get("image", ""))
    if "command" in svc and ("cloud-server" in img or "edge-agent" in img):
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()
               if k in ("ADAPTIVENET_CA_FILE", "ADAPTIVENET_TLS_CERT", "ADAPTIVENET_TLS_KEY")}
        cmds.append((f"compose {name}", "edge-agent" if "edge-agent" in img else "cloud-server", svc["command"], env))
for f in sorted(os.listdir("deploy/k8s")):
    for d in yaml.safe_load_all(open(f"deploy/k8s/{f}")):
        spec = (d or {}).get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            img = c.get("image", "")
            if "adaptivenet/" in img:
                args = [re.sub(r"\$\((\w+)\)", lambda m: cm.get(m.group(1), m.group(0)), a) for a in c.get("args", [])]
                cmds.append((f"k8s {f}:{c['name']}", img.split("/")[1].split(":")[0], args, {}))
unit = open("deploy/systemd/adaptivenet-agent.service").read()
exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
sd_args = [re.sub(r"\$\{(\w+)\}", lambda m: envfile.get(m.group(1), m.group(0)), a) for a in exec_start.group(2).split()]
cmds.append(("systemd ExecStart", "edge-agent", sd_args, {}))
failed = 0
def free_port():
    # A port nothing listens on now (the kernel's choice), not a fixed one another process may hold.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
# Certificates and keys mounted under /etc/adaptivenet come from the development set.
certs = lambda a: re.sub(r"^/etc/adaptivenet/(?:tls/)?([^/]+)$", lambda m: f"{T}/certs/{m.group(1)}", a)
for src, binary, args, env_extra in cmds:
    local = []
    for a in args:
        a = re.sub(r"^(https?)://[^/]+$", r"\1://127.0.0.1:9", a)        # a closed local port
        a = certs(a)
        a = re.sub(r"^0\.0\.0\.0:(\d+)$", lambda m: f"127.0.0.1:{free_port()}", a)
        a = {"/state": f"{T}/state", "/data": f"{T}/data"}.get(a, a)
        a = a.replace("/var/lib/adaptivenet-agent", f"{T}/state").replace("/srv/adaptivenet/data", f"{T}/data")
        local.append(a)
    env = dict(os.environ, RUST_BACKTRACE="0", ADAPTIVENET_DATA_DIR=f"{T}/cmd-data", ADAPTIVENET_DATABASE_URL=PG,
               ADAPTIVENET_ENROLL_TOKEN="anv1_enr_validate",
               **{k: certs(v) for k, v in env_extra.items()})
    long_running = binary == "cloud-server" and local[:1] in (["serve"], ["worker"])
    try:
        p = subprocess.run([f"{BIN}/{binary}", *local], env=env, capture_output=True, text=True,
                           timeout=4 if long_running else 60)
        code, err = p.returncode, (p.stderr + p.stdout).strip().splitlines()
    except subprocess.TimeoutExpired:
        code, err = None, ["still running"]
    if long_running:
        good = code is None                                    # serving / polling the queue
    elif binary == "edge-agent":
        good = code == 1 and any("unreachable" in l or "nothing cached" in l for l in err)
    else:
        good = code == 0
    print(("OK   " if good else "FAIL ") + f"{src}: {binary} {' '.join(args)}"
          + ("" if good else f"  -> exit {code}: {err[-1] if err else ''}"))
    failed |= not good
sys.exit(failed)
PY

# edge-agent: every flag the compose file, DaemonSet and systemd unit pass must exist.
help=$("$BIN/edge-agent" run --help)
for flag in --cloud --state --data --budget --threads --label-free --ca-file --tls-cert --tls-key; do
  grep -qE -- "^ +$flag( |$)" <<<"$help" && ok "edge-agent run $flag" || bad "edge-agent run lacks $flag"
done
grep -q ADAPTIVENET_ENROLL_TOKEN <<<"$help" && ok "edge-agent reads ADAPTIVENET_ENROLL_TOKEN" || bad "enroll env"
grep -q ADAPTIVENET_CA_FILE <<<"$help" && ok "edge-agent reads ADAPTIVENET_CA_FILE" || bad "CA file env"
"$BIN/cloud-server" serve --help | grep -qE -- "^ +--tls-client-ca( |$)" && ok "cloud-server serve --tls-client-ca" || bad "serve lacks --tls-client-ca"
exit $FAILED
