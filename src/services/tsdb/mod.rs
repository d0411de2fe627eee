//! tsdb-writer (SPEC §9): the consumer group that keeps sensor readings as typed time-series
//! rows in `tsdb.sensor_readings`. Owns the `tsdb` schema. Its health shares the event
//! handler's port (8084) when both run in one process, and uses that port alone otherwise.

mod retention;
mod sink;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

use super::{Ready, ServiceContext, migrate_when_reachable};
use crate::infra::bus::{self, ConsumerState};
use crate::infra::consume::{self, Blocked};
use crate::infra::db;
use crate::infra::http::{Check, health_response, metrics_router, not_found, serve};

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
        board,
        ..
    } = ctx;
    let cfg = config.tsdb.clone();
    let state = HealthState {
        pool: pool.clone(),
        ready: Ready::default(),
        group: cfg.consumer_group.clone(),
        consumer: Arc::new(tokio::sync::OnceCell::new()),
        blocked: Arc::new(Blocked::default()),
    };
    let http = match listener {
        Some(listener) => {
            let router = Router::new()
                .route("/health", get(health))
                .merge(metrics_router())
                .fallback(not_found)
                .with_state(state.clone());
            tokio::spawn(serve(
                "tsdb",
                listener,
                router,
                shutdown.clone(),
                config.shutdown_timeout,
            ))
        }
        None => {
            let s = state.clone();
            board.register(config.ports.eventhandler_health, "tsdb", move || {
                let s = s.clone();
                async move { Check::combine(checks(&s).await) }
            });
            tokio::spawn(async { anyhow::Ok(()) })
        }
    };

    let url = config.database_url("tsdb").to_string();
    let setup = async {
        if !migrate_when_reachable(&url, &db::TSDB, &shutdown).await? {
            return Ok(None);
        }
        state.ready.set();
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        if let Err(e) = bus::ensure_topics(&config.kafka, &topics).await {
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
        if config.retention.enabled {
            tokio::spawn(retention::run(
                pool.clone(),
                config.retention.timeseries,
                config.retention.interval,
                shutdown.clone(),
            ));
        }
        tracing::info!(group = %cfg.consumer_group, topics = ?cfg.topics, "tsdb-writer consuming.");
        consume::Worker {
            sink: sink::Readings { pool: pool.clone() },
            consumer,
            group: cfg.consumer_group.clone(),
            retry_delays: cfg.retry_delays.clone(),
            max_batch: cfg.max_batch,
            blocked: state.blocked.clone(),
        }
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

async fn checks(s: &HealthState) -> Vec<(&'static str, Check)> {
    let mut checks = vec![("database", Check::from_ping(db::ping(&s.pool).await))];
    checks.extend(consume::consumer_check(
        &s.group,
        s.ready.get(),
        s.consumer.get(),
        &s.blocked,
    ));
    checks
}

async fn health(State(s): State<HealthState>) -> Response {
    health_response(checks(&s).await)
}
