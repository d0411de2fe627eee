//! Database adapters: one lazily-connecting pool per service URL, and each service's embedded
//! migrations applied under an advisory lock with the history table inside its own schema.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::Config;

mod watchdog;

/// A service's migrations: its schema and the SQL files it embeds from `migrations/<service>/`
/// (each service declares its own with [`service_migrations!`]; this module only runs them).
pub struct Migrations {
    pub schema: &'static str,
    pub runner: fn() -> refinery::Runner,
}

/// Declares a service's `pub static MIGRATIONS`: its schema, and the folder (from the crate
/// root) its SQL is embedded from — `service_migrations!("tsdb", "migrations/tsdb")`.
#[macro_export]
macro_rules! service_migrations {
    ($schema:literal, $dir:literal) => {
        mod embedded_migrations {
            refinery::embed_migrations!($dir);
        }
        pub static MIGRATIONS: $crate::infra::db::Migrations = $crate::infra::db::Migrations {
            schema: $schema,
            runner: embedded_migrations::migrations::runner,
        };
    };
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database could not be reached: worth waiting for.
    #[error("database unreachable: {0}")]
    Unreachable(#[source] tokio_postgres::Error),
    /// A migration itself failed: fatal, the process must stop.
    #[error("migration of schema {schema} failed: {source}")]
    Failed {
        schema: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A pool that connects on first use, so a service can start (and report unhealthy) while its
/// database is still down.
///
/// Every connection carries the session timeouts of `CJ_DB_*` (sent in the startup packet, so
/// they cost no round trip) and, unless `CJ_DB_RESPONSE_TIMEOUT=off`, runs through a
/// [`watchdog::Relay`] that drops it once the server stops answering (why it takes a relay: see
/// that module). A connection idle for a while is pinged, with a short deadline, before it is
/// handed out, so one that died while it sat in the pool costs a second, not the response
/// deadline.
pub fn lazy_pool(url: &str, config: &Config, max: u32) -> anyhow::Result<PgPool> {
    let t = config.db_timeouts;
    let opts: PgConnectOptions = url.parse()?;
    let mut opts = opts
        .application_name("cornjacket")
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
        .options(session_settings(&t));
    let relay = match t.response {
        // A Unix socket to a local server has no network in between to lose.
        Some(response) if opts.get_socket().is_none() && !opts.get_host().starts_with('/') => {
            let wire = watchdog::Wire {
                response,
                keepalive: t.keepalive,
                connect: config.db_acquire_timeout.max(Duration::from_secs(1)),
            };
            let relay = watchdog::Relay::start(opts.get_host(), opts.get_port(), wire)
                .map_err(|e| anyhow::anyhow!("could not start the database relay: {e}"))?;
            opts = opts.socket(relay.dir());
            Some(relay)
        }
        _ => None,
    };
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(config.db_acquire_timeout)
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            // The relay lives as long as the pool, which owns this closure.
            let _ = &relay;
            Box::pin(async move {
                if meta.idle_for < PING_WHEN_IDLE_FOR {
                    return Ok(true);
                }
                match tokio::time::timeout(PING_TIMEOUT, conn.ping()).await {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        tracing::info!(idle_for = ?meta.idle_for, "A pooled database connection did not answer a ping; discarding it.");
                        Ok(false)
                    }
                }
            })
        })
        .connect_lazy_with(opts))
}

/// A pooled connection unused for this long is pinged before it is handed out. Under load
/// connections are reused within milliseconds and skip the ping; after a quiet spell (or an
/// outage, when nothing succeeds) the ping costs one round trip.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// A ping is one round trip with no work on the server: a healthy one answers in milliseconds.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The server-side settings of every pooled session. `lock_timeout` is left alone: the statement
/// timeout bounds lock waits too, and the waits this platform means to make (the bus recovery
/// waiting for a batch's shard lock) would only fail sooner; retention's DDL sets its own.
fn session_settings(t: &crate::config::DbTimeouts) -> [(&'static str, String); 5] {
    let ms = |d: Duration| d.as_millis().to_string();
    let secs = |d: Duration| d.as_secs().max(1).to_string();
    [
        ("statement_timeout", ms(t.statement)),
        (
            "idle_in_transaction_session_timeout",
            ms(t.idle_in_transaction),
        ),
        // The server's end: a backend whose client vanished exits instead of holding a
        // connection slot for the kernel's two-hour default.
        ("tcp_keepalives_idle", secs(t.keepalive)),
        ("tcp_keepalives_interval", secs(t.keepalive / 3)),
        ("tcp_keepalives_count", "3".to_string()),
    ]
}

/// Applies one service's migrations. Two processes starting at once serialise on an advisory
/// lock, so each migration runs exactly once; the history table lives in the service's schema so
/// services sharing a database never collide.
pub async fn migrate(url: &str, m: &Migrations) -> Result<refinery::Report, MigrateError> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(MigrateError::Unreachable)?;
    // Its own connection, without the pools' statement timeout: a migration may take long, and
    // waits for another instance's. A connect that gets no answer is given up and retried, and
    // keepalives find a server that vanished meanwhile (unless the URL says otherwise).
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    if cfg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        cfg.keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(3))
            .keepalives_retries(3);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(20));
    }
    let (mut client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(MigrateError::Unreachable)?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "migration connection closed");
        }
    });
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| MigrateError::Failed {
        schema: m.schema,
        source: e,
    };
    let lock_key = advisory_key(m.schema);
    let result = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&lock_key])
            .await
            .map_err(|e| fail(e.into()))?;
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", m.schema))
            .await
            .map_err(|e| fail(e.into()))?;
        let mut runner = (m.runner)();
        runner.set_migration_table_name(format!("{}.refinery_schema_history", m.schema));
        runner
            .run_async(&mut client)
            .await
            .map_err(|e| fail(e.into()))
    }
    .await;
    // Unlock explicitly; closing the connection would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_key])
        .await;
    drop(client);
    let _ = conn_task.await;
    result
}

