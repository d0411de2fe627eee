//! Delivery retention (SPEC §13): finished deliveries (neither `pending` nor `delivering`) not
//! updated within `CJ_RETENTION_DELIVERIES` go, in slices.

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
                Ok(n) => tracing::info!(removed = n, "Delivery retention: old deliveries removed."),
                Err(e) => {
                    tracing::warn!(error = %e, "Delivery retention failed; next run retries.")
                }
            }
        })
        .await;
}

/// Removes the deliveries finished before `keep` at `now`; returns how many went.
pub async fn enforce(
    pool: &PgPool,
    now: DateTime<Utc>,
    keep: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    crate::infra::db::remove_older_than(
        pool,
        "actions.deliveries",
        "status NOT IN ('pending', 'delivering') AND updated_at < $1",
        now,
        keep,
        shutdown,
    )
    .await
}
