#!/usr/bin/env bash
# Local infrastructure for cornjacket, without a container engine (SPEC §15).
#
#   scripts/infra.sh up     [postgres|tansu|mosquitto ...]  install what is missing, start what is not running
#   scripts/infra.sh down   [postgres|tansu|mosquitto ...]  stop them
#   scripts/infra.sh status [postgres|tansu|mosquitto ...]  print each one's state; exit 0 if all run, 1 otherwise
#   scripts/infra.sh test-tools                             install what only the tests use (chromium, promtool)
#
# With no component named, all three are meant. Everything listens on loopback only:
#   PostgreSQL 15 (Debian cluster 15/main)  127.0.0.1:5432  role/db cornjacket, password cornjacket
#   Tansu (Kafka API, memory storage)        127.0.0.1:9092  a restart empties the bus
#   Mosquitto (MQTT)                         127.0.0.1:1883  user cornjacket, password cornjacket;
#                                            admin cornjacket-admin, password cornjacket-admin
# The credentials above are for DEVELOPMENT ONLY.
#
# State, logs, pid files and data live in .infra/ at the repository root (git-ignored).
# Idempotent: a second `up` is a fast no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INFRA_DIR="$ROOT/.infra"

PG_VERSION=15
PG_CLUSTER=main
PG_HOST=127.0.0.1
PG_PORT=5432
PG_CONF_D="/etc/postgresql/$PG_VERSION/$PG_CLUSTER/conf.d"
PG_CONF="$PG_CONF_D/cornjacket.conf"
DB_USER=cornjacket
DB_PASSWORD=cornjacket # development only
DB_NAME=cornjacket

TANSU_VERSION=0.6.0
TANSU_HOST=127.0.0.1
TANSU_PORT=9092
TANSU_CLUSTER_ID=cornjacket

MQTT_HOST=127.0.0.1
MQTT_PORT=1883
MQTT_USER=cornjacket
MQTT_PASSWORD=cornjacket # development only
# The dynamic-security plugin's admin: `cornjacket devices` and dynsec-setup.sh log in as it.
MQTT_ADMIN_USER=cornjacket-admin
MQTT_ADMIN_PASSWORD=cornjacket-admin # development only
MQTT_TEMPLATE="$ROOT/scripts/mosquitto/mosquitto.conf.tmpl"
MQTT_DYNSEC_SETUP="$ROOT/scripts/mosquitto/dynsec-setup.sh"
MQTT_DIR="$INFRA_DIR/mosquitto"

# Packages needed to build the crate (rdkafka builds librdkafka with cmake), installed on every `up`
# when missing. The services' own packages are installed by their components.
BUILD_PACKAGES=(cmake libcurl4-openssl-dev pkg-config)
# What only `make test` needs: the console's browser test drives Debian's Chromium; promtool (in
# Debian's prometheus package) checks every /metrics and the observability profile's rules.
TEST_PACKAGES=(chromium prometheus)

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"

