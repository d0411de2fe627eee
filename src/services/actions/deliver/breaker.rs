//! The circuit breaker per endpoint (`actions.endpoint_health`): after `breaker_threshold`
//! consecutive failures calls are short-circuited for the cool-down, then one trial call decides
//! whether it closes again. A row, so every instance sees the same state and a restart keeps it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use crate::services::actions::status::BreakerState;

/// The breaker's verdict on one call.
pub(super) enum Gate {
    /// Call normally.
    Closed,
    /// The one trial call after a cool-down.
    Trial,
    /// Short-circuit, with the reason.
    Open(String),
}

/// The breaker's verdict for an endpoint; takes the trial slot when the cool-down is over,
/// with a deadline of `hold` (the call's timeout and the claim timeout), after which a trial
/// whose worker vanished is taken over.
pub(super) async fn gate(
    pool: &PgPool,
    endpoint: &str,
    hold: Duration,
) -> Result<Gate, sqlx::Error> {
    let row: Option<(BreakerState, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT state, open_until FROM actions.endpoint_health WHERE endpoint = $1")
            .bind(endpoint)
            .fetch_optional(pool)
            .await?;
    let Some((state, until)) = row else {
        return Ok(Gate::Closed);
    };
    if state == BreakerState::Closed {
        return Ok(Gate::Closed);
    }
    let took = sqlx::query(
        "UPDATE actions.endpoint_health
         SET state = 'half_open', updated_at = now(),
             open_until = now() + make_interval(secs => $2)
         WHERE endpoint = $1 AND state IN ('open', 'half_open') AND open_until <= now()",
    )
    .bind(endpoint)
    .bind(hold.as_secs_f64())
    .execute(pool)
    .await?;
    if took.rows_affected() == 1 {
        return Ok(Gate::Trial);
    }
    Ok(Gate::Open(match until {
        Some(t) if state == BreakerState::Open => format!(
            "circuit open until {}: the endpoint failed repeatedly",
            crate::envelope::format_time(&t)
        ),
        _ => "circuit half-open: a trial call is in progress".to_string(),
    }))
}

/// A trial that never happened: let the next delivery take it at once.
pub(super) async fn reopen_trial(pool: &PgPool, endpoint: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE actions.endpoint_health SET state = 'open', open_until = now(), updated_at = now()
         WHERE endpoint = $1 AND state = 'half_open'",
    )
    .bind(endpoint)
    .execute(pool)
    .await
    .map(|_| ())
}

/// A call succeeded: the endpoint's breaker closes, its failures are forgotten, and what it
/// short-circuited while open is sent after all (due now, in the order it was recorded; the
/// rate limit and the fair share pace it). Returns how many were re-queued.
pub(super) async fn succeeded(
    tx: &mut Transaction<'_, Postgres>,
    endpoint: &str,
    trial: bool,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO actions.endpoint_health AS h
             (endpoint, state, consecutive_failures, last_success_at, updated_at)
         VALUES ($1, 'closed', 0, now(), now())
         ON CONFLICT (endpoint) DO UPDATE
         SET state = 'closed', consecutive_failures = 0, open_until = NULL,
             last_success_at = now(), updated_at = now()",
    )
    .bind(endpoint)
    .execute(&mut **tx)
    .await?;
    let requeued = sqlx::query(
        "UPDATE actions.deliveries
         SET status = 'pending', next_attempt_at = now(), updated_at = now(),
             last_error = 'short-circuited while the breaker was open; sent now that it closed'
         WHERE endpoint = $1 AND status = 'circuit_open'",
    )
    .bind(endpoint)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if trial || requeued > 0 {
        tracing::info!(%endpoint, requeued, "Circuit closed: the endpoint answered; what it short-circuited is sent now.");
    }
    Ok(requeued)
}

/// One more consecutive failure for the endpoint; opens its breaker at `threshold` for
/// `cooldown`, or again after a failed trial.
pub(super) async fn failed(
    tx: &mut Transaction<'_, Postgres>,
    endpoint: &str,
    error: &str,
    trial: bool,
    threshold: u32,
    cooldown: Duration,
) -> Result<(), sqlx::Error> {
    let opens: bool = sqlx::query_scalar(
        "INSERT INTO actions.endpoint_health AS h
             (endpoint, state, consecutive_failures, last_failure_at, last_error, updated_at)
         VALUES ($1, 'closed', 1, now(), $2, now())
         ON CONFLICT (endpoint) DO UPDATE
         SET consecutive_failures = h.consecutive_failures + 1,
             last_failure_at = now(), last_error = $2, updated_at = now()
         RETURNING (state = 'half_open' OR consecutive_failures >= $3)",
    )
    .bind(endpoint)
    .bind(error)
    .bind(threshold as i32)
    .fetch_one(&mut **tx)
    .await?;
    if opens || trial {
        sqlx::query(
            "UPDATE actions.endpoint_health
             SET state = 'open', opened_at = now(), updated_at = now(),
                 open_until = now() + make_interval(secs => $2)
             WHERE endpoint = $1",
        )
        .bind(endpoint)
        .bind(cooldown.as_secs_f64())
        .execute(&mut **tx)
        .await?;
        metrics::counter!("cj_webhook_breaker_opened_total").increment(1);
        tracing::warn!(%endpoint, cooldown = ?cooldown, error = %error,
            "Circuit opened: calls to this endpoint are short-circuited until the cool-down ends.");
    }
    Ok(())
}
