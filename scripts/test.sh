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

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== tests"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/adaptivenet-test.log
echo "== TLS (cargo feature tls: real gRPC over rustls, server, CLI client)"
cargo test -p adaptivenet-cloud --features tls --test tls 2>&1 | tee -a /tmp/adaptivenet-test.log
