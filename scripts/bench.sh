#!/usr/bin/env bash
# `make bench`: the platform's performance table, measured against baselines in the same run.
#
#   scripts/bench.sh [cornjacket-bench arguments...]     e.g. --quick, --rows ingest-max,query
#
# Builds the release binaries, creates a fresh database (cjbench_<epoch>) and a unique topic prefix
# (bench<epoch>.), starts `cornjacket serve` on it in the background, runs `cornjacket-bench`
# against it (the table goes to stdout and bench/results/<date>.json), then stops the platform
# with SIGTERM, deletes the run's topics and drops the database — also when interrupted.
#
# Needs the local infrastructure running (`make infra-up`): PostgreSQL on 127.0.0.1:5432 (role
# cornjacket, CREATEDB), tansu on PATH (or the Kafka-API broker on 127.0.0.1:9092 with
# BENCH_BROKER=shared) and, for the mqtt row, Mosquitto on 127.0.0.1:1883. The anomaly-to-webhook
# row runs the ai-inference sidecar from .infra/venv-ai (`scripts/ai.sh venv`, run here first).
#
# Environment:
#   BENCH_AUTH_MODE   app (default: every request carries a JWT minted for the run) or off
#   BENCH_BROKER      private (default: a Tansu of the run's own on a free port, memory storage,
#                     stopped at the end) or shared (the Kafka-API broker on 127.0.0.1:9092: it keeps
#                     every message it was ever sent in memory and slows down as it grows)
#   BENCH_KEEP_DB=1   keep the database (and the platform log) for inspection
#   CJ_*              exported platform settings are passed through and recorded with the results
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=cornjacket
PG_PASSWORD=cornjacket # development only (scripts/infra.sh)
BROKERS=127.0.0.1:9092
MQTT_HOST=127.0.0.1
MQTT_PORT=1883
PORTS=(8080 8081 8082 8083 8084)

log() { printf '[bench.sh] %s\n' "$*" >&2; }
die() { printf '[bench.sh] error: %s\n' "$*" >&2; exit 1; }

# shellcheck disable=SC2016 # $1 and $2 are the inner bash's arguments
port_open() { timeout 1 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

psql_admin() {
    PGPASSWORD=$PG_PASSWORD psql -X -q -At -v ON_ERROR_STOP=1 \
        -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d cornjacket "$@"
}

BROKER_MODE=${BENCH_BROKER:-private}
command -v psql >/dev/null || die "psql not found (make infra-up installs PostgreSQL)"
port_open "$PG_HOST" "$PG_PORT" || die "PostgreSQL is not listening on $PG_HOST:$PG_PORT (run make infra-up)"
case $BROKER_MODE in
    shared) port_open "${BROKERS%:*}" "${BROKERS##*:}" || die "the broker is not listening on $BROKERS (run make infra-up)" ;;
    private) command -v tansu >/dev/null || die "BENCH_BROKER=private (the default) needs tansu on PATH (make infra-up installs it)" ;;
    *) die "BENCH_BROKER must be private or shared, not '$BROKER_MODE'" ;;
esac

log "building release binaries"
cargo build --release --workspace --bins

# The anomaly-to-webhook row runs the ai-inference sidecar from its venv; without it the row says
# how to create it.
scripts/ai.sh venv >&2 || log "warning: scripts/ai.sh venv failed; anomaly-to-webhook will not be measured"

for p in "${PORTS[@]}"; do
    if port_open 127.0.0.1 "$p"; then
        die "port $p is in use (is 'make run' or another bench running?); the bench starts its own platform there"
    fi
done

EPOCH=$(date +%s)
DB="cjbench_${EPOCH}"
PREFIX="bench${EPOCH}."
DB_URL="postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$DB?sslmode=disable"
LOG_DIR="$ROOT/target/bench"
PLATFORM_LOG="$LOG_DIR/platform-$EPOCH.log"
mkdir -p "$LOG_DIR" bench/results
# The platform (and a private broker) run outside the repository, so a developer's .env is not read.
RUN_DIR=""

