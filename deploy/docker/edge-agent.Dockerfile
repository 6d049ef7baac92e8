# syntax=docker/dockerfile:1.7
# edge-agent: profiles the device, searches the supernet on local data, serves and adapts.
#
# Build from the repository root:
#   DOCKER_BUILDKIT=1 docker build -f deploy/docker/edge-agent.Dockerfile -t adaptivenet/edge-agent .
# (BuildKit uses deploy/docker/edge-agent.Dockerfile.dockerignore for the context.)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# `--features tls`: `--cloud https://...` with --ca-file (and --tls-cert/--tls-key for mutual TLS).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p adaptivenet-edge --features tls --bin edge-agent \
 && mkdir -p /out \
 && cp target/release/edge-agent /out/ \
 && strip --strip-debug /out/edge-agent

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# /state: identity.json (0600), latency table, search result, active subnet, supernet cache.
# It must be persistent (a restart then serves again without enrolling, profiling or searching).
# /data: the device's local data (IDX or ImageFolder), mounted read-only; it never leaves the
# process.
RUN groupadd --system --gid 10001 adaptivenet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin adaptivenet \
 && install -d -o 10001 -g 10001 -m 0700 /state \
 && install -d -o 10001 -g 10001 -m 0755 /data
COPY --from=builder /out/edge-agent /usr/local/bin/edge-agent
ENV RUST_LOG=info
USER 10001:10001
WORKDIR /state
# The agent stops cleanly on SIGINT and SIGTERM (it installs handlers for both, so PID 1 is
# fine). SIGINT is kept as the stop signal because older agent builds handled only Ctrl-C.
# (State writes are atomic, so even a SIGKILL loses at most the current serving window.)
STOPSIGNAL SIGINT
ENTRYPOINT ["edge-agent"]
CMD ["--help"]
