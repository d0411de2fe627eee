#!/usr/bin/env bash
# The Python AI inference sidecar (ai-inference/, SPEC §9).
#   scripts/ai.sh venv          create or update its venv at .infra/venv-ai (pinned requirements)
#   scripts/ai.sh run           run the service from the venv, configured by the CJ_* environment
#   scripts/ai.sh test [ARGS]   venv, then pytest -q ai-inference/tests ARGS (real PostgreSQL and
#                               Kafka API broker: start them first with scripts/infra.sh up)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AI_DIR="$ROOT/ai-inference"
AI_VENV="$ROOT/.infra/venv-ai"
AI_REQ="$AI_DIR/requirements.txt"

# Created once and reused while requirements.txt is unchanged (a copy is kept in the venv), never
# the system Python's site-packages.
ai_venv() {
    if [[ ! -x $AI_VENV/bin/python ]]; then
        echo "ai: creating $AI_VENV"
        rm -rf "$AI_VENV"
        mkdir -p "$(dirname "$AI_VENV")"
        if ! python3 -m venv "$AI_VENV"; then
            rm -rf "$AI_VENV"
            # Debian ships venv support separately.
            if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
                apt-get update -q >/dev/null
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
                python3 -m venv "$AI_VENV"
            else
                echo "ai: 'python3 -m venv' failed; install python3-venv" >&2
                return 1
            fi
        fi
    fi
    if ! cmp -s "$AI_REQ" "$AI_VENV/.requirements.txt"; then
        echo "ai: installing $AI_REQ"
        "$AI_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$AI_REQ"
        cp "$AI_REQ" "$AI_VENV/.requirements.txt"
    fi
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    venv)
        ai_venv
        ;;
    run)
        ai_venv
        # The package is imported from its directory; the caller's working directory is kept.
        export PYTHONPATH="$AI_DIR${PYTHONPATH:+:$PYTHONPATH}"
        exec "$AI_VENV/bin/python" -m ai_inference "$@"
        ;;
    test)
        ai_venv
        cd "$ROOT"
        # The platform binary the tests start (ingestion service, token minting): the fresh build.
        export CJ_BIN="${CJ_BIN:-$ROOT/target/debug/cornjacket}"
        exec "$AI_VENV/bin/python" -m pytest -q ai-inference/tests "$@"
        ;;
    *)
        echo "usage: scripts/ai.sh venv | run | test [pytest args]" >&2
        exit 2
        ;;
esac