# WITH (FORCE) cannot end an autovacuum worker (it runs as another role), a plain DROP waits for
# it; try both for a while.
drop_database() {
    local _
    for _ in $(seq 1 20); do
        psql_admin -c "DROP DATABASE IF EXISTS \"$DB\"" >/dev/null 2>&1 && return 0
        psql_admin -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

PID=""
BROKER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        log "stopping the platform (pid $PID, SIGTERM)"
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$PID" 2>/dev/null; then
            log "the platform did not stop within 15 s; SIGKILL"
            kill -KILL "$PID" 2>/dev/null || true
        fi
        wait "$PID" 2>/dev/null || true
    fi
    if [[ -n $BROKER_PID ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    elif [[ -x target/release/cornjacket-bench ]]; then
        target/release/cornjacket-bench --drop-topics --kafka-brokers "$BROKERS" \
            --topic-prefix "$PREFIX" 2>/dev/null || log "could not delete the topics $PREFIX*"
    fi
    if [[ ${BENCH_KEEP_DB:-0} == 1 ]]; then
        log "keeping database $DB and $PLATFORM_LOG (BENCH_KEEP_DB=1)"
    else
        drop_database || log "could not drop database $DB (drop it with: DROP DATABASE \"$DB\")"
        if [[ $rc -eq 0 ]]; then rm -f "$PLATFORM_LOG" "$LOG_DIR/tansu-$EPOCH.log"; fi
    fi
    if [[ -n ${RUN_DIR:-} ]]; then rm -rf "$RUN_DIR"; fi
    if [[ $rc -ne 0 && -s $PLATFORM_LOG ]]; then
        log "last lines of the platform log ($PLATFORM_LOG):"
        tail -n 20 "$PLATFORM_LOG" >&2 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
RUN_DIR=$(mktemp -d)

case $BROKER_MODE in
    shared) ;;
    private)
        BPORT=""
        for p in $(seq 19092 19192); do
            if ! port_open 127.0.0.1 "$p"; then BPORT=$p; break; fi
        done
        [[ -n $BPORT ]] || die "no free port for a private broker in 19092-19192"
        BROKERS="127.0.0.1:$BPORT"
        (cd "$RUN_DIR" && RUST_LOG=warn exec tansu broker --cluster-id "cjbench$EPOCH" \
            --listener-url "tcp://$BROKERS" --advertised-listener-url "tcp://$BROKERS" \
            --storage-engine "memory://tansu/") >"$LOG_DIR/tansu-$EPOCH.log" 2>&1 &
        BROKER_PID=$!
        for _ in $(seq 1 150); do
            port_open 127.0.0.1 "$BPORT" && break
            kill -0 "$BROKER_PID" 2>/dev/null || die "the private broker did not start (see $LOG_DIR/tansu-$EPOCH.log)"
            sleep 0.1
        done
        port_open 127.0.0.1 "$BPORT" || die "the private broker does not listen on $BROKERS"
        log "private broker: tansu on $BROKERS (pid $BROKER_PID)"
        ;;
esac

log "creating database $DB"
psql_admin -c "CREATE DATABASE \"$DB\""

# The platform's settings for the run: FORCED always apply (they isolate the run); DEFAULTS apply
# unless the variable is already exported, so `CJ_OUTBOX_WORKER_COUNT=8 make bench` tries a variation.
declare -A FORCED=(
    [CJ_DATABASE_URL]="$DB_URL"
    [CJ_INGESTION_DATABASE_URL]="$DB_URL"
    [CJ_EVENTHANDLER_DATABASE_URL]="$DB_URL"
    [CJ_QUERY_DATABASE_URL]="$DB_URL"
    [CJ_KAFKA_BROKERS]="$BROKERS"
    [CJ_KAFKA_TOPIC_PREFIX]="$PREFIX"
    [CJ_EVENTHANDLER_CONSUMER_GROUP]="${PREFIX}event-handler"
    [CJ_TSDB_CONSUMER_GROUP]="${PREFIX}tsdb-writer"
    [CJ_ACTIONS_CONSUMER_GROUP]="${PREFIX}action-orchestrator"
)
declare -A DEFAULTS=(
    [CJ_LOG_LEVEL]=warn
    [CJ_INGESTION_RATE_LIMIT]=0
    [CJ_DB_MAX_CONNECTIONS]=32
    [CJ_SHUTDOWN_TIMEOUT]=10s
    # anomaly-to-webhook sends 5 outliers a second; the default global limit (10/min) would queue them.
    [CJ_ACTIONS_RATE_LIMIT]=0
    # The row's receiver listens on loopback.
    [CJ_ACTIONS_ALLOW_PRIVATE_TARGETS]=true
)
# MQTT ingestion (the mqtt row) on a topic and with a client id of the run's own, so the platform
# never takes other clients' messages or sessions. Off with `--mqtt-url off`, or when nothing
# listens on 127.0.0.1:1883 and no other broker is named (the row then says so).
MQTT_URL_ARG=""
prev=""
for arg in "$@"; do
    if [[ $prev == --mqtt-url ]]; then MQTT_URL_ARG=$arg; fi
    if [[ $arg == --mqtt-url=* ]]; then MQTT_URL_ARG=${arg#--mqtt-url=}; fi
    prev=$arg
done
MQTT_ARGS=()
if [[ $MQTT_URL_ARG == off ]]; then
    FORCED[CJ_MQTT_URL]=off
elif [[ -z $MQTT_URL_ARG ]] && ! port_open "$MQTT_HOST" "$MQTT_PORT"; then
    log "no MQTT broker on $MQTT_HOST:$MQTT_PORT (make infra-up starts Mosquitto): MQTT ingestion off, the mqtt row is not measured"
    FORCED[CJ_MQTT_URL]=off
else
    FORCED[CJ_MQTT_TOPIC]="\$share/bench$EPOCH/bench$EPOCH/devices/+/events"
    FORCED[CJ_MQTT_CLIENT_ID]="cjbench-$EPOCH"
    MQTT_ARGS=(--mqtt-topic-prefix "bench$EPOCH/")
fi

AUTH_MODE=${BENCH_AUTH_MODE:-app}
TOKEN=""
AI_TOKEN=""
case $AUTH_MODE in
    app)
        # A secret for this run only; the bench sends a token minted with it on every request.
        FORCED[CJ_AUTH_MODE]=app
        FORCED[CJ_JWT_SECRET]=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
        ;;
    off) FORCED[CJ_AUTH_MODE]=off ;;
    *) die "BENCH_AUTH_MODE must be app or off, not '$AUTH_MODE'" ;;
