//! Event handler (health on port 8084): the consumer group that builds the read models
//! (projections) and keeps the dead-letter queue. Owns the `eventhandler` schema.

mod consumer;
pub mod handlers;
pub mod rebuild;
pub mod store;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use serde_json::json;

use super::{Ready, ServiceContext, migrate_when_reachable};
use crate::infra::bus::{self, ConsumerState};
use crate::infra::db;
use crate::infra::http::{Check, Status, health_response, metrics_router, not_found, serve};

pub use consumer::Blocked;

#[derive(Clone)]
struct HealthState {
    pool: sqlx::PgPool,
    ready: Ready,
    group: String,
    consumer: Arc<tokio::sync::OnceCell<Arc<ConsumerState>>>,
    blocked: Arc<Blocked>,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let ServiceContext {
        config,
        db: pool,
        listener,
        shutdown,
        ..
    } = ctx;
    let cfg = config.eventhandler.clone();
    let state = HealthState {
        pool: pool.clone(),
        ready: Ready::default(),
        group: cfg.consumer_group.clone(),
        consumer: Arc::new(tokio::sync::OnceCell::new()),
        blocked: Arc::new(Blocked::default()),
    };
    let router = Router::new()
        .route("/health", get(health))
        .merge(metrics_router())
        .fallback(not_found)
        .with_state(state.clone());
    let http = tokio::spawn(serve(
        "eventhandler",
        listener,
        router,
        shutdown.clone(),
        config.shutdown_timeout,
    ));

    let url = config.database_url("eventhandler").to_string();
    // Setup waits on the database and the broker; a shutdown must be able to interrupt it.
    let setup = async {
        if !migrate_when_reachable(&url, &db::EVENTHANDLER, &shutdown).await? {
            return Ok(None);
        }
        state.ready.set();
        // Consumers subscribe to topics that may not exist yet on a fresh broker.
        if let Err(e) = bus::ensure_topics(&config.kafka, &config.kafka.topics.all()).await {
            tracing::warn!(error = %e, "Could not ensure topics; subscribing anyway.");
        }
        let (consumer, observed) =
            bus::consumer(&config.kafka, &cfg.consumer_group, &cfg.topics).await?;
        let _ = state.consumer.set(observed);
        anyhow::Ok(Some(consumer))
    };
    let work = async {
        let consumer = tokio::select! {
            c = setup => c?,
            _ = shutdown.cancelled() => None,
        };
        let Some(consumer) = consumer else {
            return Ok(());
        };
        tracing::info!(group = %cfg.consumer_group, topics = ?cfg.topics, "Event handler consuming.");
        consumer::Worker::new(
            pool.clone(),
            consumer,
            cfg.consumer_group.clone(),
            cfg.retry_delays.clone(),
            cfg.max_batch,
            state.blocked.clone(),
        )
        .run(shutdown.clone())
        .await;
        anyhow::Ok(())
    };
    let result = work.await;
    if result.is_err() {
        shutdown.cancel();
    }
    let served = http.await?;
    result.and(served)
}

async fn health(State(s): State<HealthState>) -> Response {
    let mut checks = vec![("database", Check::from_ping(db::ping(&s.pool).await))];
    if let Some(reason) = s.blocked.0.lock().expect("blocked lock").clone() {
        checks.push((
            "processing",
            Check::new(Status::Unhealthy, json!({ "blocked": reason })),
        ));
    }
    let consumer = match (s.ready.get(), s.consumer.get()) {
        (false, _) => Check::new(
            Status::Unhealthy,
            json!({ "error": "migrations not applied yet: waiting for the database" }),
        ),
        (true, None) => Check::new(
            Status::Degraded,
            json!({ "group": s.group, "state": "starting" }),
        ),
        (true, Some(c)) => {
            let assigned = c.assigned_count();
            let status = if assigned == 0 {
                Status::Degraded
            } else {
                Status::Healthy
            };
            Check::new(
                status,
                json!({
                    "group": s.group,
                    "assigned_partitions": assigned,
                    "lag": c.total_lag(),
                    "last_error": c.last_error.lock().expect("error lock").clone(),
                }),
            )
        }
    };
    checks.push(("consumer", consumer));
    health_response(checks)
}
