//! Action orchestrator (API on 8082, health and metrics on 8083; SPEC §10): rules, the consumer
//! group that records a delivery per matching (event, rule), and the worker that sends them as
//! signed webhooks. Owns the `actions` schema.

mod api;
pub mod condition;
mod deliver;
mod error;
mod record;
mod retention;
pub mod rules;
mod status;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

pub use api::ROUTES;

use super::{ConsumerHealth, ServiceContext};
use crate::infra::clock_guard::ClockGuard;
use crate::infra::consume;
use crate::infra::db;
use crate::infra::extract::method_not_allowed;
use crate::infra::http::{Check, Status, health_response, metrics_router, not_found, serve};

#[derive(Clone)]
struct ApiState {
    pool: PgPool,
    wake: Arc<Notify>,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let ServiceContext {
        config,
        db: pool,
        listener,
        health_listener,
        shutdown,
        auth,
        clock,
        ..
    } = ctx;
    let listener = listener.context("the action API needs its own port")?;
    let health_listener = health_listener.context("the action orchestrator needs a health port")?;
    let cfg = config.actions.clone();
    let wake = Arc::new(Notify::new());
    let api_state = ApiState {
        pool: pool.clone(),
        wake: wake.clone(),
    };
    let health_state = ConsumerHealth::new(pool.clone(), &cfg.consumer_group);
    let limit = crate::infra::http::ClientLimit::new(
        config.api_limit.per_second,
        config.api_limit.burst,
        shutdown.clone(),
    );
    let api_router = Router::new()
        .merge(crate::infra::http::limited(
            api::router().method_not_allowed_fallback(method_not_allowed),
            limit,
        ))
        .fallback(not_found)
        .with_state(api_state)
        .layer(DefaultBodyLimit::max(api::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::infra::auth::middleware,
        ));
    let health_router = Router::new()
        .route("/health", get(health))
        .merge(metrics_router())
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(health_state.clone());
    let tracker = TaskTracker::new();
    let drain = config.shutdown_timeout;
    let api_http = tokio::spawn(serve(
        "actions",
        listener,
        api_router,
        shutdown.clone(),
        config.http,
        drain,
    ));
    let health_http = tokio::spawn(serve(
        "actions-health",
        health_listener,
        health_router,
        shutdown.clone(),
        config.http,
        drain,
    ));

    let setup = async {
        if !health_state
            .migrate(&config, &db::ACTIONS, &shutdown)
            .await?
        {
            return Ok(None);
        }
        let deliverer = Arc::new(deliver::Deliverer::new(
            pool.clone(),
            cfg.clone(),
            wake.clone(),
            clock.clone(),
            config.shutdown_timeout,
        )?);
        // Deliveries recorded before a restart are sent whether or not the bus is up.
        tracker.spawn(deliverer.run(shutdown.clone()));
        if config.retention.enabled {
            let guard = ClockGuard {
                job: "actions",
                clock: clock.clone(),
                max_skew: config.retention.max_clock_skew,
                state: health_state.retention.clone(),
            };
            tracker.spawn(retention::run(
                pool.clone(),
                guard,
                config.retention.deliveries,
                config.retention.interval,
                shutdown.clone(),
            ));
        }
        health_state.subscribe(&config, &cfg.topics).await.map(Some)
    };
    let work = async {
        let consumer = tokio::select! {
            c = setup => c?,
            _ = shutdown.cancelled() => None,
        };
        let Some(consumer) = consumer else {
            return Ok(());
        };
        consume::Worker {
            sink: record::Recorder {
                pool: pool.clone(),
                default_dedup: cfg.dedup_window,
                wake: wake.clone(),
            },
            consumer,
            group: cfg.consumer_group.clone(),
            retry_delays: cfg.consumer_retry_delays.clone(),
            max_batch: 500,
            blocked: health_state.blocked.clone(),
        }
        .run(shutdown.clone())
        .await;
        anyhow::Ok(())
    };
    let result = work.await;
    if result.is_err() {
        shutdown.cancel();
    }
    tracker.close();
    tracker.wait().await;
    let api_served = api_http.await?;
    let health_served = health_http.await?;
    result.and(api_served).and(health_served)
}

async fn health(State(s): State<ConsumerHealth>) -> Response {
    let mut checks = s.checks().await;
    if s.ready.get() {
        let backlog: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(next_attempt_at))::float8
             FROM actions.deliveries
             WHERE status IN ('pending', 'delivering') AND next_attempt_at <= now()",
        )
        .fetch_one(&s.pool)
        .await;
        if let Ok((due, oldest)) = backlog {
            metrics::gauge!("cj_webhook_deliveries_due").set(due as f64);
            checks.push((
                "deliveries",
                Check::new(
                    Status::Healthy,
                    json!({ "due": due, "oldest_due_s": oldest }),
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
    }
    health_response(checks)
}