esac

ENV_ARGS=()
for k in "${!FORCED[@]}"; do ENV_ARGS+=("$k=${FORCED[$k]}"); done
for k in "${!DEFAULTS[@]}"; do
    if [[ -z ${!k+x} ]]; then ENV_ARGS+=("$k=${DEFAULTS[$k]}"); fi
done

platform() { (cd "$RUN_DIR" && exec env "${ENV_ARGS[@]}" "$ROOT/target/release/cornjacket" "$@"); }

AUTH_NOTE="CJ_AUTH_MODE=off"
if [[ $AUTH_MODE == app ]]; then
    if TOKEN=$(platform token --sub cornjacket-bench --scopes "ingest:write query:read actions:admin" --ttl 4h 2>/dev/null); then
        AUTH_NOTE="CJ_AUTH_MODE=app (an HS256 JWT checked on every request)"
        # The sidecar's own token for its ai.anomaly submissions (anomaly-to-webhook).
        AI_TOKEN=$(platform token --sub ai-inference --scopes "ingest:write ingest:ai" --ttl 4h 2>/dev/null) || AI_TOKEN=""
    else
        TOKEN=""
        AUTH_NOTE="no authentication in this build"
    fi
fi

# What the run used (URLs, prefixes and secrets left out), for the results.
RECORDED=()
while IFS='=' read -r k v; do
    case $k in
        *DATABASE_URL | CJ_KAFKA_TOPIC_PREFIX | *_CONSUMER_GROUP | CJ_JWT_* | *PASSWORD* | CJ_AUTH_MODE) ;;
        CJ_*) RECORDED+=("$k=$v") ;;
    esac
done < <(env "${ENV_ARGS[@]}" | sort)
BROKER_NOTE="the shared broker"
if [[ -n $BROKER_PID ]]; then BROKER_NOTE="a private tansu started for the run"; fi
PLATFORM_CONFIG="cornjacket serve (all services; fresh database, topics ${PREFIX}* on $BROKER_NOTE), ${RECORDED[*]}, $AUTH_NOTE; everything else default"
log "platform: $PLATFORM_CONFIG"

START_NS=$(date +%s%N)
# A subshell that execs: $! is the platform's own pid (for its RSS and CPU).
(cd "$RUN_DIR" && exec env "${ENV_ARGS[@]}" "$ROOT/target/release/cornjacket" serve) >"$PLATFORM_LOG" 2>&1 &
PID=$!
log "platform started (pid $PID, log $PLATFORM_LOG)"

BROKER_ARGS=()
if [[ -n $BROKER_PID ]]; then
    BROKER_ARGS=(--broker-pid "$BROKER_PID")
elif [[ -f .infra/tansu.pid ]]; then
    BROKER_ARGS=(--broker-pid "$(cat .infra/tansu.pid)")
fi

BENCH_TOKEN="$TOKEN" BENCH_AI_TOKEN="$AI_TOKEN" target/release/cornjacket-bench \
    --database-url "$DB_URL" \
    --kafka-brokers "$BROKERS" \
    --topic-prefix "$PREFIX" \
    --platform-pid "$PID" \
    --platform-started-ns "$START_NS" \
    --platform-config "$PLATFORM_CONFIG" \
    --out bench/results \
    "${BROKER_ARGS[@]}" \
    "${MQTT_ARGS[@]}" \
    "$@"

if ! kill -0 "$PID" 2>/dev/null; then
    die "the platform exited during the run (see $PLATFORM_LOG)"
fi
