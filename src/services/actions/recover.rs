//! Bulk recovery (`POST /api/v1/actions/recover`, `cornjacket actions recover`): every delivery
//! of a rule (or of all rules) recorded since a time that ended `failed` or `circuit_open` is sent
//! again, with a fresh retry schedule. Running it twice re-sends nothing twice: the second run
//! finds them pending or delivered, not failed.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Re-queues the matching deliveries, due now; returns how many.
pub async fn recover(
    pool: &PgPool,
    since: DateTime<Utc>,
    rule: Option<Uuid>,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE actions.deliveries
         SET status = 'pending', round_start = attempts, claim_token = NULL,
             next_attempt_at = now(), updated_at = now(),
             last_error = 'recovered after ' || status || coalesce(': ' || last_error, '')
         WHERE status IN ('failed', 'circuit_open') AND created_at >= $1
           AND ($2::uuid IS NULL OR rule_id = $2)",
    )
    .bind(since)
    .bind(rule)
    .execute(pool)
    .await?;
    if r.rows_affected() > 0 {
        tracing::info!(requeued = r.rows_affected(), since = %crate::envelope::format_time(&since),
            rule_id = ?rule, "Deliveries recovered.");
    }
    Ok(r.rows_affected())
}