log() { printf '%s\n' "$*"; }
die() { printf 'infra: error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "run as root (or install sudo): apt-get, pg_ctlcluster and chown need it"
    SUDO=(sudo)
fi

as_postgres() { (cd / && "${SUDO[@]}" runuser -u postgres -- "$@"); }

# Run a command without the lock descriptor (fd 9): anything it leaves running (postgres, a broker,
# a service that apt starts) would otherwise hold the lock for ever.
nolock() { "$@" 9>&-; }

# --- helpers -----------------------------------------------------------------------------------

port_open() { # host port
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

wait_port() { # host port seconds [pid]
    local host=$1 port=$2 secs=$3 pid=${4:-} i
    for ((i = 0; i < secs * 5; i++)); do
        port_open "$host" "$port" && return 0
        if [[ -n $pid ]] && ! alive "$pid"; then return 1; fi
        sleep 0.2
    done
    return 1
}

# A live process (a zombie is not: pid 1 of a container may never reap it).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

pid_alive() { # pidfile name  -> prints pid, 0 if a live process whose command is `name`
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    printf '%s' "$pid"
}

# Start a command detached from this shell (own session, survives the caller), output appended to
# a log file, its pid written to a pid file by the process itself before it execs.
spawn() { # pidfile logfile cwd cmd...
    local pidfile=$1 logfile=$2 cwd=$3 name=$4
    shift 3
    rm -f "$pidfile"
    (cd "$cwd" && exec nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 9>&- &)
    local i
    for ((i = 0; i < 50; i++)); do [[ -s $pidfile ]] && break; sleep 0.1; done
    [[ -s $pidfile ]] || die "could not start $name (see $logfile)"
    cat "$pidfile"
}

stop_pid() { # pidfile name label
    local pidfile=$1 name=$2 label=$3 pid i
    if pid=$(pid_alive "$pidfile" "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
        rm -f "$pidfile"
        log "$label: stopped (pid $pid)"
    else
        rm -f "$pidfile"
        log "$label: not running"
    fi
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

APT_UPDATED=0
ensure_packages() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "apt: installing ${missing[*]} (log: $INFRA_DIR/apt.log)"
    if ((APT_UPDATED == 0)); then
        nolock "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update >>"$INFRA_DIR/apt.log" 2>&1 ||
            die "apt-get update failed (see $INFRA_DIR/apt.log)"
        APT_UPDATED=1
    fi
    nolock "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${missing[@]}" >>"$INFRA_DIR/apt.log" 2>&1 ||
        die "apt-get install ${missing[*]} failed (see $INFRA_DIR/apt.log)"
}

# --- PostgreSQL --------------------------------------------------------------------------------

pg_cluster_exists() { pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { f = 1 } END { exit !f }'; }
pg_running() { "${SUDO[@]}" pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" status >/dev/null 2>&1; }

pg_conf_text() {
    cat <<EOF
# Written by scripts/infra.sh (cornjacket local development). Do not edit: it is rewritten on 'up'.
listen_addresses = '$PG_HOST'
port = $PG_PORT
max_connections = 400
shared_buffers = 512MB
synchronous_commit = on
fsync = on
EOF
}

postgres_up() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! pkg_installed "postgresql-$PG_VERSION"; then
        ensure_packages postgresql postgresql-client
    fi
    if ! pg_cluster_exists; then
        log "postgres: creating cluster $PG_VERSION/$PG_CLUSTER"
        nolock "${SUDO[@]}" pg_createcluster "$PG_VERSION" "$PG_CLUSTER" >>"$INFRA_DIR/postgres-setup.log" 2>&1 ||
            die "pg_createcluster failed (see $INFRA_DIR/postgres-setup.log)"
    fi

    local changed=0 want
    want=$(pg_conf_text)
    if [[ ! -f $PG_CONF || "$(cat "$PG_CONF")" != "$want" ]]; then
        "${SUDO[@]}" mkdir -p "$PG_CONF_D"
        printf '%s\n' "$want" | "${SUDO[@]}" tee "$PG_CONF" >/dev/null
        changed=1
    fi

    if pg_running; then
        if ((changed)); then
            log "postgres: configuration changed, restarting"
            nolock "${SUDO[@]}" pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart ||
                die "postgres restart failed (see /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log)"
        fi
    else
        if port_open "$PG_HOST" "$PG_PORT"; then
            die "postgres: port $PG_HOST:$PG_PORT is in use by something other than cluster $PG_VERSION/$PG_CLUSTER"
        fi
        log "postgres: starting cluster $PG_VERSION/$PG_CLUSTER"
        nolock "${SUDO[@]}" pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start ||
            die "postgres start failed (see /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log)"
    fi

    local i
    for ((i = 0; i < 120; i++)); do
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break
        sleep 0.5
    done
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" || die "postgres did not become ready on $PG_HOST:$PG_PORT"

    # Role and database, idempotently. CREATEDB: the tests create a database each.
    if ! PGPASSWORD=$DB_PASSWORD psql -X -q -At -h "$PG_HOST" -p "$PG_PORT" -U "$DB_USER" -d "$DB_NAME" \
        -c "SELECT 1 FROM pg_roles WHERE rolname = current_user AND rolcreatedb AND rolcanlogin" 2>/dev/null | grep -qx 1; then
        log "postgres: creating role and database $DB_USER"
        as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres >/dev/null <<SQL ||
SET client_min_messages = warning;
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER') THEN
    CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD';
  ELSE
    ALTER ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME') \gexec
ALTER DATABASE $DB_NAME OWNER TO $DB_USER;
SQL
            die "postgres: could not create role/database $DB_USER"
        PGPASSWORD=$DB_PASSWORD psql -X -q -At -h "$PG_HOST" -p "$PG_PORT" -U "$DB_USER" -d "$DB_NAME" -c 'SELECT 1' >/dev/null ||
            die "postgres: cannot log in as $DB_USER"
    fi
    log "postgres: running on $PG_HOST:$PG_PORT (database $DB_NAME, user $DB_USER)"
}

postgres_down() {
    if command -v pg_ctlcluster >/dev/null 2>&1 && pg_cluster_exists && pg_running; then
        nolock "${SUDO[@]}" pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop
        log "postgres: stopped"
    else
        log "postgres: not running"
    fi
}

postgres_status() {
    if command -v pg_ctlcluster >/dev/null 2>&1 && pg_cluster_exists && pg_running &&
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
        log "postgres: running on $PG_HOST:$PG_PORT"
    else
        log "postgres: not running"
        return 1
    fi
}

# The pid of the process named NAME listening on PORT (another checkout's broker, say), if any.
listener_named() {
    local port=$1 name=$2 line
    line=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o "\"$name\",pid=[0-9]*" | head -n 1) || true
    [[ -n $line ]] && echo "${line##*pid=}"
}

# --- Tansu (Kafka API) ---------------------------------------------------------------------------

TANSU_PID="$INFRA_DIR/tansu.pid"
TANSU_LOG="$INFRA_DIR/tansu.log"

tansu_installed() { command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -qw "$TANSU_VERSION"; }

tansu_up() {
    local pid
    if pid=$(pid_alive "$TANSU_PID" tansu) && port_open "$TANSU_HOST" "$TANSU_PORT"; then
        log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid)"
        return 0
    fi
    if [[ -n ${pid:-} ]]; then # alive but not listening: wait a little, it may be starting
        if wait_port "$TANSU_HOST" "$TANSU_PORT" 15 "$pid"; then
            log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid)"
            return 0
        fi
        die "tansu: pid $pid is alive but does not listen on $TANSU_HOST:$TANSU_PORT (see $TANSU_LOG; run 'scripts/infra.sh down tansu')"
    fi
    if port_open "$TANSU_HOST" "$TANSU_PORT"; then
        # Another checkout's broker is just as good: tests isolate themselves by topic prefix.
        if pid=$(listener_named "$TANSU_PORT" tansu); then
            log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid, started outside this checkout; reusing it)"
            return 0
        fi
        die "tansu: port $TANSU_HOST:$TANSU_PORT is in use by another process (not started from $INFRA_DIR)"
    fi
    if ! tansu_installed; then
        ensure_packages cmake pkg-config
        command -v cargo >/dev/null 2>&1 || die "cargo not found: a Rust toolchain is needed to install tansu"
        log "tansu: installing $TANSU_VERSION with cargo install (about 15 minutes; log: $INFRA_DIR/tansu-install.log)"
        nolock cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore \
            >>"$INFRA_DIR/tansu-install.log" 2>&1 || die "cargo install tansu failed (see $INFRA_DIR/tansu-install.log)"
        tansu_installed || die "tansu $TANSU_VERSION not found on PATH after cargo install"
    fi
    # Run from .infra/ so tansu's dotenv() does not read the project's .env.
    pid=$(RUST_LOG="${CJ_TANSU_LOG:-warn}" spawn "$TANSU_PID" "$TANSU_LOG" "$INFRA_DIR" \
        tansu broker \
        --cluster-id "$TANSU_CLUSTER_ID" \
        --listener-url "tcp://$TANSU_HOST:$TANSU_PORT" \
        --advertised-listener-url "tcp://$TANSU_HOST:$TANSU_PORT" \
        --storage-engine "memory://tansu/")
    if ! wait_port "$TANSU_HOST" "$TANSU_PORT" 30 "$pid"; then
        tail -n 20 "$TANSU_LOG" >&2 || true
        die "tansu did not start listening on $TANSU_HOST:$TANSU_PORT (see $TANSU_LOG)"
    fi
    log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid, memory storage, log $TANSU_LOG)"
}

