//! The delivery worker (SPEC §10, seed §7, ADR-0004): claims due deliveries (`SKIP LOCKED`, so
//! instances share the work), signs them per Standard Webhooks, sends them under a global rate
//! limit and a circuit breaker per endpoint, and drives each to a final state.
//!
//! Everything that must survive a restart or be shared by instances is a row: a delivery's
//! schedule (`next_attempt_at`, `attempts`), its claim, the breakers and the rate limit. The retry
//! schedule is therefore a list of persisted delays rather than an in-process retry loop
//! (`backon` and the like retry inside one process, which is what a restart must not lose), and
//! the rate limit is a GCRA token bucket kept in one row (`actions.rate_limit`) rather than an
//! in-process `governor` bucket, so it is global across instances and restarts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::rules::{self, Rule};
use crate::config::ActionsConfig;
use crate::infra::{db, telemetry};

/// A claimed delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Claimed {
    delivery_id: Uuid,
    rule_id: Uuid,
    event_type: String,
    aggregate_id: String,
    event_at: DateTime<Utc>,
    body: String,
    traceparent: Option<String>,
    attempts: i32,
}

/// How much of a receiver's error answer is kept (and read at all): enough to diagnose, never
/// a whole body.
const ERROR_BODY_BYTES: usize = 1024;

/// The Standard Webhooks signature of one message: `v1,` + base64(HMAC-SHA256(key,
/// "{id}.{timestamp}.{body}")).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The `traceparent` of the webhook call: the event's trace continued with a new span id (W3C
/// Trace Context), or a new trace when the event carried none.
pub fn child_traceparent(parent: Option<&str>) -> String {
    let span: u64 = rand::random::<u64>() | 1;
    if let Some(p) = parent {
        let parts: Vec<&str> = p.split('-').collect();
        if parts.len() == 4
            && parts[0].len() == 2
            && parts[1].len() == 32
            && parts[1].chars().all(|c| c.is_ascii_hexdigit())
            && parts[3].len() == 2
        {
            return format!("{}-{}-{span:016x}-{}", parts[0], parts[1], parts[3]);
        }
    }
    let trace: u128 = rand::random::<u128>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

enum Gate {
    /// Call normally.
    Closed,
    /// The one trial call after a cool-down.
    Trial,
    /// Short-circuit, with the reason.
    Open(String),
}

enum Outcome {
    Success(u16),
    Failure { status: Option<u16>, error: String },
}

/// Whether an address is one a webhook may reach when private targets are not allowed: not
/// loopback, private, link-local (cloud metadata), shared, unspecified or multicast.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

/// Resolves webhook hosts and drops private addresses, so a rule can neither name an internal
/// service nor reach one through a DNS name that resolves to it (the check is on the addresses
/// actually connected to).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (private targets are refused; \
                     CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true allows them)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub struct Deliverer {
    pub pool: PgPool,
    pub cfg: ActionsConfig,
    pub wake: Arc<Notify>,
    http: reqwest::Client,
    /// The longest a call may take: within the shutdown drain, so a stop never cuts a call
    /// whose 2xx would then go unrecorded.
    max_timeout: Duration,
}

