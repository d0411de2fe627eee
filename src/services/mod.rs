//! The services of the networked monolith. Each folder has one `run(ctx)` entry and never imports
//! another service: data crosses between them over the bus or HTTP, as it would after extraction.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::envelope::Clock;

pub mod actions;
pub mod eventhandler;
pub mod ingestion;
pub mod query;
pub mod tsdb;

/// What a service is given by the supervisor (STYLE §1).
pub struct ServiceContext {
    pub config: Arc<Config>,
    /// The service's own pool (its own `CJ_<SERVICE>_DATABASE_URL`), connecting lazily.
    pub db: PgPool,
    /// Its listener, bound before anything started; `None` when another service of this process
    /// already serves the same port (the tsdb-writer beside the event handler on 8084, SPEC §2):
    /// the service then publishes its checks on `board` for that port's `/health`.
    pub listener: Option<TcpListener>,
    /// The second port of a service that has one (the action orchestrator's health port 8083).
    pub health_listener: Option<TcpListener>,
    pub board: crate::infra::http::HealthBoard,
    /// Cancelled on SIGTERM/SIGINT or when any service fails.
    pub shutdown: CancellationToken,
    pub clock: Arc<dyn Clock>,
    /// The configured authentication, shared by every API.
    pub auth: Arc<crate::infra::auth::Auth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Service {
    Ingestion,
    Eventhandler,
    Tsdb,
    Query,
    Actions,
}

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Ingestion,
        Service::Eventhandler,
        Service::Tsdb,
        Service::Query,
        Service::Actions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Ingestion => "ingestion",
            Service::Eventhandler => "eventhandler",
            Service::Tsdb => "tsdb",
            Service::Query => "query",
            Service::Actions => "actions",
        }
    }

    /// The service's main port (API, or health for consumers).
    pub fn port(self, config: &Config) -> u16 {
        match self {
            Service::Ingestion => config.ports.ingestion,
            Service::Eventhandler | Service::Tsdb => config.ports.eventhandler_health,
            Service::Query => config.ports.query,
            Service::Actions => config.ports.actions,
        }
    }

    /// A separate health/metrics port, for services whose API port is public.
    pub fn health_port(self, config: &Config) -> Option<u16> {
        match self {
            Service::Actions => Some(config.ports.actions_health),
            _ => None,
        }
    }

    pub fn database_url(self, config: &Config) -> &str {
        config.database_url(self.name())
    }
}

/// Waits for the database and applies a service's migrations, retrying while the database is
/// unreachable (a service may start before its database). Returns false when shut down first;
/// a migration that fails is an error and stops the process.
pub async fn migrate_when_reachable(
    url: &str,
    m: &crate::infra::db::Migrations,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    use crate::infra::db::{MigrateError, migrate};
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match migrate(url, m).await {
            Ok(report) => {
                let applied = report.applied_migrations().len();
                tracing::info!(schema = m.schema, applied, "Migrations are up to date.");
                return Ok(true);
            }
            Err(MigrateError::Unreachable(e)) => {
                tracing::warn!(schema = m.schema, error = %e, retry_in = ?delay, "Database unreachable; waiting before migrating.");
            }
            Err(e @ MigrateError::Failed { .. }) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
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

    /// Applies the service's migrations, waiting for its database; false when shut down first.
    pub async fn migrate(
        &self,
        config: &Config,
        m: &crate::infra::db::Migrations,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let url = config.database_url(m.schema);
        if !migrate_when_reachable(url, m, shutdown).await? {
            return Ok(false);
        }
        self.ready.set();
        Ok(true)
    }

    /// Subscribes the group to `topics`, creating those missing on a fresh broker.
    pub async fn subscribe(
        &self,
        config: &Config,
        topics: &[String],
    ) -> anyhow::Result<Arc<crate::infra::bus::ObservedConsumer>> {
        use crate::infra::bus;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = bus::ensure_topics(&config.kafka, &names).await {
            tracing::warn!(error = %e, "Could not ensure topics; subscribing anyway.");
        }
        let (consumer, observed) = bus::consumer(&config.kafka, &self.group, topics).await?;
        let _ = self.consumer.set(observed);
        tracing::info!(group = %self.group, ?topics, "Consuming.");
        Ok(consumer)
    }
}

/// A readiness flag set once migrations are applied.
#[derive(Clone, Default)]
pub struct Ready(Arc<std::sync::atomic::AtomicBool>);

impl Ready {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}
