//! The scaffold of a service built around one consumer group — the event handler, the
//! tsdb-writer and the action orchestrator. Each says what differs in a [`Spec`] and a
//! [`ConsumerService`]; the scaffold does the rest, the same way for all three: serve `/health`
//! and `/metrics` and the DLQ API (or report on a shared port, see [`Service::health_only`]),
//! wait for the database and migrate, start the background jobs, subscribe, consume until shut
//! down, then drain the jobs and the HTTP servers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use sqlx::PgPool;

use super::{Ready, Service, ServiceContext, migrate_when_reachable};
use crate::config::{Common, KafkaConfig};
use crate::envelope::Clock;
use crate::infra::auth::{SCOPE_DLQ, ScopeRule};
use crate::infra::clock_guard::ClockGuard;
use crate::infra::consume::{self, Sink};
use crate::infra::dlq;
use crate::infra::http::{Check, HealthBoard, health_response, metrics_router, not_found, serve};
use crate::infra::jobs::Jobs;
use secrecy::ExposeSecret;

/// Every consumer service's DLQ API (see [`crate::infra::dlq::api`]).
pub const SCOPES: &[ScopeRule] = &[ScopeRule {
    prefix: "/api/v1/dlq",
    methods: &[],
    scope: SCOPE_DLQ,
}];

/// What a consumer service consumes and how.
pub struct Spec {
    pub service: Service,
    /// Its dead letters (its `<schema>.dlq`, replayed with its sink).
    pub dead_letters: dlq::Owner,
    pub group: String,
    pub topics: Vec<String>,
    pub retry_delays: Vec<Duration>,
    pub max_batch: usize,
}

/// The parts that differ between consumer services.
pub trait ConsumerService: Send + Sync + 'static {
    type Sink: Sink;

    /// Called once the migrations are applied: starts the service's background jobs on
    /// `ctx.jobs` and returns the sink the consume loop writes through.
    fn start(&self, ctx: &Started) -> impl Future<Output = anyhow::Result<Self::Sink>> + Send;

    /// Checks of its own for `/health`, beside the database, the consumer and retention.
    fn checks(
        &self,
        _health: &ConsumerHealth,
    ) -> impl Future<Output = Vec<(&'static str, Check)>> + Send {
        async { Vec::new() }
    }
}

/// What a service's [`ConsumerService::start`] is given.
pub struct Started {
    pub common: Arc<Common>,
    pub pool: PgPool,
    pub jobs: Jobs,
    pub health: ConsumerHealth,
    pub clock: Arc<dyn Clock>,
    job_name: &'static str,
}

/// A service's retention job: `(pool, guard, keep, every, shutdown)`, run until shut down.
pub type RetentionJob<F> =
    fn(PgPool, ClockGuard, Duration, Duration, tokio_util::sync::CancellationToken) -> F;

impl Started {
    /// Starts the service's retention job keeping `keep`, when retention is on.
    pub fn spawn_retention<F>(&self, keep: Duration, job: RetentionJob<F>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let r = &self.common.retention;
        if r.enabled {
            self.jobs.spawn(job(
                self.pool.clone(),
                self.clock_guard(),
                keep,
                r.interval,
                self.jobs.shutdown.clone(),
            ));
        }
    }

    /// The guard of a retention job (it refuses to delete while the host clock is not to be
    /// trusted, and shows why on `/health`).
    pub fn clock_guard(&self) -> ClockGuard {
        ClockGuard {
            job: self.job_name,
            clock: self.clock.clone(),
            max_skew: self.common.retention.max_clock_skew,
            state: self.health.retention.clone(),
        }
    }
}

struct Shared<C> {
    service: C,
    health: ConsumerHealth,
    board: HealthBoard,
    port: u16,
    dead_letters: dlq::Owner,
    /// `(consumer, status)` label sets of `cj_dlq_entries` exported so far.
    dlq_labels: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl<C> Shared<C> {
    /// Samples the dead-letter counts into `cj_dlq_entries{consumer,status}`; a label set that
    /// emptied is set to 0 rather than left at its last value.
    async fn sample(&self) {
        let sizes = match self.dead_letters.sizes().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "Could not sample the dead letters.");
                return;
            }
        };
        let mut labels = self.dlq_labels.lock().expect("dlq labels lock");
        labels.extend(sizes.iter().map(|(c, st, _)| (c.clone(), st.clone())));
        for (consumer, status) in labels.iter() {
            let n = sizes
                .iter()
                .find(|(c, st, _)| c == consumer && st == status)
                .map_or(0, |(_, _, n)| *n);
            metrics::gauge!("cj_dlq_entries", "consumer" => consumer.clone(), "status" => status.clone())
                .set(n as f64);
        }
    }
}

