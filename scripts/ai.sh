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

# confluent-kafka's wheels bundle their own librdkafka, which crashes (SIGSEGV) when a broker
# such as Tansu answers a fetch for a topic it lost, and keeps a recreated topic's old positions
# (vendor/rdkafka-sys/PATCHES.md). The sidecar's confluent-kafka is built from source against the
# platform's patched librdkafka instead, shared, under .infra/librdkafka (cmake from infra.sh,
# Python headers and zlib from the base image), rebuilt when the vendored source changes.
RDK_SRC="$ROOT/vendor/rdkafka-sys/librdkafka"
RDK_PREFIX="$ROOT/.infra/librdkafka"
rdk_stamp() {
    (cd "$RDK_SRC" && find src CMakeLists.txt -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
librdkafka_shared() {
    local stamp
    stamp="shared $(rdk_stamp)"
    if [[ -f $RDK_PREFIX/lib/librdkafka.so && "$(cat "$RDK_PREFIX/.stamp" 2>/dev/null)" == "$stamp" ]]; then
        return 0
    fi
    echo "ai: building the patched librdkafka into $RDK_PREFIX (a few minutes, once)"
    rm -rf "$RDK_PREFIX" "$ROOT/.infra/librdkafka-build"
    cmake -S "$RDK_SRC" -B "$ROOT/.infra/librdkafka-build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$RDK_PREFIX" -DCMAKE_INSTALL_LIBDIR=lib \
        -DRDKAFKA_BUILD_STATIC=OFF -DRDKAFKA_BUILD_EXAMPLES=OFF -DRDKAFKA_BUILD_TESTS=OFF \
        -DWITH_SSL=OFF -DWITH_SASL=OFF -DWITH_ZSTD=OFF -DWITH_CURL=OFF -DENABLE_LZ4_EXT=OFF \
        -DWITH_ZLIB=ON -DCMAKE_POLICY_VERSION_MINIMUM=3.5 >"$ROOT/.infra/librdkafka-build.log" 2>&1
    cmake --build "$ROOT/.infra/librdkafka-build" -j "$(nproc)" >>"$ROOT/.infra/librdkafka-build.log" 2>&1
    cmake --install "$ROOT/.infra/librdkafka-build" >>"$ROOT/.infra/librdkafka-build.log" 2>&1
    echo "$stamp" >"$RDK_PREFIX/.stamp"
}

# Created once and reused while requirements.txt and the librdkafka build are unchanged (a copy of
# both is kept in the venv), never the system Python's site-packages.
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
    librdkafka_shared
    local want
    want="$(cat "$AI_REQ"; cat "$RDK_PREFIX/.stamp")"
    if [[ "$want" != "$(cat "$AI_VENV/.requirements.txt" 2>/dev/null)" ]]; then
        echo "ai: installing $AI_REQ"
        # confluent-kafka from source, linked (with an rpath) to the patched librdkafka.
        CFLAGS="-I$RDK_PREFIX/include" LDFLAGS="-L$RDK_PREFIX/lib -Wl,-rpath,$RDK_PREFIX/lib" \
            "$AI_VENV/bin/python" -m pip install -q --disable-pip-version-check \
            --no-binary confluent-kafka --force-reinstall --no-deps confluent-kafka=="$(
                sed -n 's/^confluent-kafka==//p' "$AI_REQ")"
        "$AI_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$AI_REQ"
        "$AI_VENV/bin/python" -c 'import confluent_kafka, sys
v = confluent_kafka.libversion()[0]
sys.exit(0 if v == "2.12.1" else "ai: confluent-kafka links librdkafka %s, not the patched 2.12.1" % v)'
        printf '%s' "$want" >"$AI_VENV/.requirements.txt"
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