/// Rows deleted per statement by retention jobs: small enough that no statement holds locks or
/// builds WAL for long, large enough to keep up.
pub const RETENTION_SLICE: i64 = 10_000;

/// Deletes the rows of `table` matching `due` (a condition in which `$1` is `cutoff`),
/// [`RETENTION_SLICE`] rows per statement, stopping between slices on shutdown. The outer
/// condition repeats the inner one, so a row changed meanwhile (an upserted projection) stays.
pub async fn delete_in_slices(
    pool: &PgPool,
    table: &str,
    due: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE {due} AND ctid = ANY (ARRAY(
             SELECT ctid FROM {table} WHERE {due} LIMIT $2))"
    );
    let mut removed = 0;
    while !shutdown.is_cancelled() {
        let n = sqlx::query(&sql)
            .bind(cutoff)
            .bind(RETENTION_SLICE)
            .execute(pool)
            .await?
            .rows_affected();
        removed += n;
        if n < RETENTION_SLICE as u64 {
            break;
        }
    }
    Ok(removed)
}

/// The retention job of one table: deletes (in slices) the rows `due` (`$1` is the cutoff) once
/// older than `keep` at `now`, and counts them in `cj_retention_removed_total{table}`.
pub async fn remove_older_than(
    pool: &PgPool,
    table: &'static str,
    due: &str,
    now: chrono::DateTime<chrono::Utc>,
    keep: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<u64, sqlx::Error> {
    let cutoff = now
        .checked_sub_signed(chrono::TimeDelta::from_std(keep).unwrap_or(chrono::TimeDelta::MAX))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let n = delete_in_slices(pool, table, due, cutoff, shutdown).await?;
    metrics::counter!("cj_retention_removed_total", "table" => table).increment(n);
    Ok(n)
}

/// A stable 64-bit advisory lock key for a name (FNV-1a; std's hasher is not stable across builds).
pub fn advisory_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"cornjacket.migrate.".iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Whether a database error means "the database is not there" (wait and retry) rather than
/// "this statement or this data is wrong".
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception; 57P0x: shutdown/crash; 53: resources; 40: retryable;
            // 25006: read-only transaction (writing to a demoted primary during a failover);
            // 57014: statement cancelled or timed out; 55P03: lock not available.
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || matches!(c.as_ref(), "40001" | "40P01" | "25006" | "57014" | "55P03")
        }),
        _ => false,
    }
}

/// What a failed statement of a consumer says about the message it carried (ADR-0004).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not the message's fault: the database, the way to it or its setup cannot take this
    /// write now (unreachable, shutting down, out of resources, a privilege revoked, a relation
    /// missing mid-rollout, a pooler that does not speak the protocol, an internal error). Every
    /// other message would fail the same way: block and retry, never dead-letter.
    Outage,
    /// The message's own data is refused (a data exception or an integrity violation): other
    /// messages may pass. Retried on the consumer's schedule, then dead-lettered.
    Refusal,
}

/// Sorts a database error by cause, by SQLSTATE class where there is one. Only the classes that
/// are about the values a statement carries are refusals: anything else, including codes this
/// table does not know, is an outage, because dead-lettering a message for an environment fault
/// loses it from the stream, while blocking on a refusal only delays the partition until the
/// schedule runs out.
pub fn classify(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => classify_sqlstate(&code),
            None => Failure::Outage,
        },
        // A value of the message that cannot be sent as a parameter.
        sqlx::Error::Encode(_) => Failure::Refusal,
        // Io, Tls, Protocol, PoolTimedOut, PoolClosed, WorkerCrashed, Configuration, and decode
        // or type errors (the schema is not what the code expects: a rollout in progress).
        _ => Failure::Outage,
    }
}

/// [`classify`] for a SQLSTATE code.
pub fn classify_sqlstate(code: &str) -> Failure {
    match code.get(..2) {
        // 22: data exception (bad text representation, out of range, NUL bytes, bad encoding);
        // 23: integrity constraint violation (not null, foreign key, unique, check, exclusion).
        Some("22" | "23") => Failure::Refusal,
        // 54000: program limit exceeded, the one the values cause (an index row too large).
        _ if code == "54000" => Failure::Refusal,
        _ => Failure::Outage,
    }
}

