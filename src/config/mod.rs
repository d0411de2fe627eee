//! Typed configuration read once from the environment (and `.env` when present).
//!
//! Every variable is documented here and in README.md. Parsing is written out by hand rather than
//! with a derive crate because each error must name the variable, the value and the expected form,
//! and several variables have aliases from the seed documents (`INGESTION_DATABASE_URL`, ...).

mod bus;
mod common;
mod console;
mod consumers;
mod ingestion;
mod vars;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::services::Service;

pub use bus::{ENVELOPE_OVERHEAD, KafkaConfig, OutboxConfig, Topics};
pub use common::{ApiLimitConfig, AuthConfig, AuthMode, DbTimeouts, HttpLimits, RetentionConfig};
pub use console::{ConsoleConfig, LocalPorts};
pub use consumers::{ActionsConfig, EventHandlerConfig, TsdbConfig};
pub use ingestion::{IngestionConfig, MqttConfig};
pub use vars::redact_url;
use vars::{Vars, validate_database_url};

/// The default database for a local run: every service shares one database, each in its own schema.
pub const DEFAULT_DATABASE_URL: &str =
    "postgres://cornjacket:cornjacket@localhost:5432/cornjacket?sslmode=disable";

/// A configuration value that could not be accepted. Names the variable and the expected form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {var}={value:?} — expected {expected}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub expected: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct DatabaseUrls {
    pub ingestion: SecretString,
    pub eventhandler: SecretString,
    pub query: SecretString,
    pub tsdb: SecretString,
    pub actions: SecretString,
}

#[derive(Debug, Clone)]
pub struct Ports {
    pub ingestion: u16,
    pub query: u16,
    pub actions: u16,
    pub actions_health: u16,
    pub eventhandler_health: u16,
    /// `CJ_CONSOLE_PORT`: the operator console (default 8085).
    pub console: u16,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `CJ_LOG_LEVEL`: a tracing filter (`info`, `cornjacket=debug,info`).
    pub log_level: String,
    /// `CJ_LOG_FORMAT`: `json` or `text`.
    pub log_format: LogFormat,
    /// `CJ_BIND_ADDR`: the address every port binds (default 127.0.0.1; containers use 0.0.0.0).
    pub bind_addr: IpAddr,
    pub ports: Ports,
    pub databases: DatabaseUrls,
    /// `CJ_DB_MAX_CONNECTIONS`: pool size per service.
    pub db_max_connections: u32,
    /// `CJ_DB_ACQUIRE_TIMEOUT`: how long a request waits for a connection before 503.
    pub db_acquire_timeout: Duration,
    pub db_timeouts: DbTimeouts,
    pub http: HttpLimits,
    pub kafka: KafkaConfig,
    pub outbox: OutboxConfig,
    pub ingestion: IngestionConfig,
    pub eventhandler: EventHandlerConfig,
    pub tsdb: TsdbConfig,
    pub actions: ActionsConfig,
    pub console: ConsoleConfig,
    pub retention: RetentionConfig,
    pub api_limit: ApiLimitConfig,
    /// `None` when `CJ_MQTT_URL=off`.
    pub mqtt: Option<MqttConfig>,
    pub auth: AuthConfig,
    /// `CJ_SHUTDOWN_TIMEOUT`: the hard deadline for a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// What startup should warn about once logging is up: `CJ_*` variables nothing reads.
    pub warnings: Vec<String>,
}

/// `CJ_*` variables that belong to other programs sharing the environment: the ai-inference
/// sidecar, the test and benchmark harnesses, the development webhook listener.
const NOT_OURS: &[&str] = &[
    "CJ_AI_",
    "CJ_TEST_",
    "CJ_E2E",
    "CJ_BENCH",
    "CJ_BIN",
    "CJ_TANSU_",
    "CJ_WEBHOOK_SECRET",
];

/// What every service reads besides its own section: the bus, the HTTP limits, retention, the
/// API rate limit and the shutdown deadline. A service is given this and its section only.
#[derive(Debug, Clone)]
pub struct Common {
    pub kafka: KafkaConfig,
    pub http: HttpLimits,
    pub retention: RetentionConfig,
    pub api_limit: ApiLimitConfig,
    pub shutdown_timeout: Duration,
}

/// The ingestion service's section: the door, the outbox processor, MQTT, and the consumer
/// groups that read the platform's topics (bus recovery rewinds them after the broker lost
/// data).
#[derive(Debug, Clone)]
pub struct IngestionSection {
    pub ingestion: IngestionConfig,
    pub outbox: OutboxConfig,
    pub mqtt: Option<MqttConfig>,
    pub readers: Vec<(String, Vec<String>)>,
}

impl Config {
    pub fn common(&self) -> Common {
        Common {
            kafka: self.kafka.clone(),
            http: self.http,
            retention: self.retention.clone(),
            api_limit: self.api_limit.clone(),
            shutdown_timeout: self.shutdown_timeout,
        }
    }

