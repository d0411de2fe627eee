//! The claim loop: claims as many due deliveries as there are free worker slots *and* free
//! rate-limit slots (one transaction, `SKIP LOCKED`, so instances share the work), round-robin
//! over endpoints and skipping those whose breaker is open, and takes each through its course —
//! rule, breaker, call, record — with database trouble retried on either side of the call but
//! never the call.

use std::sync::Arc;
use std::time::Duration;

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

/// How many due deliveries of endpoints with an open breaker are parked as `circuit_open` per
/// pass: a deep backlog behind a dead endpoint is worked off in slices, never in one statement.
const PARK_SLICE: i64 = 1000;

/// What one claim found.
struct Claim {
    claimed: Vec<Claimed>,
    /// Nothing claimed because no rate-limit slot is free: when the next one is.
    slot_in: Option<Duration>,
    /// Due deliveries were there but other instances held them: look again soon.
    contended: bool,
}

impl Deliverer {
    pub(in crate::services::actions) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.cfg.workers));
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        // Due deliveries held by other instances: look again soon, then less and less often
        // (a stuck instance holding rows must not turn this loop into a busy one).
        let mut contended_wait = Duration::from_millis(20);
        loop {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            let mut wait = self.cfg.poll_interval;
            if free > 0 {
                let token = Uuid::now_v7();
                match self.claim(free, token).await {
                    Ok(c) if !c.claimed.is_empty() => {
                        backoff = Duration::from_millis(200);
                        contended_wait = Duration::from_millis(20);
                        for d in c.claimed {
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
                    Ok(c) => {
                        backoff = Duration::from_millis(200);
                        if let Some(slot) = c.slot_in {
                            wait = wait.min(slot);
                        } else if c.contended {
                            wait = wait.min(contended_wait);
                            contended_wait = (contended_wait * 2).min(self.cfg.poll_interval);
                        } else if let Ok(Some(due)) = self.next_due().await {
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
        // Calls in flight finish (each bounded by its timeout) and record their outcome.
        while tasks.join_next().await.is_some() {}
    }

    /// Claims up to `free` due deliveries, as many as the rate limit allows now, fairly:
    /// the first due delivery of each endpoint in turn (least recently served endpoint first),
    /// then the second of each, … — so a rule with a deep backlog behind a slow endpoint delays
    /// another endpoint's next delivery by at most one slot per endpoint with due work. An
    /// endpoint whose breaker is open is skipped (its due deliveries are parked as
    /// `circuit_open` instead, spending no slot); one whose cool-down is over gets one delivery,
    /// the trial.
    async fn claim(&self, free: usize, token: Uuid) -> Result<Claim, sqlx::Error> {
        self.park_short_circuited().await?;
        let mut tx = self.pool.begin().await?;
        let slots = rate_limit::available(&mut tx, self.cfg.rate_limit, free).await?;
        if slots.free == 0 {
            tx.rollback().await?;
            return Ok(Claim {
                claimed: Vec::new(),
                slot_in: Some(slots.next_in),
                contended: false,
            });
        }
        let n = slots.free as i64;
        // Twice as many candidates as slots: another instance may hold some of them.
        let candidates: Vec<Uuid> = sqlx::query_scalar(
            "WITH RECURSIVE eps AS (
                 (SELECT endpoint FROM actions.deliveries
                  WHERE status IN ('pending', 'delivering') ORDER BY endpoint LIMIT 1)
                 UNION ALL
                 SELECT (SELECT d.endpoint FROM actions.deliveries d
                         WHERE d.status IN ('pending', 'delivering') AND d.endpoint > eps.endpoint
                         ORDER BY d.endpoint LIMIT 1)
                 FROM eps WHERE eps.endpoint IS NOT NULL)
             SELECT c.delivery_id
             FROM eps
             LEFT JOIN actions.endpoint_health h ON h.endpoint = eps.endpoint
             CROSS JOIN LATERAL (
                 SELECT d.delivery_id,
                        row_number() OVER (ORDER BY d.next_attempt_at, d.delivery_id) AS rn
                 FROM actions.deliveries d
                 WHERE d.endpoint = eps.endpoint AND d.status IN ('pending', 'delivering')
                   AND d.next_attempt_at <= now()
                 ORDER BY d.next_attempt_at, d.delivery_id
                 LIMIT CASE WHEN h.state IS NULL OR h.state = 'closed' THEN $1 * 2 ELSE 1 END) c
             WHERE eps.endpoint IS NOT NULL
               AND (h.state IS NULL OR h.state = 'closed' OR h.open_until <= now())
             ORDER BY c.rn, h.served_at NULLS FIRST, eps.endpoint
             LIMIT $1 * 2",
        )
        .bind(n)
        .fetch_all(&mut *tx)
        .await?;
        if candidates.is_empty() {
            tx.rollback().await?;
            return Ok(Claim {
                claimed: Vec::new(),
                slot_in: None,
                contended: false,
            });
        }
        let claimed: Vec<Claimed> = sqlx::query_as(
            "WITH c AS (
                 SELECT delivery_id, ord FROM unnest($1::uuid[]) WITH ORDINALITY AS t(delivery_id, ord)),
             picked AS (
                 SELECT d.delivery_id FROM actions.deliveries d JOIN c USING (delivery_id)
                 WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= now()
                 ORDER BY c.ord
                 LIMIT $2
                 FOR UPDATE OF d SKIP LOCKED)
             UPDATE actions.deliveries d
             SET status = 'delivering', claim_token = $3, updated_at = now(),
                 next_attempt_at = now() + make_interval(secs => $4)
             FROM picked WHERE d.delivery_id = picked.delivery_id
             RETURNING d.delivery_id, d.rule_id, d.event_type, d.aggregate_id, d.event_at,
                       d.endpoint, d.body, d.traceparent, d.attempts, d.round_start",
        )
        .bind(&candidates)
        .bind(n)
        .bind(token)
        .bind(self.cfg.claim_timeout.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        rate_limit::spend(&mut tx, self.cfg.rate_limit, claimed.len()).await?;
        tx.commit().await?;
        if !claimed.is_empty() {
            // After the claim's commit, not in it: a turn recorded late costs at most one
            // slot of fairness, a lock held across both tables could deadlock with a recording.
            let endpoints: Vec<&str> = claimed.iter().map(|c| c.endpoint.as_str()).collect();
            sqlx::query(
                "INSERT INTO actions.endpoint_health (endpoint, served_at)
                 SELECT DISTINCT e, now() FROM unnest($1::text[]) AS e
                 ON CONFLICT (endpoint) DO UPDATE SET served_at = now()",
            )
            .bind(&endpoints)
            .execute(&self.pool)
            .await?;
        }
        Ok(Claim {
            contended: claimed.is_empty(),
            claimed,
            slot_in: None,
        })
    }

    /// Due deliveries of endpoints whose breaker is open (or whose trial is in flight) become
    /// `circuit_open` without a call and without a slot; they are sent again when the breaker
    /// closes (`breaker::succeeded`). (`cj_webhook_deliveries_total{status="circuit_open"}`
    /// therefore counts parkings: a delivery parked twice counts twice.)
    async fn park_short_circuited(&self) -> Result<(), sqlx::Error> {
        let r = sqlx::query(
            "UPDATE actions.deliveries d
             SET status = 'circuit_open', claim_token = NULL, updated_at = now(),
                 last_error = 'short-circuited: the endpoint''s breaker is open until '
                              || to_char(p.open_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                              || '; sent again when it closes'
             FROM (SELECT x.delivery_id, h.open_until
                   FROM actions.endpoint_health h
                   CROSS JOIN LATERAL (
                       SELECT delivery_id FROM actions.deliveries
                       WHERE endpoint = h.endpoint AND status IN ('pending', 'delivering')
                         AND next_attempt_at <= now()
                       ORDER BY endpoint, next_attempt_at, delivery_id
                       LIMIT $1
                       FOR UPDATE SKIP LOCKED) x
                   WHERE h.state <> 'closed' AND h.open_until > now()) p
             WHERE d.delivery_id = p.delivery_id",
        )
        .bind(PARK_SLICE)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() > 0 {
            metrics::counter!("cj_webhook_deliveries_total", "status" => DeliveryStatus::CircuitOpen.as_str())
                .increment(r.rows_affected());
        }
        // An endpoint whose cool-down is over but which has nothing due would never get its
        // trial, and what it parked would wait for new traffic: its oldest parked delivery
        // goes back to pending to be the trial.
        sqlx::query(
            "UPDATE actions.deliveries
             SET status = 'pending', next_attempt_at = now(), updated_at = now(),
                 last_error = 'the trial call after the breaker''s cool-down'
             WHERE delivery_id IN (
                 SELECT (SELECT x.delivery_id FROM actions.deliveries x
                         WHERE x.endpoint = h.endpoint AND x.status = 'circuit_open'
                         ORDER BY x.endpoint, x.delivery_id LIMIT 1)
                 FROM actions.endpoint_health h
                 WHERE h.state <> 'closed' AND h.open_until <= now()
                   AND NOT EXISTS (
                       SELECT 1 FROM actions.deliveries p
                       WHERE p.endpoint = h.endpoint AND p.status IN ('pending', 'delivering')))",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
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
