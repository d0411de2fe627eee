//! The global send rate: a GCRA bucket in one row (`actions.rate_limit`), so every instance
//! draws from the same budget and a restart does not refill it.

use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Reserves the next send slot of the global bucket (GCRA: one slot per `period / n`, `n`
/// at once); returns when the call may go, or `None` without a limit.
pub(super) async fn reserve(
    pool: &PgPool,
    limit: Option<(u32, Duration)>,
) -> Result<Option<Instant>, sqlx::Error> {
    let Some((n, period)) = limit else {
        return Ok(None);
    };
    let interval = period.as_secs_f64() / f64::from(n);
    let tolerance = interval * f64::from(n.saturating_sub(1));
    let wait: f64 = sqlx::query_scalar(
        "UPDATE actions.rate_limit r
         SET tat = greatest(o.tat, now()) + make_interval(secs => $1)
         FROM (SELECT tat FROM actions.rate_limit WHERE id FOR UPDATE) o
         WHERE r.id
         RETURNING greatest(0, extract(epoch FROM o.tat - make_interval(secs => $2) - now()))::float8",
    )
    .bind(interval)
    .bind(tolerance)
    .fetch_one(pool)
    .await?;
    Ok(Some(Instant::now() + Duration::from_secs_f64(wait)))
}