    pub fn ingestion_section(&self) -> IngestionSection {
        let mut readers = vec![
            (
                self.eventhandler.consumer_group.clone(),
                self.eventhandler.topics.clone(),
            ),
            (self.tsdb.consumer_group.clone(), self.tsdb.topics.clone()),
            (
                self.actions.consumer_group.clone(),
                self.actions.topics.clone(),
            ),
        ];
        // The ai-inference sidecar (`CJ_AI_CONSUMER_GROUP`) reads the sensor topic.
        if let Some(g) = &self.outbox.sidecar_group {
            readers.push((g.clone(), vec![self.kafka.topics.sensor.clone()]));
        }
        IngestionSection {
            ingestion: self.ingestion.clone(),
            outbox: self.outbox.clone(),
            mqtt: self.mqtt.clone(),
            readers,
        }
    }

    /// Reads `.env` (when present) and the process environment. The only I/O of parsing is
    /// here: the host name (for the default MQTT client id) is read before parsing.
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        read_files(&mut vars, |path| std::fs::read_to_string(path))?;
        let host_name = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into());
        Self::parse(&Vars(&vars, Default::default()), &host_name)
    }

    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::parse(&Vars(map, Default::default()), "local")
    }

    /// Like [`Config::from_map`], with `*_FILE` variables read through `read` (a test's files).
    pub fn from_map_with_files(
        map: &HashMap<String, String>,
        read: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Self, ConfigError> {
        let mut map = map.clone();
        read_files(&mut map, read)?;
        Self::from_map(&map)
    }

    /// Every environment variable the configuration reads (with the seed's aliases), derived
    /// from the parser; deployment files are checked against it.
    pub fn known_variables() -> Vec<String> {
        let empty = HashMap::new();
        let v = Vars(&empty, Default::default());
        Self::parse(&v, "local").expect("defaults are valid");
        v.1.into_inner().into_iter().collect()
    }

    /// Each section parses itself; what one section's limits must respect of another's is
    /// checked where the later one is parsed.
    fn parse(v: &Vars, host_name: &str) -> Result<Self, ConfigError> {
        let warnings = unknown_variables(v.0);
        let (log_level, log_format) = parse_logging(v)?;
        let databases = DatabaseUrls::parse(v)?;
        let kafka = KafkaConfig::parse(v)?;
        let ingestion = IngestionConfig::parse(v, &kafka)?;
        let ports = Ports::parse(v)?;
        let mqtt = MqttConfig::parse(v, &ingestion, ports.ingestion, host_name)?;
        let console = ConsoleConfig::parse(v, &ports)?;
        Ok(Self {
            log_level,
            log_format,
            bind_addr: v.parse(
                "CJ_BIND_ADDR",
                IpAddr::from([127, 0, 0, 1]),
                "an IP address such as 0.0.0.0",
            )?,
            ports,
            databases,
            db_max_connections: v.ranged("CJ_DB_MAX_CONNECTIONS", 16, 1, 1000)?,
            db_acquire_timeout: v.duration("CJ_DB_ACQUIRE_TIMEOUT", Duration::from_secs(3))?,
            db_timeouts: DbTimeouts::parse(v, kafka.message_timeout)?,
            http: HttpLimits::parse(v)?,
            outbox: OutboxConfig::parse(v)?,
            eventhandler: EventHandlerConfig::parse(v, &kafka.topics)?,
            tsdb: TsdbConfig::parse(v, &kafka.topics)?,
            actions: ActionsConfig::parse(v, &kafka.topics)?,
            console,
            kafka,
            ingestion,
            retention: RetentionConfig::parse(v)?,
            api_limit: ApiLimitConfig::parse(v)?,
            mqtt,
            auth: AuthConfig::parse(v)?,
            shutdown_timeout: v.duration("CJ_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
            warnings,
        })
    }

    /// The database URL of a service, for connecting; never log it unredacted.
    pub fn database_url(&self, service: Service) -> &str {
        let d = &self.databases;
        match service {
            Service::Ingestion => d.ingestion.expose_secret(),
            Service::Eventhandler => d.eventhandler.expose_secret(),
            Service::Tsdb => d.tsdb.expose_secret(),
            Service::Actions => d.actions.expose_secret(),
            // The console reads every schema the way the query service does.
            Service::Query | Service::Console => d.query.expose_secret(),
        }
    }
}

fn parse_logging(v: &Vars) -> Result<(String, LogFormat), ConfigError> {
    let log_format = match v.raw(&["CJ_LOG_FORMAT"]) {
        None => LogFormat::Json,
        Some((_, f)) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        Some((_, f)) if f.eq_ignore_ascii_case("text") => LogFormat::Text,
        Some((var, f)) => return Err(Vars::err(&var, &f, "json or text")),
    };
    // `RUST_LOG`, the ecosystem's convention, when the platform's own is not set.
    let (var, log_level) = v
        .raw(&["CJ_LOG_LEVEL", "RUST_LOG"])
        .unwrap_or_else(|| ("CJ_LOG_LEVEL".into(), "info".into()));
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(Vars::err(
            &var,
            &log_level,
            "a level (error, warn, info, debug, trace) or a tracing filter",
        ));
    }
    Ok((log_level, log_format))
}