tansu_down() { stop_pid "$TANSU_PID" tansu tansu; }

tansu_status() {
    local pid
    if pid=$(pid_alive "$TANSU_PID" tansu) && port_open "$TANSU_HOST" "$TANSU_PORT"; then
        log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid)"
    elif pid=$(listener_named "$TANSU_PORT" tansu); then
        log "tansu: running on $TANSU_HOST:$TANSU_PORT (pid $pid, started outside this checkout)"
    elif port_open "$TANSU_HOST" "$TANSU_PORT"; then
        log "tansu: not running from this checkout, but port $TANSU_HOST:$TANSU_PORT is in use by another process"
        return 1
    else
        log "tansu: not running"
        return 1
    fi
}

# --- Mosquitto (MQTT) ----------------------------------------------------------------------------

MQTT_PID="$INFRA_DIR/mosquitto.pid"
MQTT_LOG="$INFRA_DIR/mosquitto.log"
MQTT_CONF="$MQTT_DIR/mosquitto.conf"
# Before dynamic security, users were in a password file; a left-over one is removed.
MQTT_PASSWD="$MQTT_DIR/passwd"
# The plugin's users, roles and ACLs; the broker rewrites it (after dropping privileges) on changes.
MQTT_DYNSEC_DIR="$MQTT_DIR/dynsec"
MQTT_DYNSEC_JSON="$MQTT_DYNSEC_DIR/dynamic-security.json"

