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

# nextest's profile (.config/nextest.toml): `ci` in CI (CI set, as CI runners do, or
# NEXTEST_PROFILE=ci, which .ci/run sets) writes a JUnit report to target/nextest/ci/junit.xml;
# otherwise `default`. Both run the same tests with the same timeouts.
if [[ -z ${NEXTEST_PROFILE:-} ]]; then
    case ${CI:-} in
        "" | 0 | false) ;;
        *) export NEXTEST_PROFILE=ci ;;
    esac
fi
echo "test: nextest profile ${NEXTEST_PROFILE:-default}"

status=0
# The chain test (tests/it/chain.rs) runs the Python sidecar from its venv.
"$ROOT/scripts/ai.sh" venv
cargo nextest run --workspace --all-targets --no-fail-fast --test-threads "${CJ_TEST_THREADS:-6}" "$@" || status=$?

# Static checks of the Terraform in deploy/ (SPEC §14): python-hcl2 in a venv of pinned versions,
# created once under .infra/ and reused while the requirements are unchanged. (Runs inside `if`,
# where `set -e` does not apply: every step returns on failure explicitly.)
DEPLOY_VENV="$ROOT/.infra/venv-deploy"
DEPLOY_REQ="$ROOT/tests/deploy/requirements.txt"
deploy_venv() {
    if [[ ! -x $DEPLOY_VENV/bin/python ]]; then
        echo "test: creating $DEPLOY_VENV"
        rm -rf "$DEPLOY_VENV"
        if ! python3 -m venv "$DEPLOY_VENV"; then
            rm -rf "$DEPLOY_VENV"
            # Debian ships venv support separately.
            if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
                apt-get update -q >/dev/null || return 1
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null || return 1
                python3 -m venv "$DEPLOY_VENV" || return 1
            else
                echo "test: 'python3 -m venv' failed; install python3-venv" >&2
                return 1
            fi
        fi
    fi
    # Skip pip when the installed set already matches the pinned requirements.
    if ! cmp -s "$DEPLOY_REQ" "$DEPLOY_VENV/.requirements.txt"; then
        "$DEPLOY_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$DEPLOY_REQ" || return 1
        cp "$DEPLOY_REQ" "$DEPLOY_VENV/.requirements.txt" || return 1
    fi
}
# The same venv (PyYAML) checks the observability compose profile (deploy/observability/); it runs
# promtool, from Debian's prometheus package (`make test` installs it: scripts/infra.sh test-tools),
# and fails when it is missing.
echo "test: checking deploy/ (tests/deploy/check_terraform.py, tests/deploy/check_observability.py)"
if deploy_venv; then
    "$DEPLOY_VENV/bin/python" "$ROOT/tests/deploy/check_terraform.py" "$ROOT/deploy" || status=$?
    "$DEPLOY_VENV/bin/python" "$ROOT/tests/deploy/check_observability.py" "$ROOT" || status=$?
else
    status=1
fi

# The ai-inference sidecar's own suite (pytest against the same PostgreSQL and broker).
echo "test: ai-inference (scripts/ai.sh test)"
"$ROOT/scripts/ai.sh" test || status=$?

exit "$status"
