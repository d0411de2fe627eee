//! tsdb-writer (SPEC §9): the consumer group that keeps sensor readings as typed time-series
//! rows in `tsdb.sensor_readings`. Owns the `tsdb` schema. Its health shares the event
//! handler's port (8084) when both run in one process, and uses that port alone otherwise.

mod retention;
mod sink;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

use super::{ConsumerHealth, ServiceContext};
use crate::infra::clock_guard::ClockGuard;
use crate::infra::consume;
use crate::infra::db;
use crate::infra::http::{Check, health_response, metrics_router, not_found, serve};

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
    let cfg = config.tsdb.clone();
    let state = ConsumerHealth::new(pool.clone(), &cfg.consumer_group);
    let http = match listener {
        Some(listener) => {
            let router = Router::new()
                .route("/health", get(health))
                .merge(metrics_router())
                .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
                .fallback(not_found)
                .with_state(state.clone());
            tokio::spawn(serve(
                "tsdb",
                listener,
                router,
                shutdown.clone(),
                config.http,
                config.shutdown_timeout,
            ))
        }
        None => {
            let s = state.clone();
            board.register(config.ports.eventhandler_health, "tsdb", move || {
                let s = s.clone();
                async move { Check::combine(s.checks().await) }
            });
            tokio::spawn(async { anyhow::Ok(()) })
        }
    };

    // Setup waits on the database and the broker; a shutdown must be able to interrupt it.
    let setup = async {
        if !state.migrate(&config, &db::TSDB, &shutdown).await? {
            return Ok(None);
        }
        let keep = config
            .retention
            .enabled
            .then_some(config.retention.timeseries);
        let policy = retention::apply_policy(&pool, keep)
            .await
            .unwrap_or_else(|e| {
                // The job (correct on either kind of table) covers for the policy.
                tracing::warn!(error = %e, "Could not set the TimescaleDB retention policy.");
                false
            });
        if let (Some(keep), false) = (keep, policy) {
            let guard = ClockGuard {
                job: "tsdb",
                clock: clock.clone(),
                max_skew: config.retention.max_clock_skew,
                state: state.retention.clone(),
            };
            tokio::spawn(retention::run(
                pool.clone(),
                guard,
                keep,
                config.retention.interval,
                shutdown.clone(),
            ));
        }
        state.subscribe(&config, &cfg.topics).await.map(Some)
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

async fn health(State(s): State<ConsumerHealth>) -> Response {
    health_response(s.checks().await)
}
