//! The services of the networked monolith. Each folder has one `run(ctx)` entry and never imports
//! another service: data crosses between them over the bus or HTTP, as it would after extraction.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::envelope::Clock;

pub mod eventhandler;
pub mod ingestion;
pub mod query;

/// What a service is given by the supervisor (STYLE §1).
pub struct ServiceContext {
    pub config: Arc<Config>,
    /// The service's own pool (its own `CJ_<SERVICE>_DATABASE_URL`), connecting lazily.
    pub db: PgPool,
    /// Its listener, bound before anything started.
    pub listener: TcpListener,
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
    Query,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Ingestion, Service::Eventhandler, Service::Query];

    pub fn name(self) -> &'static str {
        match self {
            Service::Ingestion => "ingestion",
            Service::Eventhandler => "eventhandler",
            Service::Query => "query",
        }
    }

    pub fn port(self, config: &Config) -> u16 {
        match self {
            Service::Ingestion => config.ports.ingestion,
            Service::Eventhandler => config.ports.eventhandler_health,
            Service::Query => config.ports.query,
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
