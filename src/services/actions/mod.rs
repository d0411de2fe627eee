//! Action orchestrator (API on 8082, health and metrics on 8083; SPEC §10): rules, the consumer
//! group that records a delivery per matching (event, rule), and the worker that sends them as
//! signed webhooks. Owns the `actions` schema.

mod api;
pub mod condition;
mod deliver;
mod error;
mod record;
mod recover;
mod retention;
pub mod rules;
mod status;

crate::service_migrations!("actions", "migrations/actions");

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;

pub use api::ROUTES;
pub use recover::recover;

/// Rules and deliveries are administration: every method needs the scope.
pub const SCOPES: &[ScopeRule] = &[ScopeRule {
    prefix: "/api/v1/actions",
    methods: &[],
    scope: SCOPE_ACTIONS,
}];

use super::ServiceContext;
use super::scaffold::{self, ConsumerHealth, ConsumerService, Spec, Started};
use crate::config::ActionsConfig;
use crate::infra::auth::{SCOPE_ACTIONS, ScopeRule};
use crate::infra::extract::method_not_allowed;
use crate::infra::http::{Check, Status, not_found};

#[derive(Clone)]
struct ApiState {
    pool: PgPool,
    wake: Arc<Notify>,
    clock: Arc<dyn crate::envelope::Clock>,
}

pub async fn run(ctx: ServiceContext<ActionsConfig>) -> anyhow::Result<()> {
    let cfg = ctx.config.clone();
    let wake = Arc::new(Notify::new());
    let api_state = ApiState {
        pool: ctx.db.clone(),
        wake: wake.clone(),
        clock: ctx.clock.clone(),
    };
    let limit = crate::infra::http::ClientLimit::new(
        ctx.common.api_limit.per_second,
        ctx.common.api_limit.burst,
        &ctx.common.api_limit.trusted_proxies,
        &ctx.jobs,
    );
    let api = Router::new()
        .merge(crate::infra::http::limited(
            api::router().method_not_allowed_fallback(method_not_allowed),
            limit,
        ))
        .fallback(not_found)
        .with_state(api_state)
        .layer(DefaultBodyLimit::max(api::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            crate::infra::auth::middleware,
        ));
    let spec = Spec {
        service: super::Service::Actions,
        dead_letters: owner(&ctx.config, ctx.db.clone(), wake.clone()),
        group: cfg.consumer_group.clone(),
        topics: cfg.topics.clone(),
        retry_delays: cfg.consumer_retry_delays.clone(),
        max_batch: 500,
    };
    scaffold::run(ctx, spec, Orchestrator { cfg, wake }, Some(api)).await
}

/// The orchestrator's dead letters, replayed through its recorder (a replayed event records its
/// deliveries as it would have live). `wake` is the delivery worker's, when there is one.
pub fn dead_letters(config: &ActionsConfig, pool: PgPool) -> crate::infra::dlq::Owner {
    owner(config, pool, Arc::new(Notify::new()))
}

fn owner(config: &ActionsConfig, pool: PgPool, wake: Arc<Notify>) -> crate::infra::dlq::Owner {
    crate::infra::dlq::Owner {
        name: "actions",
        table: "actions.dlq",
        replay: crate::infra::dlq::Replay::InProcess(Arc::new(record::Recorder {
            pool: pool.clone(),
            default_dedup: config.dedup_window,
            wake,
        })),
        pool,
    }
}

struct Orchestrator {
    cfg: ActionsConfig,
    /// Wakes the delivery worker when a delivery was recorded or re-queued.
    wake: Arc<Notify>,
}

impl ConsumerService for Orchestrator {
    type Sink = record::Recorder;

    async fn start(&self, ctx: &Started) -> anyhow::Result<record::Recorder> {
        let deliverer = Arc::new(deliver::Deliverer::new(
            ctx.pool.clone(),
            self.cfg.clone(),
            self.wake.clone(),
            ctx.clock.clone(),
            ctx.common.shutdown_timeout,
        )?);
        // Deliveries recorded before a restart are sent whether or not the bus is up.
        ctx.jobs.spawn(deliverer.run(ctx.jobs.shutdown.clone()));
        ctx.spawn_retention(ctx.common.retention.deliveries, retention::run);
        Ok(record::Recorder {
            pool: ctx.pool.clone(),
            default_dedup: self.cfg.dedup_window,
            wake: self.wake.clone(),
        })
    }

    async fn checks(&self, s: &ConsumerHealth) -> Vec<(&'static str, Check)> {
        let mut checks = Vec::new();
        if !s.ready.get() {
            return checks;
        }
        // Due deliveries, the oldest one's age, and how long since any delivery moved (an
        // attempt, or one reaching a final state): all index-backed.
        let backlog: Result<(i64, Option<f64>, Option<f64>), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(next_attempt_at))::float8,
                    extract(epoch FROM now() - greatest(
                        (SELECT max(started_at) FROM actions.attempts),
                        (SELECT max(updated_at) FROM actions.deliveries
                         WHERE status NOT IN ('pending', 'delivering'))))::float8
             FROM actions.deliveries
             WHERE status IN ('pending', 'delivering') AND next_attempt_at <= now()",
        )
        .fetch_one(&s.pool)
        .await;
        if let Ok((due, oldest, since_moved)) = backlog {
            metrics::gauge!("cj_webhook_deliveries_due").set(due as f64);
            // A legitimate rate limit moves one delivery per interval: a stall is longer.
            let stall = self.cfg.stall_after.max(
                self.cfg
                    .rate_limit
                    .map_or(Duration::ZERO, |(n, period)| period / n * 3),
            );
            let stalled = due > 0
                && oldest.is_some_and(|o| o > stall.as_secs_f64())
                && since_moved.is_none_or(|m| m > stall.as_secs_f64());
            let mut detail =
                json!({ "due": due, "oldest_due_s": oldest, "last_moved_s_ago": since_moved });
            if stalled {
                detail["error"] = json!(format!(
                    "deliveries have been due for over {stall:?} and none moved: no worker is claiming them"
                ));
            }
            checks.push((
                "deliveries",
                Check::new(
                    if stalled {
                        Status::Degraded
                    } else {
                        Status::Healthy
                    },
                    detail,
                ),
            ));
        }
        let open: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT count(*) FROM actions.endpoint_health WHERE state <> 'closed'",
        )
        .fetch_one(&s.pool)
        .await;
        if let Ok(open) = open {
            metrics::gauge!("cj_webhook_endpoints_not_closed").set(open as f64);
        }
        checks
    }
}
