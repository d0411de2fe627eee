//! The operator console: where it finds the other services' HTTP APIs.

use super::vars::Vars;
use super::{ConfigError, Ports};

/// The console reads through the query service's database URL and acts only through the other
/// services' HTTP APIs (a service never imports another), so it needs their base URLs. The
/// defaults are this host's ports, which is right whenever the services share a process or a
/// task.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// `CJ_CONSOLE_INGESTION_URL`: the ingestion API (default `http://127.0.0.1:<CJ_INGESTION_PORT>`).
    pub ingestion_url: String,
    /// `CJ_CONSOLE_QUERY_URL`: the query API.
    pub query_url: String,
    /// `CJ_CONSOLE_ACTIONS_URL`: the actions API (rules, deliveries).
    pub actions_url: String,
    /// `CJ_CONSOLE_ACTIONS_HEALTH_URL`: the action orchestrator's health port (its DLQ API).
    pub actions_health_url: String,
    /// `CJ_CONSOLE_EVENTHANDLER_URL`: the event handler's and tsdb-writer's health port (their
    /// DLQ API).
    pub eventhandler_url: String,
    /// `CJ_CONSOLE_TSDB_URL`: the tsdb-writer's health port (default: the event handler's, which
    /// it shares).
    pub tsdb_url: String,
    /// `CJ_CONSOLE_SIDECAR_URL`: the ai-inference sidecar (default `http://127.0.0.1:8090`).
    pub sidecar_url: String,
}

impl ConsoleConfig {
    pub(super) fn parse(v: &Vars, ports: &Ports) -> Result<Self, ConfigError> {
        let url = |name: &str, port: u16| -> Result<String, ConfigError> {
            let default = format!("http://127.0.0.1:{port}");
            let u = v.string(name, &default);
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(Vars::err(name, &u, "an http:// or https:// URL"));
            }
            Ok(u.trim_end_matches('/').to_string())
        };
        Ok(ConsoleConfig {
            ingestion_url: url("CJ_CONSOLE_INGESTION_URL", ports.ingestion)?,
            query_url: url("CJ_CONSOLE_QUERY_URL", ports.query)?,
            actions_url: url("CJ_CONSOLE_ACTIONS_URL", ports.actions)?,
            actions_health_url: url("CJ_CONSOLE_ACTIONS_HEALTH_URL", ports.actions_health)?,
            eventhandler_url: url("CJ_CONSOLE_EVENTHANDLER_URL", ports.eventhandler_health)?,
            tsdb_url: url("CJ_CONSOLE_TSDB_URL", ports.eventhandler_health)?,
            sidecar_url: url("CJ_CONSOLE_SIDECAR_URL", 8090)?,
        })
    }
}

/// Where this process's services are bound, for [`ConsoleConfig::resolve_local`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalPorts {
    pub ingestion: Option<u16>,
    pub query: Option<u16>,
    pub actions: Option<u16>,
    pub actions_health: Option<u16>,
    pub eventhandler_health: Option<u16>,
    pub tsdb_health: Option<u16>,
}

impl ConsoleConfig {
    /// Points the URLs left at their default to this process's services where they are bound
    /// (tests and `CJ_*_PORT=0` bind ephemeral ports the defaults cannot know).
    pub fn resolve_local(&mut self, ports: &Ports, bound: LocalPorts) {
        for (url, port, actual) in [
            (&mut self.ingestion_url, ports.ingestion, bound.ingestion),
            (&mut self.query_url, ports.query, bound.query),
            (&mut self.actions_url, ports.actions, bound.actions),
            (
                &mut self.actions_health_url,
                ports.actions_health,
                bound.actions_health,
            ),
            (
                &mut self.eventhandler_url,
                ports.eventhandler_health,
                bound.eventhandler_health,
            ),
            (
                &mut self.tsdb_url,
                ports.eventhandler_health,
                bound.tsdb_health,
            ),
        ] {
            if *url == format!("http://127.0.0.1:{port}")
                && let Some(actual) = actual
            {
                *url = format!("http://127.0.0.1:{actual}");
            }
        }
    }
}
