//! The time-series retention job (SPEC §13): readings older than the configured window go, in
//! bounded slices so a large backlog never holds one long transaction. With TimescaleDB the
//! hypertable's chunks are dropped instead, which is the cheap way there.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub async fn run(pool: PgPool, keep: Duration, every: Duration, shutdown: CancellationToken) {
    loop {
        match enforce(&pool, keep).await {
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
pub async fn enforce(pool: &PgPool, keep: Duration) -> Result<u64, sqlx::Error> {
    let secs = keep.as_secs_f64();
    let hypertable: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
    )
    .fetch_one(pool)
    .await?;
    if hypertable {
        sqlx::query(
            "SELECT drop_chunks('tsdb.sensor_readings', older_than => now() - make_interval(secs => $1))",
        )
        .bind(secs)
        .execute(pool)
        .await?;
        return Ok(0);
    }
    let mut removed = 0;
    loop {
        let r = sqlx::query(
            "DELETE FROM tsdb.sensor_readings WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM tsdb.sensor_readings
                 WHERE time < now() - make_interval(secs => $1) LIMIT 10000))",
        )
        .bind(secs)
        .execute(pool)
        .await?;
        removed += r.rows_affected();
        if r.rows_affected() < 10_000 {
            return Ok(removed);
        }
    }
}
