//! Time-series retention (SPEC §13): readings older than the configured window go. On plain
//! PostgreSQL an hourly job deletes them in bounded slices, so a large backlog never holds one
//! long transaction; with TimescaleDB the hypertable's retention policy drops whole chunks,
//! which is the cheap way there, and the job is not needed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::infra::clock_guard::ClockGuard;

/// The hourly job; a round whose clock the guard does not trust removes nothing.
pub async fn run(
    pool: PgPool,
    guard: ClockGuard,
    keep: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let (db, stop) = (&pool, &shutdown);
    guard
        .rounds(db, every, stop, |now| async move {
            match enforce(db, now, keep, stop).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "tsdb retention: old readings removed."),
                Err(e) => tracing::warn!(error = %e, "tsdb retention failed; next run retries."),
            }
        })
        .await;
}

/// Whether `tsdb.sensor_readings` is a TimescaleDB hypertable (asked of the table, not of the
/// server: a plain table restored into a TimescaleDB server stays plain).
pub async fn is_hypertable(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let extension: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
    )
    .fetch_one(pool)
    .await?;
    if !extension {
        return Ok(false);
    }
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                        WHERE hypertable_schema = 'tsdb' AND hypertable_name = 'sensor_readings')",
    )
    .fetch_one(pool)
    .await
}

/// With TimescaleDB, the hypertable's own retention policy does the work: set it to the
/// configured window (or remove it when retention is off). Returns whether a policy applies.
pub async fn apply_policy(pool: &PgPool, keep: Option<Duration>) -> Result<bool, sqlx::Error> {
    if !is_hypertable(pool).await? {
        return Ok(false);
    }
    sqlx::query("SELECT remove_retention_policy('tsdb.sensor_readings', if_exists => true)")
        .execute(pool)
        .await?;
    if let Some(keep) = keep {
        sqlx::query(
            "SELECT add_retention_policy('tsdb.sensor_readings', make_interval(secs => $1))",
        )
        .bind(keep.as_secs_f64())
        .execute(pool)
        .await?;
    }
    Ok(true)
}

/// Removes readings older than `keep` at `now` from the plain table, in slices; returns how
/// many went. A reading that arrived late stays until its ingestion is that old too: its raw
/// row is what keeps a redelivery or replay of it out of the rollups a second time (the sink's
/// `WRITE`).
pub async fn enforce(
    pool: &PgPool,
    now: DateTime<Utc>,
    keep: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    crate::infra::db::remove_older_than(
        pool,
        "tsdb.sensor_readings",
        "time < $1 AND (ingested_at IS NULL OR ingested_at < $1)",
        now,
        keep,
        shutdown,
    )
    .await
}

/// How long each rollup is kept (`CJ_RETENTION_ROLLUP_1M`, `CJ_RETENTION_ROLLUP_1H`).
#[derive(Debug, Clone, Copy)]
pub struct RollupWindows {
    pub minute: Duration,
    pub hour: Duration,
}

/// The hourly job of the rollups: plain tables on either kind of server, so always a job.
pub async fn run_rollups(
    pool: PgPool,
    guard: ClockGuard,
    windows: RollupWindows,
    every: Duration,
    shutdown: CancellationToken,
) {
    let (db, stop) = (&pool, &shutdown);
    guard
        .rounds(db, every, stop, |now| async move {
            match enforce_rollups(db, now, windows, stop).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "tsdb retention: old rollup buckets removed."),
                Err(e) => {
                    tracing::warn!(error = %e, "tsdb rollup retention failed; next run retries.")
                }
            }
        })
        .await;
}

/// Removes rollup buckets that start before each rollup's window at `now`; returns how many.
pub async fn enforce_rollups(
    pool: &PgPool,
    now: DateTime<Utc>,
    windows: RollupWindows,
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let remove = |table, keep| {
        crate::infra::db::remove_older_than(pool, table, "bucket < $1", now, keep, shutdown)
    };
    Ok(remove("tsdb.sensor_rollups_1m", windows.minute).await?
        + remove("tsdb.sensor_rollups_1h", windows.hour).await?)
}