/// Pings a pool with a deadline, for health checks.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(pool),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out after 2s".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with only a SQLSTATE, as a server or a pooler would send it.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn sqlstates_from_the_environment_are_outages_and_the_messages_data_are_refusals() {
        use Failure::{Outage, Refusal};
        let table: &[(&str, Failure, &str)] = &[
            ("42501", Outage, "insufficient_privilege: a grant revoked"),
            (
                "42P01",
                Outage,
                "undefined_table: a relation renamed mid-rollout",
            ),
            (
                "42703",
                Outage,
                "undefined_column: a migration not applied yet",
            ),
            ("42883", Outage, "undefined_function"),
            (
                "42804",
                Outage,
                "datatype_mismatch: a column's type changed",
            ),
            (
                "42601",
                Outage,
                "syntax_error: a bug in the code, not in the message",
            ),
            (
                "3D000",
                Outage,
                "invalid_catalog_name: the database is gone",
            ),
            ("3F000", Outage, "invalid_schema_name"),
            ("28000", Outage, "invalid_authorization_specification"),
            ("28P01", Outage, "invalid_password: rotated credentials"),
            ("08000", Outage, "connection_exception"),
            ("08003", Outage, "connection_does_not_exist"),
            ("08006", Outage, "connection_failure"),
            ("08P01", Outage, "protocol_violation (a pooler)"),
            ("57P01", Outage, "admin_shutdown"),
            ("57P03", Outage, "cannot_connect_now: starting up"),
            ("57014", Outage, "query_canceled: statement timeout"),
            ("53100", Outage, "disk_full"),
            ("53200", Outage, "out_of_memory"),
            ("53300", Outage, "too_many_connections"),
            ("58000", Outage, "system_error"),
            ("58030", Outage, "io_error"),
            ("XX000", Outage, "internal_error"),
            ("XX001", Outage, "data_corrupted"),
            (
                "0A000",
                Outage,
                "feature_not_supported (pgbouncer, a cached plan)",
            ),
            (
                "26000",
                Outage,
                "invalid_sql_statement_name: a pooler lost the statement",
            ),
            ("42P05", Outage, "duplicate_prepared_statement: a pooler"),
            (
                "25006",
                Outage,
                "read_only_sql_transaction: a demoted primary",
            ),
            ("25P02", Outage, "in_failed_sql_transaction"),
            ("40001", Outage, "serialization_failure"),
            ("40P01", Outage, "deadlock_detected"),
            ("55P03", Outage, "lock_not_available"),
            ("55006", Outage, "object_in_use"),
            ("54001", Outage, "statement_too_complex"),
            ("P0001", Outage, "raise_exception: not ours to judge"),
            ("ZZ999", Outage, "unknown: never a reason to drop a message"),
            ("22P02", Refusal, "invalid_text_representation"),
            ("22003", Refusal, "numeric_value_out_of_range"),
            (
                "22021",
                Refusal,
                "character_not_in_repertoire: a NUL in text",
            ),
            (
                "22P05",
                Refusal,
                "untranslatable_character: \\u0000 in jsonb",
            ),
            ("22007", Refusal, "invalid_datetime_format"),
            ("22008", Refusal, "datetime_field_overflow"),
            ("22001", Refusal, "string_data_right_truncation"),
            ("23502", Refusal, "not_null_violation"),
            ("23503", Refusal, "foreign_key_violation"),
            ("23505", Refusal, "unique_violation"),
            ("23514", Refusal, "check_violation"),
            ("23P01", Refusal, "exclusion_violation"),
            (
                "54000",
                Refusal,
                "program_limit_exceeded: an index row too large",
            ),
        ];
        for (code, want, why) in table {
            let e = sqlx::Error::Database(Box::new(Coded(code)));
            assert_eq!(classify(&e), *want, "{code} ({why})");
        }
    }

    #[test]
    fn errors_without_a_sqlstate_are_outages_except_a_value_that_cannot_be_encoded() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let outages = [
            sqlx::Error::Io(io()),
            sqlx::Error::Protocol("unexpected message from a pooler".into()),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Tls(Box::new(io())),
            sqlx::Error::Configuration(Box::new(io())),
            sqlx::Error::TypeNotFound {
                type_name: "projection_state".into(),
            },
            sqlx::Error::ColumnNotFound("state".into()),
            sqlx::Error::ColumnDecode {
                index: "0".into(),
                source: Box::new(io()),
            },
            sqlx::Error::Decode(Box::new(io())),
            sqlx::Error::RowNotFound,
        ];
        for e in &outages {
            assert_eq!(classify(e), Failure::Outage, "{e:?}");
        }
        assert_eq!(
            classify(&sqlx::Error::Encode(Box::new(io()))),
            Failure::Refusal
        );
    }
}