# The settings a SIGHUP does not reload: when only other lines changed, the broker is reloaded
# (sessions, queues and connections stay); otherwise it is restarted.
mqtt_static_lines() { grep -E '^(listener|plugin|plugin_opt_config_file|user|persistence|persistence_location|log_dest) ' || true; }

mqtt_dynsec_apply() {
    bash "$MQTT_DYNSEC_SETUP" apply "$MQTT_HOST" "$MQTT_PORT" "$MQTT_ADMIN_USER" "$MQTT_ADMIN_PASSWORD" \
        "$MQTT_USER" "$MQTT_PASSWORD" || die "mosquitto: setting up users and roles failed"
}

mqtt_check_auth() { # 0 if an authenticated QoS 1 publish works and an anonymous one is refused
    mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -u "$MQTT_USER" -P "$MQTT_PASSWORD" \
        -i "cj-infra-check-$$" -t cornjacket/infra/check -m ok -q 1 >/dev/null 2>&1 || return 1
    if mosquitto_pub -h "$MQTT_HOST" -p "$MQTT_PORT" -i "cj-infra-anon-$$" \
        -t cornjacket/infra/check -m anon -q 1 >/dev/null 2>&1; then
        return 2
    fi
}

mosquitto_up() {
    if ! command -v mosquitto >/dev/null 2>&1 || ! command -v mosquitto_ctrl >/dev/null 2>&1 ||
        ! command -v mosquitto_pub >/dev/null 2>&1; then
        ensure_packages mosquitto mosquitto-clients
    fi
    [[ -f $MQTT_TEMPLATE ]] || die "missing $MQTT_TEMPLATE"
    local plugin
    plugin=$(dpkg -L mosquitto 2>/dev/null | grep -m 1 '/mosquitto_dynamic_security\.so$' || true)
    [[ -n $plugin && -f $plugin ]] || die "mosquitto: the dynamic-security plugin is missing (Mosquitto 2.0 or later ships it)"

    mkdir -p "$MQTT_DIR/data" "$MQTT_DYNSEC_DIR"
    touch "$MQTT_LOG"
    local owner=mosquitto
    id -u "$owner" >/dev/null 2>&1 || owner=nobody

    rm -f "$MQTT_PASSWD"
    if [[ ! -s $MQTT_DYNSEC_JSON ]]; then
        bash "$MQTT_DYNSEC_SETUP" init "$MQTT_DYNSEC_JSON" "$MQTT_ADMIN_USER" "$MQTT_ADMIN_PASSWORD" ||
            die "mosquitto: could not create $MQTT_DYNSEC_JSON"
    fi
    "${SUDO[@]}" chown "$owner:" "$MQTT_DIR/data" "$MQTT_DYNSEC_DIR" "$MQTT_DYNSEC_JSON" "$MQTT_LOG"
    "${SUDO[@]}" chmod 0600 "$MQTT_DYNSEC_JSON"
    "${SUDO[@]}" chmod 0700 "$MQTT_DIR/data" "$MQTT_DYNSEC_DIR"

    local want changed=0 reloadable=0
    want=$(sed -e "s|@MQTT_HOST@|$MQTT_HOST|g" -e "s|@MQTT_PORT@|$MQTT_PORT|g" \
        -e "s|@MQTT_DIR@|$MQTT_DIR|g" -e "s|@MQTT_LOG@|$MQTT_LOG|g" -e "s|@MQTT_USER_OS@|$owner|g" \
        -e "s|@MQTT_DYNSEC_PLUGIN@|$plugin|g" "$MQTT_TEMPLATE")
    if [[ ! -f $MQTT_CONF || "$(cat "$MQTT_CONF")" != "$want" ]]; then
        if [[ -f $MQTT_CONF && "$(mqtt_static_lines <"$MQTT_CONF")" == "$(mqtt_static_lines <<<"$want")" ]]; then
            reloadable=1
        fi
        printf '%s\n' "$want" >"$MQTT_CONF"
        changed=1
    fi

    local pid
    if pid=$(pid_alive "$MQTT_PID" mosquitto); then
        if ((changed && reloadable)); then
            log "mosquitto: configuration changed, reloading (pid $pid)"
            "${SUDO[@]}" kill -HUP "$pid"
            mqtt_dynsec_apply
            log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $pid)"
            return 0
        elif ((changed)); then
            log "mosquitto: configuration changed, restarting"
            stop_pid "$MQTT_PID" mosquitto mosquitto >/dev/null
        elif port_open "$MQTT_HOST" "$MQTT_PORT"; then
            log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $pid)"
            return 0
        else
            stop_pid "$MQTT_PID" mosquitto mosquitto >/dev/null
        fi
    fi

    if port_open "$MQTT_HOST" "$MQTT_PORT"; then
        # Debian's package may have started the system-wide broker (/etc/mosquitto) on 1883.
        local sys_pid=""
        [[ -s /run/mosquitto/mosquitto.pid ]] && sys_pid=$(</run/mosquitto/mosquitto.pid)
        if [[ -n $sys_pid ]] && [[ $(cat "/proc/$sys_pid/comm" 2>/dev/null) == mosquitto ]]; then
            log "mosquitto: stopping the system-wide broker (pid $sys_pid) that holds port $MQTT_PORT"
            if [[ -x /etc/init.d/mosquitto ]]; then nolock "${SUDO[@]}" /etc/init.d/mosquitto stop >/dev/null 2>&1 || true; fi
            if alive "$sys_pid"; then "${SUDO[@]}" kill -TERM "$sys_pid" 2>/dev/null || true; fi
            local i
            for ((i = 0; i < 50; i++)); do port_open "$MQTT_HOST" "$MQTT_PORT" || break; sleep 0.1; done
        fi
        if port_open "$MQTT_HOST" "$MQTT_PORT"; then
            # Another checkout's development broker will do if it has the same users and refuses
            # anonymous clients; tests isolate themselves by topic.
            local other_pid rc=0
            if other_pid=$(listener_named "$MQTT_PORT" mosquitto); then
                mqtt_check_auth || rc=$?
                if [[ $rc == 0 ]]; then
                    log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $other_pid, started outside this checkout; reusing it)"
                    return 0
                fi
            fi
            die "mosquitto: port $MQTT_HOST:$MQTT_PORT is in use by another process (not started from $INFRA_DIR)"
        fi
    fi

    pid=$(spawn "$MQTT_PID" "$MQTT_LOG" "$MQTT_DIR" mosquitto -c "$MQTT_CONF")
    if ! wait_port "$MQTT_HOST" "$MQTT_PORT" 15 "$pid"; then
        tail -n 20 "$MQTT_LOG" >&2 || true
        die "mosquitto did not start listening on $MQTT_HOST:$MQTT_PORT (see $MQTT_LOG)"
    fi
    mqtt_dynsec_apply
    local rc=0
    mqtt_check_auth || rc=$?
    case $rc in
        0) ;;
        1) die "mosquitto: authenticated publish as $MQTT_USER failed (see $MQTT_LOG)" ;;
        *) die "mosquitto: anonymous publish was accepted, expected it to be refused" ;;
    esac
    log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $pid, user $MQTT_USER, admin $MQTT_ADMIN_USER, log $MQTT_LOG)"
}