impl Deliverer {
    pub fn new(
        pool: PgPool,
        cfg: ActionsConfig,
        wake: Arc<Notify>,
        drain: Duration,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder()
            // A webhook answer is the receiver's; following redirects would send signed
            // payloads somewhere the rule does not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cornjacket-webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if !cfg.allow_private_targets {
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Self {
            pool,
            wake,
            http: http.build()?,
            max_timeout: (drain * 3 / 4).max(Duration::from_secs(1)),
            cfg,
        })
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
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
            self.finish(d, token, "cancelled", "the rule was deleted")
                .await?;
            return Ok(None);
        };
        if !rule.enabled {
            self.finish(d, token, "cancelled", "the rule is disabled")
                .await?;
            return Ok(None);
        }
        // The slot first, then the breaker: its verdict must be the current one when the call
        // goes, and a trial must not wait in the queue while others are short-circuited.
        if let Some(at) = self.reserve_slot().await? {
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
        let trial = match self.gate(&endpoint, timeout).await? {
            Gate::Open(reason) => {
                self.finish(d, token, "circuit_open", &reason).await?;
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
                self.reopen_trial(&endpoint).await?;
            }
            return Ok(None);
        }
        let outcome = self.send(&rule, d, timeout).await;
        Ok(Some((endpoint, trial, outcome)))
    }

    /// Reserves the next send slot of the global bucket (GCRA: one slot per `period / n`, `n`
    /// at once); returns when the call may go, or `None` without a limit.
    async fn reserve_slot(&self) -> Result<Option<Instant>, sqlx::Error> {
        let Some((n, period)) = self.cfg.rate_limit else {
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
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(Instant::now() + Duration::from_secs_f64(wait)))
    }

    async fn send(&self, rule: &Rule, d: &Claimed, timeout: Duration) -> Outcome {
        let id = d.delivery_id.to_string();
        let ts = chrono::Utc::now().timestamp();
        let Some(key) = rules::secret_key(&rule.webhook_secret) else {
            return Outcome::Failure {
                status: None,
                error: "the rule's secret is not a valid whsec_ secret".into(),
            };
        };
        if !self.cfg.allow_private_targets
            // An IP literal is connected to without resolving: check it here.
            && let Ok(url) = reqwest::Url::parse(&rule.webhook_url)
            && let Some(ip) = url
                .host_str()
                .and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
            && !is_public(ip)
        {
            metrics::counter!("cj_webhook_attempts_total", "outcome" => "refused").increment(1);
            return Outcome::Failure {
                status: None,
                error: format!(
                    "{ip} is not a public address (private targets are refused; \
                     CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true allows them)"
                ),
            };
        }
        let span = telemetry::event_span("webhook.send", d.traceparent.as_deref(), &id);
        let traceparent = telemetry::traceparent_of(&span)
            .unwrap_or_else(|| child_traceparent(d.traceparent.as_deref()));
        let mut req = self
            .http
            .post(&rule.webhook_url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign(&key, &id, ts, d.body.as_bytes()))
            .header("traceparent", traceparent);
        for (k, v) in rule.headers() {
            req = req.header(k, v);
        }
        let started = Instant::now();
        let result = req.body(d.body.clone()).send().instrument(span).await;
        metrics::histogram!("cj_webhook_duration_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "success").increment(1);
                Outcome::Success(r.status().as_u16())
            }
            Ok(mut r) => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "http_error")
                    .increment(1);
                let status = r.status().as_u16();
                // Read at most a little of the answer: a receiver cannot make us buffer more.
                let mut body = Vec::new();
                while body.len() < ERROR_BODY_BYTES {
                    match r.chunk().await {
                        Ok(Some(c)) => body.extend_from_slice(&c),
                        _ => break,
                    }
                }
                body.truncate(ERROR_BODY_BYTES);
                let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                Outcome::Failure {
                    status: Some(status),
                    error: format!("HTTP {status}: {snippet}"),
                }
            }
            Err(e) if e.is_timeout() => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "timeout").increment(1);
                Outcome::Failure {
                    status: None,
                    error: format!("no answer within {timeout:?}"),
                }
            }
            Err(e) => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "connect_error")
                    .increment(1);
                // Without the URL: some carry their credentials in the path.
                let e = e.without_url();
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                Outcome::Failure {
                    status: None,
                    error: msg,
                }
            }
        }
    }

    /// The breaker's verdict for an endpoint; takes the trial slot when the cool-down is over,
    /// with a deadline of the call's timeout and the claim timeout, after which a trial whose
    /// worker vanished is taken over.
    async fn gate(&self, endpoint: &str, timeout: Duration) -> Result<Gate, sqlx::Error> {
        let row: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT state, open_until FROM actions.endpoint_health WHERE endpoint = $1",
        )
        .bind(endpoint)
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, until)) = row else {
            return Ok(Gate::Closed);
        };
        if state == "closed" {
            return Ok(Gate::Closed);
        }
        let took = sqlx::query(
            "UPDATE actions.endpoint_health
             SET state = 'half_open', updated_at = now(),
                 open_until = now() + make_interval(secs => $2)
             WHERE endpoint = $1 AND state IN ('open', 'half_open') AND open_until <= now()",
        )
        .bind(endpoint)
        .bind((timeout + self.cfg.claim_timeout).as_secs_f64())
        .execute(&self.pool)
        .await?;
        if took.rows_affected() == 1 {
            return Ok(Gate::Trial);
        }
        Ok(Gate::Open(match until {
            Some(t) if state == "open" => format!(
                "circuit open until {}: the endpoint failed repeatedly",
                crate::envelope::format_time(&t)
            ),
            _ => "circuit half-open: a trial call is in progress".to_string(),
        }))
    }

    /// A trial that never happened: let the next delivery take it at once.
    async fn reopen_trial(&self, endpoint: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE actions.endpoint_health SET state = 'open', open_until = now(), updated_at = now()
             WHERE endpoint = $1 AND state = 'half_open'",
        )
        .bind(endpoint)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Gives a claimed delivery back, due now (shutdown while waiting for its slot).
    async fn release(&self, d: &Claimed, token: Uuid) -> Result<(), sqlx::Error> {
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
    async fn finish(
        &self,
        d: &Claimed,
        token: Uuid,
        status: &'static str,
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
            metrics::counter!("cj_webhook_deliveries_total", "status" => status).increment(1);
        }
        Ok(())
    }

    /// Records an attempt's outcome and the endpoint's breaker in one transaction.
    async fn record(
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
                sqlx::query(
                    "INSERT INTO actions.endpoint_health AS h
                         (endpoint, state, consecutive_failures, last_success_at, updated_at)
                     VALUES ($1, 'closed', 0, now(), now())
                     ON CONFLICT (endpoint) DO UPDATE
                     SET state = 'closed', consecutive_failures = 0, open_until = NULL,
                         last_success_at = now(), updated_at = now()",
                )
                .bind(endpoint)
                .execute(&mut *tx)
                .await?;
                if trial {
                    tracing::info!(%endpoint, "Circuit closed: the trial call succeeded.");
                }
                (r.rows_affected() == 1).then_some("delivered")
            }
            Outcome::Failure { status, error } => {
                // attempts so far: 1 + retries used; retry_delays[k] is the wait before retry k+1.
                let retry = self.cfg.retry_delays.get(d.attempts as usize).copied();
                let (state, next) = match retry {
                    Some(delay) => ("pending", delay),
                    None => ("failed", Duration::ZERO),
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
                self.count_failure(&mut tx, endpoint, error, trial).await?;
                if state == "failed" {
                    self.promote_duplicate(&mut tx, d).await?;
                }
                (state == "failed").then_some("failed")
            }
        };
        tx.commit().await?;
        if let Some(s) = final_status {
            metrics::counter!("cj_webhook_deliveries_total", "status" => s).increment(1);
        }
        Ok(())
    }

    /// One more consecutive failure for the endpoint; opens its breaker at the threshold, or
    /// again after a failed trial.
    async fn count_failure(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        endpoint: &str,
        error: &str,
        trial: bool,
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
        .bind(self.cfg.breaker_threshold as i32)
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
            .bind(self.cfg.breaker_cooldown.as_secs_f64())
            .execute(&mut **tx)
            .await?;
            metrics::counter!("cj_webhook_breaker_opened_total").increment(1);
            tracing::warn!(%endpoint, cooldown = ?self.cfg.breaker_cooldown, error = %error,
                "Circuit opened: calls to this endpoint are short-circuited until the cool-down ends.");
        }
        Ok(())
    }

    /// A delivery that failed for good hands its news on: the newest event it suppressed as a
    /// duplicate (same rule, type and aggregate, after it) is sent instead, so an outage of the
    /// receiver does not swallow the whole window.
    async fn promote_duplicate(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (and its reference libraries).
    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        let key = rules::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn traceparent_continues_the_events_trace() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_traceparent(Some(parent));
        assert!(child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        let fresh = child_traceparent(Some("garbage"));
        assert_eq!(fresh.len(), 55);
    }
}