/// Runs a consumer service. `api` is a service's own API router, served on `ctx.listener`; its
/// health port is then `ctx.health_listener`. Without one, `ctx.listener` is the health port.
pub async fn run<C: ConsumerService, S>(
    ctx: ServiceContext<S>,
    spec: Spec,
    service: C,
    api: Option<Router>,
) -> anyhow::Result<()> {
    let ServiceContext {
        common,
        db: pool,
        db_url,
        port,
        listener,
        health_listener,
        board,
        shutdown,
        clock,
        jobs,
        auth,
        config: _,
    } = ctx;
    let name = spec.service.name();
    let migrations = spec
        .service
        .migrations()
        .expect("a consumer service owns a schema");
    let health = ConsumerHealth::new(pool.clone(), &spec.group);
    // The own group's entries are exported (at 0) from the start.
    let dlq_labels = dlq::Status::ALL
        .map(|st| (spec.group.clone(), st.as_str().to_string()))
        .into_iter()
        .collect();
    let shared = Arc::new(Shared {
        service,
        health: health.clone(),
        board: board.clone(),
        port,
        dead_letters: spec.dead_letters.clone(),
        dlq_labels: std::sync::Mutex::new(dlq_labels),
    });
    let serve_on = |name, listener, router| {
        tokio::spawn(serve(
            name,
            listener,
            router,
            shutdown.clone(),
            common.http,
            common.shutdown_timeout,
        ))
    };
    let mut servers = Vec::new();
    let health_listener = match api {
        Some(router) => {
            let listener =
                listener.ok_or_else(|| anyhow::anyhow!("the {name} API needs its own port"))?;
            servers.push(serve_on(name, listener, router));
            Some(
                health_listener
                    .ok_or_else(|| anyhow::anyhow!("the {name} service needs a health port"))?,
            )
        }
        None => listener,
    };
    match health_listener {
        Some(listener) => {
            let dead_letters = dlq::api::router()
                .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
                .with_state(dlq::api::DlqState {
                    own: shared.dead_letters.clone(),
                    board: board.clone(),
                    port: shared.port,
                })
                .layer(axum::middleware::from_fn_with_state(
                    auth.clone(),
                    crate::infra::auth::middleware,
                ));
            let router = Router::new()
                .route("/health", get(health_of::<C>))
                // Kubernetes-style probes: readiness is /health's deep check, liveness none.
                .route("/readyz", get(health_of::<C>))
                .route("/livez", get(crate::infra::http::livez))
                .merge(
                    metrics_router().route_layer(axum::middleware::from_fn_with_state(
                        shared.clone(),
                        sample_first::<C>,
                    )),
                )
                .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
                .fallback(not_found)
                .with_state(shared.clone())
                .merge(dead_letters);
            let label = if servers.is_empty() { name } else { "health" };
            servers.push(serve_on(label, listener, router));
        }
        None => {
            // Another service of this process serves the port: report on its /health and
            // through its DLQ API, and sample the gauges on a timer since its /metrics render
            // without us.
            board.register_dead_letters(shared.port, shared.dead_letters.clone());
            let s = shared.clone();
            board.register(shared.port, name, move || {
                let s = s.clone();
                async move {
                    let mut all = s.health.checks().await;
                    all.extend(s.service.checks(&s.health).await);
                    Check::combine(all)
                }
            });
            let (s, stop) = (shared.clone(), shutdown.clone());
            jobs.spawn(async move {
                while stop
                    .run_until_cancelled(tokio::time::sleep(Duration::from_secs(15)))
                    .await
                    .is_some()
                {
                    if s.health.ready.get() {
                        s.sample().await;
                    }
                }
            });
        }
    }

    // Setup waits on the database and the broker; a shutdown must be able to interrupt it.
    let setup = async {
        if !migrate_when_reachable(db_url.expose_secret(), migrations, &shutdown).await? {
            return Ok(None);
        }
        health.ready.set();
        let started = Started {
            common: common.clone(),
            pool: pool.clone(),
            jobs: jobs.clone(),
            health: health.clone(),
            clock: clock.clone(),
            job_name: name,
        };
        let sink = shared.service.start(&started).await?;
        let consumer = health.subscribe(&common.kafka, &spec.topics).await?;
        anyhow::Ok(Some((sink, consumer)))
    };
    let work = async {
        let ready = tokio::select! {
            r = setup => r?,
            _ = shutdown.cancelled() => None,
        };
        if let Some((sink, consumer)) = ready {
            consume::Worker {
                sink,
                consumer,
                group: spec.group.clone(),
                retry_delays: spec.retry_delays.clone(),
                max_batch: spec.max_batch,
                blocked: health.blocked.clone(),
            }
            .run(shutdown.clone())
            .await;
        }
        anyhow::Ok(())
    };
    let result = work.await;
    if result.is_err() {
        shutdown.cancel();
    }
    jobs.drain().await;
    let mut served = Ok(());
    for s in servers {
        served = served.and(s.await?);
    }
    result.and(served)
}

