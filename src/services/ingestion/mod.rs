//! Ingestion (port 8080): HTTP ingest into the outbox, and the outbox processor that feeds the
//! event store and the bus. Owns the `ingestion` schema.

pub mod activity;
mod api;
pub mod devices;
mod error;
pub mod mqtt;
pub mod processor;
pub mod quarantine;
pub mod recovery;
pub mod replay;
pub mod retention;
pub mod writer;

crate::service_migrations!("ingestion", "migrations/ingestion");

use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use serde_json::json;
use tokio_util::task::TaskTracker;

/// Every route the service serves, for the OpenAPI agreement test and the deployment checks.
pub const ROUTES: &[crate::infra::http::Route] =
    crate::infra::http::concat_routes!(api::ROUTES, INTERNAL, quarantine::ROUTES, activity::ROUTES);

/// Who may call the service's routes (SPEC §13): devices and clients write events; the outbox
/// quarantine is for operators.
pub const SCOPES: &[ScopeRule] = &[
    ScopeRule {
        prefix: "/api/v1/ingest",
        methods: &["POST"],
        scope: SCOPE_INGEST,
    },
    ScopeRule {
        prefix: "/api/v1/events",
        methods: &["POST"],
        scope: SCOPE_INGEST,
    },
    ScopeRule {
        prefix: "/api/v1/outbox",
        methods: &[],
        scope: SCOPE_OUTBOX,
    },
    ScopeRule {
        prefix: "/api/v1/devices",
        methods: &["GET"],
        scope: SCOPE_QUERY,
    },
    ScopeRule {
        prefix: "/api/v1/devices",
        methods: &[],
        scope: SCOPE_DEVICES,
    },
];

use super::{Ready, ServiceContext, migrate_when_reachable};
use crate::config::{Common, IngestionSection};
use crate::envelope::Clock;
use crate::infra::auth::{Auth, SCOPE_DEVICES, SCOPE_INGEST, SCOPE_OUTBOX, SCOPE_QUERY, ScopeRule};
use crate::infra::http::{Check, Status, health_response, metrics_router, not_found, serve};
use crate::infra::{bus, db};
use secrecy::ExposeSecret;

#[derive(Clone)]
pub struct AppState {
    config: Arc<IngestionSection>,
    common: Arc<Common>,
    pool: sqlx::PgPool,
    writer: writer::Writer,
    clock: Arc<dyn Clock>,
    ready: Ready,
    producer: Arc<tokio::sync::OnceCell<Arc<bus::SharedProducer>>>,
    mqtt: Option<Arc<mqtt::MqttState>>,
    auth: Arc<Auth>,
    wakers: writer::Wakers,
    retention: Arc<crate::infra::clock_guard::ClockSkew>,
    /// The last outbox sample and when its query started (see [`outbox_gauges`]).
    outbox_sample: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, OutboxSample)>>>,
}

/// Rows, oldest age, rows over the retry limit, quarantined rows.
type OutboxSample = (i64, f64, i64, i64);

impl AppState {
    fn is_ready(&self) -> bool {
        self.ready.get()
    }
}

