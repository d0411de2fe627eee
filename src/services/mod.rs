//! The services of the networked monolith. Each folder has one `run(ctx)` entry and never imports
//! another service: data crosses between them over the bus or HTTP, as it would after extraction.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::envelope::Clock;

pub mod actions;
pub mod console;
pub mod eventhandler;
pub mod ingestion;
pub mod query;
pub mod scaffold;
pub mod tsdb;

/// The scope table of every service's routes, for the authentication middleware and Traefik's
/// ForwardAuth (which checks requests for any service).
pub fn scope_rules() -> Vec<crate::infra::auth::ScopeRule> {
    [
        ingestion::SCOPES,
        query::SCOPES,
        actions::SCOPES,
        scaffold::SCOPES,
        console::SCOPES,
    ]
    .concat()
}

/// What a service is given by the supervisor (STYLE §1): the common configuration and its own
/// section `S` of it — nothing of the other services'.
pub struct ServiceContext<S = ()> {
    pub common: Arc<crate::config::Common>,
    pub config: S,
    /// The service's own pool (its own `CJ_<SERVICE>_DATABASE_URL`), connecting lazily.
    pub db: PgPool,
    /// That URL, for the migrations' own connection.
    pub db_url: secrecy::SecretString,
    /// Its configured main port (the one shared ports are published under on `board`).
    pub port: u16,
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
    /// Where the service spawns its background work; it drains them before `run` returns.
    pub jobs: crate::infra::jobs::Jobs,
}

impl ServiceContext {
    /// The same context, carrying the service's section.
    pub fn with<S>(self, config: S) -> ServiceContext<S> {
        ServiceContext {
            common: self.common,
            config,
            db: self.db,
            db_url: self.db_url,
            port: self.port,
            listener: self.listener,
            health_listener: self.health_listener,
            board: self.board,
            shutdown: self.shutdown,
            clock: self.clock,
            auth: self.auth,
            jobs: self.jobs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Service {
    Ingestion,
    Eventhandler,
    Tsdb,
    Query,
    Actions,
    Console,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Ingestion,
        Service::Eventhandler,
        Service::Tsdb,
        Service::Query,
        Service::Actions,
        Service::Console,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Ingestion => "ingestion",
            Service::Eventhandler => "eventhandler",
            Service::Tsdb => "tsdb",
            Service::Query => "query",
            Service::Actions => "actions",
            Service::Console => "console",
        }
    }

    /// The service's main port (API, or health for consumers).
    pub fn port(self, config: &Config) -> u16 {
        match self {
            Service::Ingestion => config.ports.ingestion,
            Service::Eventhandler | Service::Tsdb => config.ports.eventhandler_health,
            Service::Query => config.ports.query,
            Service::Actions => config.ports.actions,
            Service::Console => config.ports.console,
        }
    }

    /// A separate health/metrics port, for services whose API port is public.
    pub fn health_port(self, config: &Config) -> Option<u16> {
        match self {
            Service::Actions => Some(config.ports.actions_health),
            _ => None,
        }
    }

    /// The schema the service owns and its migrations; `None` for the query service and the
    /// console, which only read the others' tables.
    pub fn migrations(self) -> Option<&'static crate::infra::db::Migrations> {
        match self {
            Service::Ingestion => Some(&ingestion::MIGRATIONS),
            Service::Eventhandler => Some(&eventhandler::MIGRATIONS),
            Service::Tsdb => Some(&tsdb::MIGRATIONS),
            Service::Actions => Some(&actions::MIGRATIONS),
            Service::Query | Service::Console => None,
        }
    }

    /// Consumer services with no API of their own (SPEC §2: the tsdb-writer beside the event
    /// handler on 8084) may share a health port: when several of one process have the same port,
    /// the first of them in [`Service::ALL`] serves it and the others report on its `/health`
    /// through the [`crate::infra::http::HealthBoard`]. Any other clash is a bind error.
    pub fn health_only(self) -> bool {
        matches!(self, Service::Eventhandler | Service::Tsdb)
    }

    pub fn database_url(self, config: &Config) -> &str {
        config.database_url(self)
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

#[cfg(test)]
mod tests {
    use crate::infra::auth::{SCOPE_ACTIONS, SCOPE_INGEST, SCOPE_QUERY, required_scope};
    use axum::http::Method;

    #[test]
    fn scopes_follow_path_and_method() {
        let rules = super::scope_rules();
        let need = |m: Method, p: &str| required_scope(&rules, &m, p);
        assert_eq!(need(Method::POST, "/api/v1/ingest"), Some(SCOPE_INGEST));
        assert_eq!(
            need(Method::POST, "/api/v1/ingest/batch"),
            Some(SCOPE_INGEST)
        );
        assert_eq!(need(Method::POST, "/api/v1/events"), Some(SCOPE_INGEST));
        assert_eq!(need(Method::GET, "/api/v1/ingest"), None);
        assert_eq!(need(Method::GET, "/api/v1/query/events"), Some(SCOPE_QUERY));
        assert_eq!(
            need(Method::GET, "/api/v1/projections/x"),
            Some(SCOPE_QUERY)
        );
        assert_eq!(need(Method::DELETE, "/api/v1/query/x"), None);
        assert_eq!(
            need(Method::DELETE, "/api/v1/actions/rules/1"),
            Some(SCOPE_ACTIONS)
        );
        assert_eq!(
            need(Method::POST, "/api/v1/dlq/tsdb/x/replay"),
            Some(crate::infra::auth::SCOPE_DLQ)
        );
        assert_eq!(need(Method::GET, "/api/v1/ingestx"), None);
        assert_eq!(
            need(Method::GET, "/api/v1/devices/d/activity"),
            Some(SCOPE_QUERY)
        );
        assert_eq!(
            need(Method::PUT, "/api/v1/devices/d/activity"),
            Some(crate::infra::auth::SCOPE_DEVICES)
        );
        assert_eq!(need(Method::GET, "/internal/auth/verify"), None);
    }
}
