//! Event store partitions and the ingestion retention job (SPEC §13).
//!
//! `ingestion.event_store` is partitioned by UTC ingest day (migration V4): a daily partition
//! `event_store_pYYYYMMDD` covers `[day, day + 1)` of `ingested_at`, and the DEFAULT partition
//! catches rows of days that have none. The job keeps today and the next [`DAYS_AHEAD`] days
//! created, drops the daily partitions that lie wholly before the retention horizon, deletes the
//! default partition's rows before it in slices, and trims the idempotency records.
//!
//! The horizon is the start of the UTC day `CJ_RETENTION_EVENTS` ago, so whole days are kept and
//! every table agrees on it. Idempotency records go an hour after their events (covering clock
//! skew between the service, which stamps `ingested_at`, and the database, which stamps
//! `created_at`): a client event id forgotten while its event is still stored would let a late
//! repeat store the event_id twice.
//!
//! Partition DDL takes an ACCESS EXCLUSIVE lock on the event store, and inserts queue behind a
//! waiting one, so it runs with a short `lock_timeout`: a run that cannot get the lock gives up
//! and the next one retries (partitions exist days before they are needed). Instances serialise
//! on an advisory lock, and creation is idempotent, so several of them can run the job at once.

use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::infra::clock_guard::ClockGuard;

/// Days after today that always have a partition.
pub const DAYS_AHEAD: u64 = 3;
/// How long partition DDL waits for its locks before the run gives up.
const LOCK_TIMEOUT: &str = "2s";
/// The advisory lock that serialises partition DDL between instances ("cjpart").
const PARTITION_LOCK: i64 = 0x636a_7061_7274;
/// Idempotency records outlive the events they protect by this much (see the module comment).
const RECORD_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);
const PREFIX: &str = "event_store_p";
pub const DEFAULT_PARTITION: &str = "event_store_default";

/// A daily partition of the event store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub day: NaiveDate,
    /// PostgreSQL's estimate of its rows (`pg_class.reltuples`); -1 before the first analyze.
    pub rows_estimate: i64,
}

/// What a run did, or would do with `dry_run`.
#[derive(Debug, Default)]
pub struct Report {
    /// Partitions created (dry run: missing).
    pub created: Vec<String>,
    /// Partitions dropped (dry run: due).
    pub dropped: Vec<Partition>,
    /// Rows deleted (dry run: due) per table.
    pub rows: Vec<(&'static str, u64)>,
}

impl Report {
    pub fn removed_anything(&self) -> bool {
        !self.dropped.is_empty() || self.rows.iter().any(|(_, n)| *n > 0)
    }
}

/// The partition name of a UTC day.
pub fn partition_name(day: NaiveDate) -> String {
    format!("{PREFIX}{}", day.format("%Y%m%d"))
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// The start of the oldest UTC day that is kept: `keep` before `now`, rounded down to the day.
pub fn horizon(now: DateTime<Utc>, keep: Duration) -> DateTime<Utc> {
    let keep = chrono::TimeDelta::from_std(keep).unwrap_or(chrono::TimeDelta::MAX);
    let t = now
        .checked_sub_signed(keep)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    day_start(t.date_naive())
}

/// The daily partitions that exist, oldest first (the default partition is not listed).
pub async fn partitions(pool: &PgPool) -> Result<Vec<Partition>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, c.reltuples::int8
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'ingestion.event_store'::regclass
           AND c.relname ~ '^event_store_p[0-9]{8}$'",
    )
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Partition> = rows
        .into_iter()
        .filter_map(|(name, rows_estimate)| {
            let day = NaiveDate::parse_from_str(&name[PREFIX.len()..], "%Y%m%d").ok()?;
            Some(Partition {
                name,
                day,
                rows_estimate,
            })
        })
        .collect();
    out.sort_by_key(|p| p.day);
    Ok(out)
}

