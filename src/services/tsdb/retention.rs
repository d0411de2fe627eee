//! The time-series retention job (SPEC §13): readings older than the configured window go, in
//! bounded slices so a large backlog never holds one long transaction. With TimescaleDB the
//! hypertable's chunks are dropped instead, which is the cheap way there.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub async fn run(pool: PgPool, keep: Duration, every: Duration, shutdown: CancellationToken) {
    loop {
        match enforce(&pool, keep, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "tsdb retention: old readings removed."),
            Err(e) => tracing::warn!(error = %e, "tsdb retention failed; next run retries."),
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(every))
            .await
            .is_none()
        {
            return;
        }
    }
}

/// Removes readings older than `keep`; returns how many rows went (0 when chunks were dropped).
pub async fn enforce(
    pool: &PgPool,
    keep: Duration,
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let cutoff = chrono::Utc::now() - keep;
    let hypertable: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
    )
    .fetch_one(pool)
    .await?;
    if hypertable {
        sqlx::query("SELECT drop_chunks('tsdb.sensor_readings', older_than => $1)")
            .bind(cutoff)
            .execute(pool)
            .await?;
        return Ok(0);
    }
    let n = crate::infra::db::delete_in_slices(
        pool,
        "tsdb.sensor_readings",
        "time < $1",
        cutoff,
        shutdown,
    )
    .await?;
    metrics::counter!("cj_retention_removed_total", "table" => "tsdb.sensor_readings").increment(n);
    Ok(n)
}