pub async fn run(ctx: ServiceContext<IngestionSection>) -> anyhow::Result<()> {
    let ServiceContext {
        config,
        common,
        db: pool,
        db_url,
        listener,
        shutdown,
        clock,
        auth,
        jobs,
        ..
    } = ctx;
    let listener = listener.context("ingestion needs its own port")?;
    let tracker = TaskTracker::new();
    let limit = crate::infra::http::ClientLimit::new(
        config.ingestion.rate_limit_per_sec,
        config.ingestion.rate_limit_burst,
        &common.api_limit.trusted_proxies,
        &jobs,
    );
    let wakers = writer::Wakers::new(config.outbox.worker_count);
    let state_mqtt = config
        .mqtt
        .as_ref()
        .map(|_| Arc::new(mqtt::MqttState::default()));
    let seen = activity::Seen::default();
    let state = AppState {
        writer: writer::Writer::spawn(
            pool.clone(),
            config.ingestion.commit_max_rows,
            config.ingestion.commit_concurrency,
            wakers.clone(),
            seen.clone(),
            &tracker,
        ),
        wakers,
        config: Arc::new(config),
        common: common.clone(),
        pool: pool.clone(),
        clock,
        ready: Ready::default(),
        producer: Arc::new(tokio::sync::OnceCell::new()),
        outbox_sample: Default::default(),
        mqtt: state_mqtt,
        auth: auth.clone(),
        retention: Default::default(),
    };

    let router = Router::new()
        .merge(crate::infra::http::limited(api::router(&state), limit))
        .merge(quarantine::router())
        .merge(activity::router())
        .merge(internal())
        .route("/health", get(health))
        // Kubernetes-style probes: readiness is /health's deep check, liveness none.
        .route("/readyz", get(health))
        .route("/livez", get(crate::infra::http::livez))
        .merge(
            metrics_router().route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                sample_gauges,
            )),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::infra::auth::middleware,
        ));
    let http = tokio::spawn(serve(
        "ingestion",
        listener,
        router,
        shutdown.clone(),
        common.http,
        common.shutdown_timeout,
    ));

    // Migrate (waiting for the database if need be), then open for writes and start the processor.
    let url = db_url.expose_secret().to_string();
    let background = {
        let (state, shutdown, tracker) = (state.clone(), shutdown.clone(), tracker.clone());
        async move {
            if !migrate_when_reachable(&url, &MIGRATIONS, &shutdown).await? {
                return Ok(());
            }
            // Today's event store partition exists before the processor's first insert.
            retention::prepare(&state.pool, state.clock.now()).await;
            state.ready.set();
            let guard = crate::infra::clock_guard::ClockGuard {
                job: "ingestion",
                clock: state.clock.clone(),
                max_skew: state.common.retention.max_clock_skew,
                state: state.retention.clone(),
            };
            tracker.spawn(retention::run(
                state.pool.clone(),
                guard,
                state.common.retention.clone(),
                shutdown.clone(),
            ));
            let monitor = activity::Monitor {
                pool: state.pool.clone(),
                writer: state.writer.clone(),
                seen,
                clock: state.clock.clone(),
                default_timeout: state.config.ingestion.inactivity_timeout,
                every: state.config.ingestion.activity_interval,
            };
            tracker.spawn(monitor.run(shutdown.clone()));
            if let (Some(cfg), Some(mqtt_state)) = (&state.config.mqtt, &state.mqtt) {
                let subscriber = mqtt::Subscriber {
                    cfg: cfg.clone(),
                    writer: state.writer.clone(),
                    clock: state.clock.clone(),
                    rules: state.rules(),
                    state: mqtt_state.clone(),
                };
                tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), topic = %cfg.topic, "MQTT ingestion starting.");
                tracker.spawn(subscriber.run(shutdown.clone()));
            }
            if state.config.outbox.enabled {
                start_processor(&state, &shutdown, &tracker).await?;
            }
            anyhow::Ok(())
        }
    };
    let result = tokio::select! {
        r = background => r,
        _ = shutdown.cancelled() => Ok(()),
    };
    if result.is_err() {
        shutdown.cancel();
    }
    let served = http.await?;
    drop(state);
    tracker.close();
    tracker.wait().await;
    jobs.drain().await;
    result.and(served)
}

async fn start_processor(
    state: &AppState,
    shutdown: &tokio_util::sync::CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let kafka = state.common.kafka.clone();
    let producer = Arc::new(bus::SharedProducer::new(bus::producer(&kafka).await?));
    let _ = state.producer.set(producer.clone());
    // Exported from the start, so a dashboard shows 0 rather than nothing.
    metrics::counter!("cj_outbox_publish_failures_total").increment(0);
    let topics = kafka.topics.clone();
    // The broker may be down at startup; the first batch's bus check creates them then.
    if let Err(e) = bus::ensure_topics(&kafka, &topics.all()).await {
        tracing::warn!(error = %e, "Could not create topics at startup; will retry on publish.");
    }
    let recovery = Arc::new(recovery::Recovery::new(
        state.pool.clone(),
        producer.clone(),
        &kafka,
        state.config.readers.clone(),
    ));
    tracker.spawn(
        recovery
            .clone()
            .watch(state.config.outbox.bus_watch_interval, shutdown.clone()),
    );
    let processor = processor::Processor {
        pool: state.pool.clone(),
        producer,
        topics,
        kafka,
        cfg: state.config.outbox.clone(),
        recovery,
        narrowing: Default::default(),
    };
    let workers = state.config.outbox.worker_count;
    tracker.spawn(processor::listen(
        state.pool.clone(),
        state.wakers.clone(),
        shutdown.clone(),
    ));
    for i in 0..workers {
        tracker.spawn(processor.clone().run_worker(
            i,
            workers,
            state.wakers.get(i),
            shutdown.clone(),
        ));
    }
    tracing::info!(workers, "Outbox processor started.");
    Ok(())
}

