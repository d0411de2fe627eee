//! Where a claimed delivery ends up, each guarded by its claim token so a worker that lost the
//! claim changes nothing: given back, finished without a call, or the outcome of its call
//! (always recorded as an attempt) together with the endpoint's breaker.

use std::time::Duration;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::send::{Outcome, Verdict};
use super::{Claimed, Deliverer, breaker};
use crate::services::actions::rules;
use crate::services::actions::status::DeliveryStatus;

impl Deliverer {
    /// Gives a claimed delivery back, due now (shutdown before its call).
    pub(super) async fn release(&self, d: &Claimed, token: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE actions.deliveries
             SET status = 'pending', claim_token = NULL, next_attempt_at = now(), updated_at = now()
             WHERE delivery_id = $1 AND claim_token = $2 AND status = 'delivering'",
        )
        .bind(d.delivery_id)
        .bind(token)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Ends a delivery without a call (cancelled, circuit_open).
    pub(super) async fn finish(
        &self,
        d: &Claimed,
        token: Uuid,
        status: DeliveryStatus,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        let r = sqlx::query(
            "UPDATE actions.deliveries
             SET status = $3, last_error = $4, claim_token = NULL, updated_at = now()
             WHERE delivery_id = $1 AND claim_token = $2 AND status = 'delivering'",
        )
        .bind(d.delivery_id)
        .bind(token)
        .bind(status)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            metrics::counter!("cj_webhook_deliveries_total", "status" => status.as_str())
                .increment(1);
        }
        Ok(())
    }

    /// Records an attempt — the call as it happened, in `actions.attempts` — and where it
    /// leaves the delivery, the endpoint's breaker and (410) the rule, in one transaction.
    pub(super) async fn record(
        &self,
        d: &Claimed,
        token: Uuid,
        endpoint: &str,
        trial: bool,
        outcome: &Outcome,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Whoever holds the claim now, the call happened: it is recorded either way.
        let attempt: i32 = sqlx::query_scalar(
            "INSERT INTO actions.attempts
                 (delivery_id, attempt, started_at, duration_ms, status_code, response_excerpt,
                  error, retry_after_s)
             SELECT $1, greatest(coalesce(max(a.attempt), 0), $2) + 1, $3, $4, $5, $6, $7, $8
             FROM actions.attempts a WHERE a.delivery_id = $1
             RETURNING attempt",
        )
        .bind(d.delivery_id)
        .bind(d.attempts)
        .bind(outcome.started_at)
        .bind(outcome.duration.as_millis().min(i32::MAX as u128) as i32)
        .bind(outcome.status.map(i32::from))
        .bind(&outcome.excerpt)
        .bind(&outcome.error)
        .bind(outcome.retry_after.map(|r| r.as_secs_f64()))
        .fetch_one(&mut *tx)
        .await?;
        let code = outcome.status.map(i32::from);
        let mut requeued = 0;
        let final_status = match outcome.verdict {
            Verdict::Success => {
                // Whoever holds the claim now: the receiver has it, so it is delivered.
                let r = sqlx::query(
                    "UPDATE actions.deliveries
                     SET status = 'delivered', attempts = greatest(attempts, $2),
                         last_status_code = $3, last_error = NULL, claim_token = NULL,
                         delivered_at = now(), updated_at = now()
                     WHERE delivery_id = $1 AND status IN ('delivering', 'pending')",
                )
                .bind(d.delivery_id)
                .bind(attempt)
                .bind(code)
                .execute(&mut *tx)
                .await?;
                requeued = breaker::succeeded(&mut tx, endpoint, trial).await?;
                (r.rows_affected() == 1).then_some(DeliveryStatus::Delivered)
            }
            Verdict::Failure | Verdict::Gone => {
                let gone = outcome.verdict == Verdict::Gone;
                // Attempts so far in this round: 1 + retries used; retry_delays[k] is the wait
                // before retry k+1, spread ±20% so the retries of deliveries that failed
                // together (an outage) do not come back together; never sooner than the
                // receiver's Retry-After.
                let used = (d.attempts - d.round_start).max(0) as usize;
                let retry = (!gone)
                    .then(|| self.cfg.retry_delays.get(used).copied())
                    .flatten()
                    .map(|delay| {
                        let jittered = delay.mul_f64(rand::random_range(0.8..1.2));
                        outcome.retry_after.map_or(jittered, |ra| jittered.max(ra))
                    });
                let (state, next) = match retry {
                    Some(delay) => (DeliveryStatus::Pending, delay),
                    None => (DeliveryStatus::Failed, Duration::ZERO),
                };
                let r = sqlx::query(
                    "UPDATE actions.deliveries
                     SET status = $3, attempts = greatest(attempts, $4), last_status_code = $5,
                         last_error = $6, claim_token = NULL, updated_at = now(),
                         next_attempt_at = now() + make_interval(secs => $7)
                     WHERE delivery_id = $1 AND claim_token = $2 AND status = 'delivering'",
                )
                .bind(d.delivery_id)
                .bind(token)
                .bind(state)
                .bind(attempt)
                .bind(code)
                .bind(&outcome.error)
                .bind(next.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 {
                    // Taken over meanwhile: its new owner records what happens next.
                    return tx.commit().await;
                }
                if gone {
                    // Not the endpoint's health: it answered, definitively.
                    let reason = format!(
                        "the receiver answered 410 Gone to delivery {} at {}",
                        d.delivery_id,
                        crate::envelope::format_time(&outcome.started_at)
                    );
                    if rules::disable_gone(&mut *tx, d.rule_id, &reason).await? {
                        metrics::counter!("cj_webhook_rules_disabled_total", "reason" => "gone")
                            .increment(1);
                        tracing::warn!(rule_id = %d.rule_id, %endpoint,
                            "Rule disabled: its receiver answered 410 Gone. Enable it again through the API once the endpoint is back.");
                    }
                } else {
                    breaker::failed(
                        &mut tx,
                        endpoint,
                        outcome.error.as_deref().unwrap_or("failed"),
                        trial,
                        self.cfg.breaker_threshold,
                        self.cfg.breaker_cooldown,
                    )
                    .await?;
                    if state == DeliveryStatus::Failed {
                        self.promote_duplicate(&mut tx, d).await?;
                    }
                }
                (state == DeliveryStatus::Failed).then_some(state)
            }
        };
        tx.commit().await?;
        if requeued > 0 {
            self.wake.notify_one();
        }
        if let Some(s) = final_status {
            metrics::counter!("cj_webhook_deliveries_total", "status" => s.as_str()).increment(1);
        }
        Ok(())
    }

    /// A delivery that failed for good hands its news on: the newest event it suppressed as a
    /// duplicate (same rule, type and aggregate, after it) is sent instead, so an outage of the
    /// receiver does not swallow the whole window.
    async fn promote_duplicate(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        d: &Claimed,
    ) -> Result<(), sqlx::Error> {
        let r = sqlx::query(
            "UPDATE actions.deliveries
             SET status = 'pending', next_attempt_at = now(), updated_at = now(),
                 last_error = 'sent in place of ' || $5::text || ', which failed'
             WHERE delivery_id = (
                 SELECT delivery_id FROM actions.deliveries
                 WHERE rule_id = $1 AND event_type = $2 AND aggregate_id = $3
                   AND status = 'deduplicated' AND event_at >= $4
                 ORDER BY event_at DESC, delivery_id DESC
                 LIMIT 1)",
        )
        .bind(d.rule_id)
        .bind(&d.event_type)
        .bind(&d.aggregate_id)
        .bind(d.event_at)
        .bind(d.delivery_id.to_string())
        .execute(&mut **tx)
        .await?;
        if r.rows_affected() == 1 {
            self.wake.notify_one();
        }
        Ok(())
    }
}
