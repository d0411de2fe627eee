//! Where a claimed delivery ends up, each guarded by its claim token so a worker that lost the
//! claim records nothing: given back, finished without a call, or the outcome of its call
//! together with the endpoint's breaker.

use std::time::Duration;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::send::Outcome;
use super::{Claimed, Deliverer, breaker};
use crate::services::actions::status::DeliveryStatus;

impl Deliverer {
    /// Gives a claimed delivery back, due now (shutdown while waiting for its slot).
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

    /// Records an attempt's outcome and the endpoint's breaker in one transaction.
    pub(super) async fn record(
        &self,
        d: &Claimed,
        token: Uuid,
        endpoint: &str,
        trial: bool,
        outcome: &Outcome,
    ) -> Result<(), sqlx::Error> {
        let attempts = d.attempts + 1;
        let mut tx = self.pool.begin().await?;
        let final_status = match outcome {
            Outcome::Success(code) => {
                // Whoever holds the claim now: the receiver has it, so it is delivered.
                let r = sqlx::query(
                    "UPDATE actions.deliveries
                     SET status = 'delivered', attempts = greatest(attempts, $2),
                         last_status_code = $3, last_error = NULL, claim_token = NULL,
                         delivered_at = now(), updated_at = now()
                     WHERE delivery_id = $1 AND status IN ('delivering', 'pending')",
                )
                .bind(d.delivery_id)
                .bind(attempts)
                .bind(i32::from(*code))
                .execute(&mut *tx)
                .await?;
                breaker::succeeded(&mut tx, endpoint, trial).await?;
                (r.rows_affected() == 1).then_some(DeliveryStatus::Delivered)
            }
            Outcome::Failure { status, error } => {
                // attempts so far: 1 + retries used; retry_delays[k] is the wait before retry k+1.
                let retry = self.cfg.retry_delays.get(d.attempts as usize).copied();
                let (state, next) = match retry {
                    Some(delay) => (DeliveryStatus::Pending, delay),
                    None => (DeliveryStatus::Failed, Duration::ZERO),
                };
                let r = sqlx::query(
                    "UPDATE actions.deliveries
                     SET status = $3, attempts = $4, last_status_code = $5, last_error = $6,
                         claim_token = NULL, updated_at = now(),
                         next_attempt_at = now() + make_interval(secs => $7)
                     WHERE delivery_id = $1 AND claim_token = $2 AND status = 'delivering'",
                )
                .bind(d.delivery_id)
                .bind(token)
                .bind(state)
                .bind(attempts)
                .bind(status.map(i32::from))
                .bind(error)
                .bind(next.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 0 {
                    // Taken over meanwhile: its new owner records what happens next.
                    return tx.commit().await;
                }
                breaker::failed(
                    &mut tx,
                    endpoint,
                    error,
                    trial,
                    self.cfg.breaker_threshold,
                    self.cfg.breaker_cooldown,
                )
                .await?;
                if state == DeliveryStatus::Failed {
                    self.promote_duplicate(&mut tx, d).await?;
                }
                (state == DeliveryStatus::Failed).then_some(state)
            }
        };
        tx.commit().await?;
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
