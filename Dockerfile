# syntax=docker/dockerfile:1
# The cornjacket platform image (SPEC §14): one binary, `cornjacket serve`, every service on its port.
#   docker build -t cornjacket .        (or: make docker-build)
# Build stages cache the dependency graph separately from the sources (cargo-chef), so a source
# change rebuilds only the crate itself.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# --- toolchain + native build dependencies (rdkafka builds librdkafka with cmake) -------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version "^0.1"
WORKDIR /src

# --- the dependency recipe: changes only when Cargo.toml/Cargo.lock (or the target layout) change ---
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- dependencies (cached layer), then the crate ------------------------------------------------------
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
# The commit `cj_build_info` reports (the build context has no .git):
# docker build --build-arg CORNJACKET_BUILD_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG CORNJACKET_BUILD_COMMIT=unknown
ENV CORNJACKET_BUILD_COMMIT=${CORNJACKET_BUILD_COMMIT}
RUN cargo build --release --locked --bin cornjacket \
    && strip target/release/cornjacket

# --- runtime: Debian slim, CA certificates, curl for the health check, non-root -----------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libcurl4 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 cornjacket \
    && useradd --system --uid 10001 --gid cornjacket --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin cornjacket
COPY --from=builder /src/target/release/cornjacket /usr/local/bin/cornjacket

# Containers listen on every interface (the binary's default is loopback); logs are JSON.
ENV CJ_BIND_ADDR=0.0.0.0 \
    CJ_LOG_FORMAT=json

USER 10001:10001

# ingestion 8080, query 8081, actions API 8082, actions health 8083, event-handler health 8084
# (SPEC §2), operator console 8085
EXPOSE 8080 8081 8082 8083 8084 8085

# Liveness, not readiness: /livez answers 200 while the process serves and asks no dependency, so
# a database or broker outage never marks the container unhealthy (and never gets it restarted);
# /readyz (= /health, 503 when unhealthy, SPEC §13) is for traffic: Traefik's health checks.
# Every port that serves /health also serves both (ingestion 8080, query 8081, actions 8083,
# event handler + tsdb-writer 8084, console 8085); the image checks the ingestion port, compose
# and ECS all five.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/livez || exit 1

ENTRYPOINT ["cornjacket"]
CMD ["serve"]
