#!/usr/bin/env bash
# Runs every test suite against the local infrastructure (start it first: scripts/infra.sh up,
# which `make test` does). Extra arguments go to cargo nextest, e.g. scripts/test.sh outbox.
# Tests isolate themselves (own database / topic names), so they run in parallel and repeatedly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Development-only credentials, matching scripts/infra.sh. Override any of them from the environment.
export CJ_TEST_DATABASE_URL="${CJ_TEST_DATABASE_URL:-postgres://cornjacket:cornjacket@127.0.0.1:5432/cornjacket?sslmode=disable}"
export CJ_TEST_KAFKA_BROKERS="${CJ_TEST_KAFKA_BROKERS:-127.0.0.1:9092}"
export CJ_TEST_MQTT_URL="${CJ_TEST_MQTT_URL:-mqtt://127.0.0.1:1883}"
export CJ_TEST_MQTT_USERNAME="${CJ_TEST_MQTT_USERNAME:-cornjacket}"
export CJ_TEST_MQTT_PASSWORD="${CJ_TEST_MQTT_PASSWORD:-cornjacket}"

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "test: installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

exec cargo nextest run --workspace --all-targets --no-fail-fast --test-threads "${CJ_TEST_THREADS:-6}" "$@"
