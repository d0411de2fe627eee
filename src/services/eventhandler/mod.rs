//! Event handler (health on port 8084): the consumer group that builds the read models
//! (projections) and keeps the dead-letter queue. Owns the `eventhandler` schema.

mod consumer;
pub mod handlers;
pub mod rebuild;
pub mod retention;
pub mod store;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

use super::{Ready, ServiceContext, migrate_when_reachable};
use crate::infra::bus::{self, ConsumerState};
use crate::infra::consume::{self, Blocked};
use crate::infra::db;
use crate::infra::http::{Check, HealthBoard, health_response, metrics_router, not_found, serve};

#[derive(Clone)]
struct HealthState {
    pool: sqlx::PgPool,
    ready: Ready,
    group: String,
    consumer: Arc<tokio::sync::OnceCell<Arc<ConsumerState>>>,
    blocked: Arc<Blocked>,
    board: HealthBoard,
    port: u16,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let ServiceContext {
        config,
        db: pool,
        listener,
        shutdown,
        board,
        clock,
        ..
    } = ctx;
    let cfg = config.eventhandler.clone();
    let state = HealthState {
        pool: pool.clone(),
        ready: Ready::default(),
        group: cfg.consumer_group.clone(),
        consumer: Arc::new(tokio::sync::OnceCell::new()),
        blocked: Arc::new(Blocked::default()),
        board: board.clone(),
        port: config.ports.eventhandler_health,
    };
    let http = match listener {
        Some(listener) => {
            let router = Router::new()
                .route("/health", get(health))
                .merge(metrics_router())
                .fallback(not_found)
                .with_state(state.clone());
            tokio::spawn(serve(
                "eventhandler",
                listener,
                router,
                shutdown.clone(),
                config.shutdown_timeout,
            ))
        }
        None => {
            // The tsdb-writer of this process serves the shared port: report there.
            let s = state.clone();
            board.register(state.port, "eventhandler", move || {
                let s = s.clone();
                async move { Check::combine(checks(&s).await) }
            });
            tokio::spawn(async { anyhow::Ok(()) })
        }
    };

    let url = config.database_url("eventhandler").to_string();
    // Setup waits on the database and the broker; a shutdown must be able to interrupt it.
    let setup = async {
        if !migrate_when_reachable(&url, &db::EVENTHANDLER, &shutdown).await? {
            return Ok(None);
        }
        state.ready.set();
        if config.retention.enabled {
            tokio::spawn(retention::run(
                pool.clone(),
                clock.clone(),
                config.retention.projections,
                config.retention.interval,
                shutdown.clone(),
            ));
        }
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
        consume::Worker {
            sink: consumer::Projections::new(pool.clone()),
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
    let mut all = checks(&s).await;
    all.extend(s.board.checks(s.port).await);
    health_response(all)
}