/// `X_FILE=path` stands for `X=<the file's contents>` for every variable `X` the configuration
/// reads — how container platforms hand over secrets (Docker and Kubernetes secrets, ECS
/// secrets mounted as files) without putting them in the environment. Setting both is refused;
/// one trailing newline is dropped.
fn read_files(
    vars: &mut HashMap<String, String>,
    read: impl Fn(&str) -> std::io::Result<String>,
) -> Result<(), ConfigError> {
    let known = Config::known_variables();
    let files: Vec<(String, String, String)> = vars
        .iter()
        .filter_map(|(k, path)| {
            let base = k.strip_suffix("_FILE")?;
            known
                .iter()
                .any(|n| n == base)
                .then(|| (base.to_string(), k.clone(), path.clone()))
        })
        .collect();
    for (base, var, path) in files {
        if vars.get(&base).is_some_and(|v| !v.trim().is_empty()) {
            return Err(Vars::err(
                &var,
                &path,
                &format!("unset: {base} is set too; give one of them"),
            ));
        }
        let contents = read(&path).map_err(|e| {
            Vars::err(
                &var,
                &path,
                &format!("a readable file holding {base} ({e})"),
            )
        })?;
        let value = contents
            .strip_suffix('\n')
            .map(|c| c.strip_suffix('\r').unwrap_or(c))
            .unwrap_or(&contents);
        vars.insert(base, value.to_string());
    }
    Ok(())
}

/// A warning per `CJ_*` variable nothing reads (a typo silently meaning the default is the
/// classic misconfiguration), naming the nearest known one.
fn unknown_variables(vars: &HashMap<String, String>) -> Vec<String> {
    if vars.is_empty() {
        return Vec::new();
    }
    let known = Config::known_variables();
    let mut unknown: Vec<&String> = vars
        .keys()
        .filter(|k| k.starts_with("CJ_"))
        .filter(|k| !NOT_OURS.iter().any(|p| k.starts_with(p)))
        .filter(|k| !known.contains(k))
        .filter(|k| {
            k.strip_suffix("_FILE")
                .is_none_or(|b| !known.iter().any(|n| n == b))
        })
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|k| {
            let nearest = known
                .iter()
                .map(|n| (strsim::levenshtein(k, n), n))
                .min()
                .filter(|(d, _)| *d <= 3.max(k.len() / 4));
            match nearest {
                Some((_, n)) => {
                    format!("{k} is not a variable the platform reads (ignored); did you mean {n}?")
                }
                None => format!("{k} is not a variable the platform reads (ignored)"),
            }
        })
        .collect()
}

impl DatabaseUrls {
    /// `CJ_DATABASE_URL` (or the seed's `DATABASE_URL`) is every service's default.
    fn parse(v: &Vars) -> Result<Self, ConfigError> {
        let common = match v.raw(&["CJ_DATABASE_URL", "DATABASE_URL"]) {
            None => DEFAULT_DATABASE_URL.to_string(),
            Some((var, url)) => {
                validate_database_url(&url).map_err(|_| {
                    Vars::err(
                        &var,
                        &redact_url(&url),
                        "a URL such as postgres://user:password@host:5432/db",
                    )
                })?;
                url
            }
        };
        Ok(DatabaseUrls {
            ingestion: v.database_url(
                &["CJ_INGESTION_DATABASE_URL", "INGESTION_DATABASE_URL"],
                &common,
            )?,
            eventhandler: v.database_url(
                &["CJ_EVENTHANDLER_DATABASE_URL", "EVENTHANDLER_DATABASE_URL"],
                &common,
            )?,
            query: v.database_url(&["CJ_QUERY_DATABASE_URL", "QUERY_DATABASE_URL"], &common)?,
            tsdb: v.database_url(&["CJ_TSDB_DATABASE_URL", "TSDB_DATABASE_URL"], &common)?,
            actions: v.database_url(
                &["CJ_ACTIONS_DATABASE_URL", "ACTIONS_DATABASE_URL"],
                &common,
            )?,
        })
    }
}

impl Ports {
    fn parse(v: &Vars) -> Result<Self, ConfigError> {
        Ok(Ports {
            ingestion: v.port("CJ_INGESTION_PORT", 8080)?,
            query: v.port("CJ_QUERY_PORT", 8081)?,
            actions: v.port("CJ_ACTIONS_PORT", 8082)?,
            actions_health: v.port("CJ_ACTIONS_HEALTH_PORT", 8083)?,
            eventhandler_health: v.port("CJ_EVENTHANDLER_HEALTH_PORT", 8084)?,
            console: v.port("CJ_CONSOLE_PORT", 8085)?,
        })
    }
}

#[cfg(test)]
mod tests;
