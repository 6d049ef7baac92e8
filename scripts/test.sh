#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetches the asset tier, checks formatting and
# lints, then runs every test of the workspace, the asset tier and PostgreSQL included.
set -euo pipefail
cd "$(dirname "$0")/.."

# One persistent target directory across clones of this repository: a cold build of candle +
# tonic + sqlx takes many minutes on 2 cores; a warm one seconds. Override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/adaptivenet/target}"
export CARGO_TERM_COLOR=never
# Fetched assets (Fashion-MNIST, EfficientNet-Lite0, sample photos) are cached here as well.
export ADAPTIVENET_ASSETS="${ADAPTIVENET_ASSETS:-$PWD/.assets}"

echo "== assets"
scripts/fetch-assets.sh
# Assets were fetched: tests that need them must not skip.
export ADAPTIVENET_REQUIRE_ASSETS=1

echo "== PostgreSQL"
if pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  echo "PostgreSQL at 127.0.0.1:5432 is up: the PostgreSQL tier runs"
  export ADAPTIVENET_REQUIRE_PG=1
else
  echo "PostgreSQL at 127.0.0.1:5432 unreachable: PostgreSQL tests print a skip reason"
fi

echo "== browser (Chromium + ChromeDriver: the operator console's WebDriver test runs in the tests below)"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
# Installed: the console test must not skip.
export ADAPTIVENET_REQUIRE_BROWSER=1

echo "== fmt"
cargo fmt --all -- --check
echo "== no dataset constants"
scripts/check-no-dataset-constants.sh
echo "== no module cycles"
python3 scripts/check-module-cycles.py
echo "== no shared folder outside the repository"
python3 scripts/check-no-outside-paths.py
echo "== clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== tests"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/adaptivenet-test.log
echo "operator console screenshots (cloud-server/tests/console.rs): $CARGO_TARGET_DIR/console-screenshots/"
echo "== AVX2 routes (ADAPTIVENET_MAX_ISA=avx2: the kernels' tests and the folded-model parity tests again on the kernels an AVX2-only CPU runs; a no-op on such a CPU)"
# `--workspace` with named targets: the test binaries built above, with the workspace's
# features (a `-p` run resolves features per package and rebuilds candle).
ADAPTIVENET_MAX_ISA=avx2 cargo test --workspace --test parity --test backends --test direct \
  --test winograd --test mbconv --test dw_train --test pw_train --test grads --test train_ops \
  2>&1 | tee -a /tmp/adaptivenet-test.log
echo "== hostile-client suite: attack | expected | observed"
cargo test -p adaptivenet-tests --test hostile -- --nocapture 2>&1 | grep -E '^\|' | awk '!seen[$0]++'
echo "== TLS (cargo feature tls: real gRPC over rustls; server, CLI client, edge agent, mutual TLS)"
# One invocation, so the cloud and the agent share one TLS build of tonic and the crates above it.
cargo test -p adaptivenet-cloud -p adaptivenet-edge \
  --features adaptivenet-cloud/tls,adaptivenet-edge/tls --test tls 2>&1 | tee -a /tmp/adaptivenet-test.log
echo "== deploy/ (YAML, kustomize, systemd unit, and every command line of compose, Kubernetes and systemd run with the TLS binaries just built)"
if [ "${ADAPTIVENET_REQUIRE_PG:-}" = 1 ]; then
  DEPLOY_DB="an_deploy_$$"
  psql -q -h 127.0.0.1 -U postgres -d test -c "CREATE DATABASE $DEPLOY_DB"
  deploy_rc=0
  BIN="$CARGO_TARGET_DIR/debug" deploy/validate.sh "postgres://postgres@127.0.0.1:5432/$DEPLOY_DB" || deploy_rc=$?
  psql -q -h 127.0.0.1 -U postgres -d test -c "DROP DATABASE $DEPLOY_DB WITH (FORCE)"
  [ "$deploy_rc" = 0 ]
else
  echo "skipped: deploy/validate.sh runs the PostgreSQL configuration too"
fi
echo "== S3 (blob and s3:// dataset tests with --features s3 against a local S3-compatible server: moto, pinned)"
# moto in server mode from PyPI, in a venv next to the target dir, on 127.0.0.1 and a free
# port; stopped on exit. A server that cannot start fails the run.
S3_VENV="$CARGO_TARGET_DIR/../moto-venv-5.2.5"
if [ ! -x "$S3_VENV/bin/moto_server" ]; then
  python3 -m venv "$S3_VENV"
  "$S3_VENV/bin/pip" install --quiet 'moto[server]==5.2.5'
fi
S3_PORT="$("$S3_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$S3_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >/tmp/adaptivenet-moto.log 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
if ! "$S3_VENV/bin/python" - "$S3_PORT" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/adaptivenet-test"
for _ in range(100):
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit(1)
PY
then
  echo "the S3-compatible server (moto) did not start on 127.0.0.1:$S3_PORT:" >&2
  cat /tmp/adaptivenet-moto.log >&2
  exit 1
fi
AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
  ADAPTIVENET_S3_BUCKET=adaptivenet-test ADAPTIVENET_REQUIRE_S3=1 \
  cargo test -p adaptivenet-cloud --features s3 --test blobs --test datasets_s3 2>&1 | tee -a /tmp/adaptivenet-test.log
# The happy path with every blob (oracle, dataset shards, checkpoints, modules) in the bucket:
# the real binaries, the cloud's built with the s3 feature.
cargo build --quiet -p adaptivenet-cloud --features s3 --bin cloud-server
AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
  ADAPTIVENET_S3_BUCKET=adaptivenet-test ADAPTIVENET_REQUIRE_S3=1 \
  cargo test -p adaptivenet-tests --test happy_path happy_path_on_s3 2>&1 | tee -a /tmp/adaptivenet-test.log
echo "== plain clone (HEAD cloned into an empty directory: the path check and the tests that read fixtures, with nothing beside the clone)"
# What a user who finds the repository gets: the committed tree only, no sibling folders, no
# fixture variables. It shares the target directory, so only the workspace's own crates are
# rebuilt (dependencies are reused). Cargo names their outputs by the path relative to the
# workspace, so the clone's builds land where this checkout's do; it is the last step, so no
# step above rebuilds after it, and files that differ from HEAD here are touched afterwards,
# so the next build of this checkout recompiles them instead of reusing the clone's.
(
  CHECKOUT="$PWD"
  CLONE_PARENT="$(mktemp -d)"
  restore() {
    rm -rf "$CLONE_PARENT"
    cd "$CHECKOUT"
    { git diff --name-only -z HEAD; git ls-files -z --others --exclude-standard; } \
      | xargs -0 -r touch -c --
  }
  trap restore EXIT
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "note: uncommitted changes are not in the clone (it has HEAD, $(git rev-parse --short HEAD))"
  fi
  git clone --quiet "$CHECKOUT" "$CLONE_PARENT/adaptivenet"
  cd "$CLONE_PARENT/adaptivenet"
  python3 scripts/check-no-outside-paths.py
  env -u ADAPTIVENET_FIXTURES cargo test --workspace \
    --test parity --test weights --test pth_bomb --test oracle_verify 2>&1 | tee -a /tmp/adaptivenet-test.log
)