/// Opens a transaction for partition DDL: the cluster-wide advisory lock, and a lock timeout
/// so a busy table makes the run give up instead of stalling every insert behind it.
async fn ddl_transaction(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PARTITION_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Creates the partitions of today (by `now`) and the next [`DAYS_AHEAD`] days that are
/// missing; returns the names created. Idempotent, and safe when instances race.
#[tracing::instrument(skip_all)]
pub async fn create_ahead(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<String>, sqlx::Error> {
    let existing: Vec<NaiveDate> = partitions(pool).await?.iter().map(|p| p.day).collect();
    let mut created = Vec::new();
    for day in days_ahead(now) {
        if !existing.contains(&day) && create_partition(pool, day).await? {
            created.push(partition_name(day));
        }
    }
    Ok(created)
}

fn days_ahead(now: DateTime<Utc>) -> impl Iterator<Item = NaiveDate> {
    let today = now.date_naive();
    (0..=DAYS_AHEAD).filter_map(move |i| today.checked_add_days(Days::new(i)))
}

/// Creates one daily partition; false when another instance already had.
async fn create_partition(pool: &PgPool, day: NaiveDate) -> Result<bool, sqlx::Error> {
    let name = partition_name(day);
    let (from, to) = bounds(day);
    let mut tx = ddl_transaction(pool).await?;
    if exists(&mut tx, &name).await? {
        return Ok(false);
    }
    let create = format!(
        "CREATE TABLE IF NOT EXISTS ingestion.{name} PARTITION OF ingestion.event_store
         FOR VALUES FROM ('{from}') TO ('{to}')"
    );
    match ddl(&create).execute(&mut *tx).await {
        Ok(_) => {}
        // The default partition holds rows of that day (stored while the day had no
        // partition): PostgreSQL refuses a partition that would strand them.
        Err(sqlx::Error::Database(e)) if e.is_check_violation() => {
            drop(tx);
            return adopt_from_default(pool, day).await;
        }
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    Ok(true)
}

/// Creates a day's partition out of the default partition's rows of that day: a plain table
/// filled with them, then attached (which builds its indexes and checks its bounds).
async fn adopt_from_default(pool: &PgPool, day: NaiveDate) -> Result<bool, sqlx::Error> {
    let name = partition_name(day);
    let (from, to) = bounds(day);
    let mut tx = ddl_transaction(pool).await?;
    if exists(&mut tx, &name).await? {
        return Ok(false);
    }
    ddl(&format!(
        "CREATE TABLE ingestion.{name} (LIKE ingestion.event_store INCLUDING DEFAULTS)"
    ))
    .execute(&mut *tx)
    .await?;
    let moved = ddl(&format!(
        "WITH moved AS (
             DELETE FROM ingestion.{DEFAULT_PARTITION} WHERE ingested_at >= $1 AND ingested_at < $2
             RETURNING event_id, event_type, aggregate_id, event_time, ingested_at, payload,
                       metadata, stored_at)
         INSERT INTO ingestion.{name}
             (event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata, stored_at)
         SELECT * FROM moved"
    ))
    .bind(day_start(day))
    .bind(day_start(day) + chrono::TimeDelta::days(1))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    ddl(&format!(
        "ALTER TABLE ingestion.event_store ATTACH PARTITION ingestion.{name}
         FOR VALUES FROM ('{from}') TO ('{to}')"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(partition = %name, moved, "Event store partition created from the default partition's rows of its day.");
    Ok(true)
}

/// A statement naming one day's partition: not kept in the connection's statement cache.
fn ddl(sql: &str) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).persistent(false)
}

async fn exists(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('ingestion.' || $1) IS NOT NULL")
        .bind(name)
        .fetch_one(&mut **tx)
        .await
}

/// A day's bounds as SQL literals (generated here, never from input).
fn bounds(day: NaiveDate) -> (String, String) {
    let f = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S+00").to_string();
    (
        f(day_start(day)),
        f(day_start(day) + chrono::TimeDelta::days(1)),
    )
}

/// Runs the job once at `now`: creates partitions ahead, then removes what is older than
/// `keep`. With `dry_run` nothing changes and the report says what would.
#[tracing::instrument(skip_all, fields(dry_run))]
pub async fn enforce(
    pool: &PgPool,
    now: DateTime<Utc>,
    keep: Duration,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> Result<Report, sqlx::Error> {
    let horizon = horizon(now, keep);
    let mut report = Report::default();
    let existing = partitions(pool).await?;
    if dry_run {
        report.created = days_ahead(now)
            .filter(|d| !existing.iter().any(|p| p.day == *d))
            .map(partition_name)
            .collect();
    } else {
        report.created = create_ahead(pool, now).await?;
    }

    for p in existing.into_iter().filter(|p| day_start(p.day) < horizon) {
        // A day wholly before the horizon (its end is at or before it).
        if shutdown.is_cancelled() {
            break;
        }
        if !dry_run {
            let mut tx = ddl_transaction(pool).await?;
            if !exists(&mut tx, &p.name).await? {
                continue; // another instance dropped it meanwhile
            }
            ddl(&format!("DROP TABLE ingestion.{}", p.name))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        report.dropped.push(p);
    }

    let records = horizon.checked_sub_signed(RECORD_MARGIN).unwrap_or(horizon);
    for (table, column, cutoff) in [
        ("ingestion.event_store_default", "ingested_at", horizon),
        ("ingestion.idempotency_keys", "created_at", records),
        ("ingestion.event_ids", "created_at", records),
    ] {
        let n = delete_before(pool, table, column, cutoff, dry_run, shutdown).await?;
        report.rows.push((table, n));
    }

    if !dry_run {
        metrics::counter!("cj_retention_partitions_dropped_total")
            .increment(report.dropped.len() as u64);
        for (table, n) in &report.rows {
            metrics::counter!("cj_retention_removed_total", "table" => *table).increment(*n);
        }
        record_partition_count(pool).await?;
    }
    Ok(report)
}

/// Deletes (or, with `dry_run`, counts) the rows of `table` whose `column` is before `cutoff`,
/// in slices; stops between slices on shutdown.
pub(crate) async fn delete_before(
    pool: &PgPool,
    table: &str,
    column: &str,
    cutoff: DateTime<Utc>,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    if dry_run {
        let n: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} < $1"))
                .bind(cutoff)
                .fetch_one(pool)
                .await?;
        return Ok(n as u64);
    }
    crate::infra::db::delete_in_slices(pool, table, &format!("{column} < $1"), cutoff, shutdown)
        .await
}

async fn record_partition_count(pool: &PgPool) -> Result<(), sqlx::Error> {
    let n = partitions(pool).await?.len();
    metrics::gauge!("cj_event_store_partitions").set(n as f64);
    Ok(())
}

/// Creates the partitions ahead at startup, before the outbox processor's first insert; a
/// failure is logged (rows land in the default partition until a later run succeeds).
pub async fn prepare(pool: &PgPool, now: DateTime<Utc>) {
    match create_ahead(pool, now).await {
        Ok(created) if !created.is_empty() => {
            tracing::info!(created = ?created, "Event store partitions created.");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "Could not create event store partitions; new events go to the default partition until a later run succeeds.");
        }
    }
    if let Err(e) = record_partition_count(pool).await {
        tracing::debug!(error = %e, "Could not count event store partitions.");
    }
}

/// The hourly job: first run at once, then every `cfg.interval` until shutdown. Partitions are
/// created ahead even when retention is disabled, so the event store never falls back to its
/// default partition; only the removals depend on `cfg.enabled`, and on the guard trusting the
/// clock (partitions follow the host clock, which stamps `ingested_at`, either way).
pub async fn run(
    pool: PgPool,
    guard: ClockGuard,
    cfg: RetentionConfig,
    shutdown: CancellationToken,
) {
    loop {
        let trusted = if cfg.enabled {
            guard.now(&pool).await
        } else {
            None
        };
        let result = if let Some(now) = trusted {
            enforce(&pool, now, cfg.events, false, &shutdown).await
        } else {
            create_ahead(&pool, guard.clock.now())
                .await
                .map(|created| Report {
                    created,
                    ..Report::default()
                })
        };
        match result {
            Ok(r) if r.removed_anything() || !r.created.is_empty() => {
                let rows = |t: &str| r.rows.iter().find(|(n, _)| *n == t).map_or(0, |(_, n)| *n);
                tracing::info!(
                    partitions_created = ?r.created,
                    partitions_dropped = ?r.dropped.iter().map(|p| &p.name).collect::<Vec<_>>(),
                    default_partition_rows = rows("ingestion.event_store_default"),
                    idempotency_keys = rows("ingestion.idempotency_keys"),
                    event_ids = rows("ingestion.event_ids"),
                    "Ingestion retention run changed the event store."
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Ingestion retention run failed; the next run retries.")
            }
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(cfg.interval))
            .await
            .is_none()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn names_and_bounds_are_utc_days() {
        let d = NaiveDate::from_ymd_opt(2026, 3, 9).unwrap();
        assert_eq!(partition_name(d), "event_store_p20260309");
        assert_eq!(
            bounds(d),
            (
                "2026-03-09 00:00:00+00".to_string(),
                "2026-03-10 00:00:00+00".to_string()
            )
        );
    }

    #[test]
    fn the_horizon_keeps_whole_days() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(
            horizon(at("2026-03-09T13:45:00Z"), week),
            at("2026-03-02T00:00:00Z")
        );
        assert_eq!(
            horizon(at("2026-03-09T00:00:00Z"), week),
            at("2026-03-02T00:00:00Z")
        );
        // Absurd windows keep everything rather than overflow.
        assert_eq!(
            horizon(at("2026-03-09T00:00:00Z"), Duration::MAX),
            day_start(DateTime::<Utc>::MIN_UTC.date_naive())
        );
    }

    #[test]
    fn days_ahead_are_today_and_the_next_three() {
        let days: Vec<String> = days_ahead(at("2026-12-30T23:59:59Z"))
            .map(partition_name)
            .collect();
        assert_eq!(
            days,
            [
                "event_store_p20261230",
                "event_store_p20261231",
                "event_store_p20270101",
                "event_store_p20270102"
            ]
        );
    }
}
