//! The claim loop: claims as many due deliveries as there are free worker slots (`SKIP LOCKED`,
//! so instances share the work), and takes each through its course — rule, rate limit, breaker,
//! call, record — with database trouble retried on either side of the call but never the call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::breaker::{self, Gate};
use super::send::Outcome;
use super::{Claimed, Deliverer, rate_limit};
use crate::infra::db;
use crate::services::actions::rules;
use crate::services::actions::status::DeliveryStatus;

impl Deliverer {
    pub(in crate::services::actions) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.cfg.workers));
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        loop {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            let mut wait = self.cfg.poll_interval;
            if free > 0 {
                let token = Uuid::now_v7();
                match self.claim(free as i64, token).await {
                    Ok(claimed) if !claimed.is_empty() => {
                        backoff = Duration::from_millis(200);
                        for d in claimed {
                            let permit = slots.clone().acquire_owned().await.expect("open");
                            let this = self.clone();
                            let stop = shutdown.clone();
                            tasks.spawn(async move {
                                this.deliver(d, token, stop).await;
                                drop(permit);
                            });
                        }
                        continue;
                    }
                    Ok(_) => {
                        if let Ok(Some(due)) = self.next_due().await {
                            wait = wait.min(due);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "Could not claim deliveries.");
                        wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Calls in flight finish (each bounded by its timeout) and record their outcome;
        // deliveries waiting for a rate-limit slot hand their claim back.
        while tasks.join_next().await.is_some() {}
    }

    async fn claim(&self, n: i64, token: Uuid) -> Result<Vec<Claimed>, sqlx::Error> {
        sqlx::query_as(
            "WITH due AS (
                 SELECT delivery_id FROM actions.deliveries
                 WHERE status IN ('pending', 'delivering') AND next_attempt_at <= now()
                 ORDER BY next_attempt_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
             UPDATE actions.deliveries d
             SET status = 'delivering', claim_token = $2, updated_at = now(),
                 next_attempt_at = now() + make_interval(secs => $3)
             FROM due WHERE d.delivery_id = due.delivery_id
             RETURNING d.delivery_id, d.rule_id, d.event_type, d.aggregate_id, d.event_at,
                       d.body, d.traceparent, d.attempts",
        )
        .bind(n)
        .bind(token)
        .bind(self.cfg.claim_timeout.as_secs_f64())
        .fetch_all(&self.pool)
        .await
    }

    /// How long until the next pending delivery is due, if any is.
    async fn next_due(&self) -> Result<Option<Duration>, sqlx::Error> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT greatest(0, extract(epoch FROM min(next_attempt_at) - now()))::float8
             FROM actions.deliveries WHERE status IN ('pending', 'delivering')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(secs.map(|s| Duration::from_secs_f64(s + 0.005)))
    }

    async fn deliver(&self, d: Claimed, token: Uuid, shutdown: CancellationToken) {
        // Before the call, database trouble retries the preparation; after it, only the
        // recording is retried — never the call, or a receiver that answered would get it twice.
        let mut backoff = Duration::from_millis(200);
        let sent = loop {
            match self.call(&d, token, &shutdown).await {
                Ok(sent) => break sent,
                Err(e) if db::is_unavailable(&e) && !shutdown.is_cancelled() => {
                    tracing::warn!(delivery_id = %d.delivery_id, error = %e, "Database unavailable before a webhook call; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The claim expires and another attempt picks the delivery up.
                    tracing::warn!(delivery_id = %d.delivery_id, error = %e, "Could not prepare a webhook call.");
                    return;
                }
            }
        };
        let Some((endpoint, trial, outcome)) = sent else {
            return;
        };
        // Until it is recorded: a database outage only delays it. During a shutdown, a few more
        // tries; a 2xx left unrecorded would be sent again once the claim expires.
        let mut backoff = Duration::from_millis(200);
        let mut tries_after_stop = 0;
        loop {
            match self.record(&d, token, &endpoint, trial, &outcome).await {
                Ok(()) => return,
                Err(e) => {
                    if shutdown.is_cancelled() {
                        tries_after_stop += 1;
                        if tries_after_stop > 10 {
                            tracing::error!(delivery_id = %d.delivery_id, error = %e,
                                "Stopping before a webhook outcome could be recorded; the delivery will be attempted again when its claim expires.");
                            return;
                        }
                    }
                    tracing::warn!(delivery_id = %d.delivery_id, error = %e, "Could not record a webhook outcome; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Decides and makes the call. `None` when the delivery ended without a call (cancelled,
    /// short-circuited) or went back to the queue.
    async fn call(
        &self,
        d: &Claimed,
        token: Uuid,
        shutdown: &CancellationToken,
    ) -> Result<Option<(String, bool, Outcome)>, sqlx::Error> {
        let Some(rule) = rules::get(&self.pool, d.rule_id).await? else {
            self.finish(d, token, DeliveryStatus::Cancelled, "the rule was deleted")
                .await?;
            return Ok(None);
        };
        if !rule.enabled {
            self.finish(d, token, DeliveryStatus::Cancelled, "the rule is disabled")
                .await?;
            return Ok(None);
        }
        // The slot first, then the breaker: its verdict must be the current one when the call
        // goes, and a trial must not wait in the queue while others are short-circuited.
        if let Some(at) = rate_limit::reserve(&self.pool, self.cfg.rate_limit).await? {
            let wait = at.saturating_duration_since(Instant::now());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.release(d, token).await?;
                    return Ok(None);
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if shutdown.is_cancelled() {
            self.release(d, token).await?;
            return Ok(None);
        }
        let timeout = rule
            .timeout_ms
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(self.cfg.webhook_timeout)
            .min(self.max_timeout);
        let endpoint = rule.webhook_url.clone();
        let trial =
            match breaker::gate(&self.pool, &endpoint, timeout + self.cfg.claim_timeout).await? {
                Gate::Open(reason) => {
                    self.finish(d, token, DeliveryStatus::CircuitOpen, &reason)
                        .await?;
                    return Ok(None);
                }
                Gate::Trial => true,
                Gate::Closed => false,
            };
        // Hold the claim for the whole call.
        let held = sqlx::query(
            "UPDATE actions.deliveries
             SET next_attempt_at = now() + make_interval(secs => $3), endpoint = $4, updated_at = now()
             WHERE delivery_id = $1 AND claim_token = $2 AND status = 'delivering'",
        )
        .bind(d.delivery_id)
        .bind(token)
        .bind((timeout + self.cfg.claim_timeout).as_secs_f64())
        .bind(&endpoint)
        .execute(&self.pool)
        .await?;
        if held.rows_affected() == 0 {
            // Another worker took it over; a trial slot taken for it is handed back.
            if trial {
                breaker::reopen_trial(&self.pool, &endpoint).await?;
            }
            return Ok(None);
        }
        let outcome = self.send(&rule, d, timeout).await;
        Ok(Some((endpoint, trial, outcome)))
    }
}
