//! The event handler's retention job (SPEC §13): projections not updated for
//! `CJ_RETENTION_PROJECTIONS` go (an aggregate that fell silent), and so do resolved dead
//! letters (`replayed` or `discarded`) resolved longer ago than the same window; pending ones
//! stay until an operator acts. Deletes run in bounded slices, so a large backlog never holds one
//! long transaction.
//!
//! `projections.updated_at` has no index on purpose: indexing it would make every projection
//! upsert a non-HOT update that rewrites all the table's indexes, to speed up an hourly job.
//! Each slice scans the table instead (one row per aggregate, and usually a single slice).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::infra::clock_guard::ClockGuard;

/// The tables and the rows of each that go once older than the cutoff.
const TABLES: &[(&str, &str)] = &[
    ("eventhandler.projections", "updated_at < $1"),
    (
        "eventhandler.dlq",
        "updated_at < $1 AND status IN ('replayed', 'discarded')",
    ),
];

/// Rows removed (or, in a dry run, due) per table.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<(&'static str, u64)>,
}

impl Report {
    pub fn removed_anything(&self) -> bool {
        self.rows.iter().any(|(_, n)| *n > 0)
    }
}

/// Removes what is older than `keep` at `now`; with `dry_run` only counts it.
#[tracing::instrument(skip_all, fields(dry_run))]
pub async fn enforce(
    pool: &PgPool,
    now: DateTime<Utc>,
    keep: Duration,
    dry_run: bool,
    shutdown: &CancellationToken,
) -> Result<Report, sqlx::Error> {
    let keep = chrono::TimeDelta::from_std(keep).unwrap_or(chrono::TimeDelta::MAX);
    let cutoff = now
        .checked_sub_signed(keep)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut report = Report::default();
    for &(table, due) in TABLES {
        let n = if dry_run {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {due}"))
                .bind(cutoff)
                .fetch_one(pool)
                .await?;
            n as u64
        } else {
            crate::infra::db::delete_in_slices(pool, table, due, cutoff, shutdown).await?
        };
        report.rows.push((table, n));
    }
    if !dry_run {
        for (table, n) in &report.rows {
            metrics::counter!("cj_retention_removed_total", "table" => *table).increment(*n);
        }
    }
    Ok(report)
}

/// The hourly job: first run at once, then every `every` until shutdown; a round whose clock
/// the guard does not trust removes nothing.
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
            match enforce(db, now, keep, false, stop).await {
                Ok(r) if r.removed_anything() => {
                    let rows =
                        |t: &str| r.rows.iter().find(|(n, _)| *n == t).map_or(0, |(_, n)| *n);
                    tracing::info!(
                        projections = rows("eventhandler.projections"),
                        dead_letters = rows("eventhandler.dlq"),
                        "Event handler retention removed stale projections and resolved dead letters."
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "Event handler retention failed; the next run retries."
                ),
            }
        })
        .await;
}