/// Samples the outbox backlog into its gauges (also reported by `/health`).
async fn outbox_gauges(state: &AppState) -> Result<OutboxSample, sqlx::Error> {
    // Single flight: callers queue on the lock, and one that finds a sample taken after it
    // arrived uses it, so however many probes and scrapes come at once one query runs, and no
    // answer is older than its request (an operator's fix shows at once).
    let arrived = tokio::time::Instant::now();
    let mut last = state.outbox_sample.lock().await;
    if let Some((at, sample)) = *last
        && at >= arrived
    {
        return Ok(sample);
    }
    let taken = tokio::time::Instant::now();
    let max = state.config.outbox.max_retries;
    let (n, age, stuck) = processor::backlog(&state.pool, max).await?;
    let quarantined = quarantine::count(&state.pool).await?;
    metrics::gauge!("cj_outbox_backlog").set(n as f64);
    metrics::gauge!("cj_outbox_oldest_age_seconds").set(age);
    metrics::gauge!("cj_outbox_over_retry_limit").set(stuck as f64);
    metrics::gauge!("cj_outbox_quarantined").set(quarantined as f64);
    *last = Some((taken, (n, age, stuck, quarantined)));
    Ok((n, age, stuck, quarantined))
}

/// Refreshes the sampled gauges before `/metrics` renders, so a scrape never shows a backlog
/// older than itself; a slow or unreachable database leaves the last values.
async fn sample_gauges(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.is_ready() {
        match tokio::time::timeout(Duration::from_secs(2), outbox_gauges(&state)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "Could not sample the outbox backlog."),
            Err(_) => tracing::debug!("Sampling the outbox backlog timed out."),
        }
    }
    next.run(req).await
}

crate::infra::http::routes! {
    const INTERNAL;
    fn internal() -> Router<AppState> {
        get "/internal/auth/verify" => verify;
    }
}

/// Traefik's ForwardAuth target (SPEC §11); never routed by the gateway itself.
async fn verify(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    crate::infra::auth::forward_auth(&state.auth, &headers)
}

async fn health(State(state): State<AppState>) -> Response {
    let mut checks = vec![("database", Check::from_ping(db::ping(&state.pool).await))];
    if !state.is_ready() {
        checks.push((
            "migrations",
            Check::new(
                Status::Unhealthy,
                json!({ "error": "not applied yet: waiting for the database" }),
            ),
        ));
    } else {
        let outbox = match outbox_gauges(&state).await {
            Ok((n, age, stuck, quarantined)) => {
                // A quarantined row is an accepted event that no consumer has: an operator must
                // look at it (`cornjacket outbox quarantine list`).
                let status = if stuck > 0 || quarantined > 0 {
                    Status::Degraded
                } else {
                    Status::Healthy
                };
                Check::new(
                    status,
                    json!({ "backlog": n, "oldest_age_seconds": age, "over_retry_limit": stuck,
                            "quarantined": quarantined }),
                )
            }
            Err(e) => Check::new(Status::Unhealthy, json!({ "error": e.to_string() })),
        };
        checks.push(("outbox", outbox));
    }
    if let Some(p) = state.producer.get() {
        // HTTP ingestion keeps accepting while the broker is away: degraded, not unhealthy.
        let bus = match bus::reachable(p.get()).await {
            Ok(brokers) => Check::healthy(json!({ "brokers": brokers })),
            Err(e) => Check::new(Status::Degraded, json!({ "error": e })),
        };
        checks.push(("bus", bus));
    }
    if let Some(m) = &state.mqtt {
        // HTTP ingestion works without MQTT: degraded, not unhealthy.
        let check = if m.connected.load(std::sync::atomic::Ordering::Relaxed) {
            Check::healthy(json!({ "connected": true }))
        } else {
            let err = m.last_error.lock().expect("mqtt state lock").clone();
            Check::new(
                Status::Degraded,
                json!({ "connected": false, "error": err }),
            )
        };
        checks.push(("mqtt", check));
    }
    checks.extend(state.retention.check().map(|c| ("retention", c)));
    health_response(checks)
}
