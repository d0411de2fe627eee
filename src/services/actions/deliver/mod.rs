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
//!
//! One file per concern: `worker` (the claim loop and a delivery's course), `send` (the HTTP
//! call and what its answer means), `settle` (recording each attempt and where a delivery
//! ended), `breaker`, `rate_limit`, `egress` (which addresses a webhook may reach), `redact`
//! (what of an answer is kept) and `signing`.

mod breaker;
mod egress;
mod rate_limit;
mod redact;
mod send;
mod settle;
mod signing;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::ActionsConfig;
use crate::envelope::Clock;

/// A claimed delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Claimed {
    delivery_id: Uuid,
    rule_id: Uuid,
    event_type: String,
    aggregate_id: String,
    event_at: DateTime<Utc>,
    /// The webhook URL it was recorded (or last attempted) for: the breaker's and the fair
    /// share's key.
    endpoint: String,
    body: String,
    traceparent: Option<String>,
    attempts: i32,
    /// Where the current retry schedule began (recovery and manual retries restart it).
    round_start: i32,
}

pub(super) struct Deliverer {
    pool: PgPool,
    cfg: ActionsConfig,
    wake: Arc<Notify>,
    /// Dates the signatures (`webhook-timestamp`).
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    /// The longest a call may take: within the shutdown drain, so a stop never cuts a call
    /// whose 2xx would then go unrecorded.
    max_timeout: Duration,
}

impl Deliverer {
    pub(super) fn new(
        pool: PgPool,
        cfg: ActionsConfig,
        wake: Arc<Notify>,
        clock: Arc<dyn Clock>,
        drain: Duration,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder()
            // Only the configured proxy, never one from the environment (see CJ_ACTIONS_PROXY).
            .no_proxy()
            // A webhook answer is the receiver's; following redirects would send signed
            // payloads somewhere the rule does not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cornjacket-webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if !cfg.allow_private_targets {
            http = http.dns_resolver(Arc::new(egress::PublicOnly));
        }
        if let Some(proxy) = &cfg.proxy {
            // Through a proxy the proxy resolves the host: the egress filter still refuses IP
            // literals, and the proxy's own policy has to refuse internal names.
            http = http.proxy(reqwest::Proxy::all(proxy)?);
        }
        Ok(Self {
            pool,
            wake,
            clock,
            http: http.build()?,
            max_timeout: (drain * 3 / 4).max(Duration::from_secs(1)),
            cfg,
        })
    }
}
