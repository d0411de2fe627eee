//! Event handler (health on port 8084): the consumer group that builds the read models
//! (projections) and keeps the dead-letter queue. Owns the `eventhandler` schema.

mod consumer;
pub mod handlers;
pub mod rebuild;
pub mod retention;
pub mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

use super::{ConsumerHealth, ServiceContext};
use crate::infra::clock_guard::ClockGuard;
use crate::infra::consume;
use crate::infra::db;
use crate::infra::http::{Check, HealthBoard, health_response, metrics_router, not_found, serve};

#[derive(Clone)]
struct HealthState {
    consumer: ConsumerHealth,
    board: HealthBoard,
    port: u16,
    /// `(consumer, status)` label sets of `cj_dlq_entries` exported so far.
    dlq_labels: Arc<Mutex<HashSet<(String, String)>>>,
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
    // The own group's entries are exported (at 0) from the start.
    let dlq_labels = ["pending", "replayed", "discarded"]
        .map(|s| (cfg.consumer_group.clone(), s.to_string()))
        .into_iter()
        .collect();
    let state = HealthState {
        consumer: ConsumerHealth::new(pool.clone(), &cfg.consumer_group),
        board: board.clone(),
        port: config.ports.eventhandler_health,
        dlq_labels: Arc::new(Mutex::new(dlq_labels)),
    };
    let http = match listener {
        Some(listener) => {
            let router = Router::new()
                .route("/health", get(health))
                .merge(
                    metrics_router().route_layer(axum::middleware::from_fn_with_state(
                        state.clone(),
                        sample_gauges,
                    )),
                )
                .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
                .fallback(not_found)
                .with_state(state.clone());
            tokio::spawn(serve(
                "eventhandler",
                listener,
                router,
                shutdown.clone(),
                config.http,
                config.shutdown_timeout,
            ))
        }
        None => {
            // The tsdb-writer of this process serves the shared port: report there.
            let s = state.clone();
            board.register(state.port, "eventhandler", move || {
                let s = s.clone();
                async move { Check::combine(s.consumer.checks().await) }
            });
            // The port's /metrics is another service's: sample the gauges on a timer instead.
            let (s, stop) = (state.clone(), shutdown.clone());
            tokio::spawn(async move {
                while stop
                    .run_until_cancelled(tokio::time::sleep(Duration::from_secs(15)))
                    .await
                    .is_some()
                {
                    if s.consumer.ready.get() {
                        let _ = dlq_gauges(&s).await;
                    }
                }
                anyhow::Ok(())
            })
        }
    };

    // Setup waits on the database and the broker; a shutdown must be able to interrupt it.
    let setup = async {
        if !state
            .consumer
            .migrate(&config, &db::EVENTHANDLER, &shutdown)
            .await?
        {
            return Ok(None);
        }
        if config.retention.enabled {
            let guard = ClockGuard {
                job: "eventhandler",
                clock: clock.clone(),
                max_skew: config.retention.max_clock_skew,
                state: state.consumer.retention.clone(),
            };
            tokio::spawn(retention::run(
                pool.clone(),
                guard,
                config.retention.projections,
                config.retention.interval,
                shutdown.clone(),
            ));
        }
        state
            .consumer
            .subscribe(&config, &cfg.topics)
            .await
            .map(Some)
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
            sink: consumer::Projections::new(pool.clone(), &cfg.consumer_group),
            consumer,
            group: cfg.consumer_group.clone(),
            retry_delays: cfg.retry_delays.clone(),
            max_batch: cfg.max_batch,
            blocked: state.consumer.blocked.clone(),
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

/// Samples the dead-letter counts into `cj_dlq_entries{consumer,status}`; a label set that
/// emptied is set to 0 rather than left at its last value.
async fn dlq_gauges(s: &HealthState) -> Result<(), sqlx::Error> {
    let sizes = store::dlq_sizes(&s.consumer.pool).await?;
    let mut labels = s.dlq_labels.lock().expect("dlq labels lock");
    labels.extend(sizes.iter().map(|(c, st, _)| (c.clone(), st.clone())));
    for (consumer, status) in labels.iter() {
        let n = sizes
            .iter()
            .find(|(c, st, _)| c == consumer && st == status)
            .map_or(0, |(_, _, n)| *n);
        metrics::gauge!("cj_dlq_entries", "consumer" => consumer.clone(), "status" => status.clone())
            .set(n as f64);
    }
    Ok(())
}

/// Refreshes the sampled gauges before `/metrics` renders; a slow or unreachable database
/// leaves the last values.
async fn sample_gauges(
    State(s): State<HealthState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.consumer.ready.get() {
        match tokio::time::timeout(Duration::from_secs(2), dlq_gauges(&s)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "Could not sample the dead letters."),
            Err(_) => tracing::debug!("Sampling the dead letters timed out."),
        }
    }
    next.run(req).await
}

async fn health(State(s): State<HealthState>) -> Response {
    let mut all = s.consumer.checks().await;
    all.extend(s.board.checks(s.port).await);
    health_response(all)
}