mosquitto_down() { stop_pid "$MQTT_PID" mosquitto mosquitto; }

mosquitto_status() {
    local pid
    if pid=$(pid_alive "$MQTT_PID" mosquitto) && port_open "$MQTT_HOST" "$MQTT_PORT"; then
        log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $pid)"
    elif port_open "$MQTT_HOST" "$MQTT_PORT"; then
        if pid=$(listener_named "$MQTT_PORT" mosquitto); then
            log "mosquitto: running on $MQTT_HOST:$MQTT_PORT (pid $pid, started outside this checkout)"
            return 0
        fi
        log "mosquitto: not running from this checkout, but port $MQTT_HOST:$MQTT_PORT is in use by another process"
        return 1
    else
        log "mosquitto: not running"
        return 1
    fi
}

# --- main --------------------------------------------------------------------------------------

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || usage
    shift
    local components=("$@") c
    ((${#components[@]})) || components=(postgres tansu mosquitto)
    for c in "${components[@]}"; do
        case $c in postgres | tansu | mosquitto) ;; *) die "unknown component '$c' (postgres, tansu, mosquitto)" ;; esac
    done

    mkdir -p "$INFRA_DIR"
    # One infra.sh at a time per checkout (make -j, parallel callers).
    exec 9>"$INFRA_DIR/.lock"
    flock 9

    case $cmd in
        up)
            ensure_packages "${BUILD_PACKAGES[@]}"
            for c in "${components[@]}"; do "${c}_up"; done
            ;;
        down)
            local rev=() i
            for ((i = ${#components[@]} - 1; i >= 0; i--)); do rev+=("${components[i]}"); done
            for c in "${rev[@]}"; do "${c}_down"; done
            ;;
        status)
            local rc=0
            for c in "${components[@]}"; do "${c}_status" || rc=1; done
            return "$rc"
            ;;
        test-tools) ensure_packages "${TEST_PACKAGES[@]}" ;;
        -h | --help | help) usage ;;
        *) die "unknown command '$cmd' (up, down, status, test-tools)" ;;
    esac
}

main "$@"