async fn health_of<C: ConsumerService>(State(s): State<Arc<Shared<C>>>) -> Response {
    let mut all = s.health.checks().await;
    all.extend(s.service.checks(&s.health).await);
    all.extend(s.board.checks(s.port).await);
    health_response(all)
}

/// Refreshes the sampled gauges before `/metrics` renders; a slow or unreachable database
/// leaves the last values.
async fn sample_first<C: ConsumerService>(
    State(s): State<Arc<Shared<C>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.health.ready.get()
        && tokio::time::timeout(Duration::from_secs(2), s.sample())
            .await
            .is_err()
    {
        tracing::debug!("Sampling the gauges timed out.");
    }
    next.run(req).await
}

/// The health of a service built around one consumer group (event handler, tsdb-writer, action
/// orchestrator) and the steps every such service takes before consuming.
#[derive(Clone)]
pub struct ConsumerHealth {
    pub pool: PgPool,
    /// Set once the service's migrations are applied.
    pub ready: Ready,
    pub group: String,
    pub consumer: Arc<tokio::sync::OnceCell<Arc<crate::infra::bus::ConsumerState>>>,
    pub blocked: Arc<crate::infra::consume::Blocked>,
    /// Whether the service's retention job refuses to trust the host clock.
    pub retention: Arc<crate::infra::clock_guard::ClockSkew>,
}

impl ConsumerHealth {
    pub fn new(pool: PgPool, group: &str) -> Self {
        Self {
            pool,
            ready: Ready::default(),
            group: group.to_string(),
            consumer: Default::default(),
            blocked: Default::default(),
            retention: Default::default(),
        }
    }

    /// The database, the group's assignment and lag, and whether an outage blocks it.
    pub async fn checks(&self) -> Vec<(&'static str, crate::infra::http::Check)> {
        use crate::infra::http::Check;
        let mut checks = vec![(
            "database",
            Check::from_ping(crate::infra::db::ping(&self.pool).await),
        )];
        checks.extend(crate::infra::consume::consumer_check(
            &self.group,
            self.ready.get(),
            self.consumer.get(),
            &self.blocked,
        ));
        checks.extend(self.retention.check().map(|c| ("retention", c)));
        checks
    }

    /// Subscribes the group to `topics`, creating those missing on a fresh broker.
    pub async fn subscribe(
        &self,
        kafka: &KafkaConfig,
        topics: &[String],
    ) -> anyhow::Result<Arc<crate::infra::bus::ObservedConsumer>> {
        use crate::infra::bus;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = bus::ensure_topics(kafka, &names).await {
            tracing::warn!(error = %e, "Could not ensure topics; subscribing anyway.");
        }
        let (consumer, observed) = bus::consumer(kafka, &self.group, topics).await?;
        let _ = self.consumer.set(observed);
        tracing::info!(group = %self.group, ?topics, "Consuming.");
        Ok(consumer)
    }
}
