# syntax=docker/dockerfile:1.7
# cloud-server: gRPC API (`serve`), job worker (`worker`), migrations and admin CLI, one binary.
#
# Build from the repository root (the context must be the workspace: every member's Cargo.toml
# is needed even to build one package):
#   DOCKER_BUILDKIT=1 docker build -f deploy/docker/cloud-server.Dockerfile -t adaptivenet/cloud-server .
# BuildKit picks up deploy/docker/cloud-server.Dockerfile.dockerignore (next to this file), so
# target/, .assets/, .run/ and .git/ stay out of the context without a root .dockerignore.
#
# No system protoc: shared/proto/build.rs compiles the protos with protox (pure Rust). The
# builder needs Rust and a C compiler (bundled SQLite via libsqlite3-sys); rust:*-bookworm has gcc.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# `--features tls`: `serve --tls-cert/--tls-key[/--tls-client-ca]` and `client --ca-file`; every
# shipped deployment serves TLS (deploy/README.md, "TLS").
# Cache mounts keep the crates.io registry and target/ across builds (cache-friendly without the
# fragile "stub src" trick for a six-crate workspace). The binary is copied out of the cache
# mount, and debug info is stripped (the release profile keeps debug = 1 for local profiling).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p adaptivenet-cloud --features tls --bin cloud-server \
 && mkdir -p /out \
 && cp target/release/cloud-server /out/ \
 && strip --strip-debug /out/cloud-server

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Fixed non-root uid/gid so volume ownership is predictable across images and hosts.
# /var/lib/adaptivenet is created owned by that user: a fresh named volume mounted there
# inherits the ownership.
RUN groupadd --system --gid 10001 adaptivenet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin adaptivenet \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/adaptivenet
COPY --from=builder /out/cloud-server /usr/local/bin/cloud-server
# Data dir = SQLite file (single node only) and the blob store (<data-dir>/blobs). With
# PostgreSQL (ADAPTIVENET_DATABASE_URL) only the blobs live here: every API replica and worker
# must mount the SAME directory (shared volume) until the object-store backend exists.
ENV ADAPTIVENET_DATA_DIR=/var/lib/adaptivenet \
    RUST_LOG=info
USER 10001:10001
WORKDIR /var/lib/adaptivenet
# 50051: gRPC (API + grpc.health.v1 + reflection); 9090: --metrics-listen (/metrics, /healthz).
EXPOSE 50051 9090
# serve and worker drain on SIGTERM (the default stop signal). The default command is plaintext
# (the image holds no certificate); compose and Kubernetes add --tls-cert/--tls-key.
ENTRYPOINT ["cloud-server"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090"]
