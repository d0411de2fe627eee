//! Typed configuration read once from the environment (and `.env` when present).
//!
//! Every variable is documented here and in README.md. Parsing is written out by hand rather than
//! with a derive crate because each error must name the variable, the value and the expected form,
//! and several variables have aliases from the seed documents (`INGESTION_DATABASE_URL`, ...).

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

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

/// The three base topics of SPEC §5, with the optional test/tenant prefix applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub sensor: String,
    pub user: String,
    pub system: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            sensor: format!("{prefix}sensor-events"),
            user: format!("{prefix}user-actions"),
            system: format!("{prefix}system-events"),
        }
    }

    pub fn all(&self) -> [&str; 3] {
        [&self.sensor, &self.user, &self.system]
    }

    /// The topic for an event type, by prefix (SPEC §5).
    pub fn for_event_type(&self, event_type: &str) -> &str {
        match crate::envelope::route(event_type) {
            crate::envelope::Route::Sensor => &self.sensor,
            crate::envelope::Route::User => &self.user,
            crate::envelope::Route::System => &self.system,
        }
    }
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
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `CJ_KAFKA_BROKERS` (alias `CJ_REDPANDA_BROKERS`): bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// `CJ_KAFKA_PARTITIONS`: partitions for topics the platform creates (1–1024).
    pub partitions: i32,
    /// `CJ_KAFKA_RETENTION`: `retention.ms` for created topics.
    pub retention: Duration,
    /// `CJ_KAFKA_TOPIC_PREFIX`: prepended to every topic name (isolates tests and tenants).
    pub topic_prefix: String,
    /// `CJ_KAFKA_PRODUCER_LINGER_MS`: how long the producer gathers a batch.
    pub linger_ms: u32,
    /// `CJ_KAFKA_MESSAGE_TIMEOUT`: how long a publish may wait for the broker before failing.
    pub message_timeout: Duration,
    /// `CJ_KAFKA_FETCH_WAIT_MAX_MS`: the longest a consumer's fetch waits for data.
    pub fetch_wait_max_ms: u32,
    /// `CJ_KAFKA_MESSAGE_MAX_BYTES`: the largest message the producer sends (librdkafka's
    /// `message.max.bytes`; default 1,000,000, within Kafka's and Redpanda's default topic limit of
    /// 1 MiB). Must leave room for the largest event ingestion admits ([`ENVELOPE_OVERHEAD`]).
    pub message_max_bytes: usize,
    pub topics: Topics,
}

/// What an envelope adds to the client's body at most, besides its subject: ids, times,
/// metadata and the JSON around them (a few hundred bytes), with room to spare.
pub const ENVELOPE_OVERHEAD: usize = 4096;

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// `CJ_OUTBOX_WORKER_COUNT`: processor workers in this process (1–16).
    pub worker_count: usize,
    /// `CJ_OUTBOX_BATCH_SIZE`: rows claimed per batch (1–10000).
    pub batch_size: i64,
    /// `CJ_OUTBOX_MAX_RETRIES`: past this many failed attempts a row is reported (health degraded).
    pub max_retries: i32,
    /// `CJ_OUTBOX_POLL_INTERVAL`: the watchdog poll that covers missed notifications.
    pub poll_interval: Duration,
    /// `CJ_OUTBOX_ENABLED`: run the processor inside the ingestion service (default true).
    pub enabled: bool,
    /// `CJ_OUTBOX_BUS_WATCH_INTERVAL`: how often the processor compares the bus with what it
    /// published (a loss is also checked after every failed publish) and samples consumer
    /// progress (default 2s).
    pub bus_watch_interval: Duration,
    /// `CJ_AI_CONSUMER_GROUP`: the sidecar's consumer group (shared with the sidecar), whose
    /// progress on the sensor topic bounds what a bus recovery republishes; `off` when no sidecar
    /// runs (default `ai-inference`).
    pub sidecar_group: Option<String>,
}

#[derive(Debug, Clone)]
pub struct IngestionConfig {
    /// `CJ_INGESTION_MAX_BODY_BYTES`: the largest single-event body (default 64 KiB).
    pub max_body_bytes: usize,
    /// `CJ_INGESTION_MAX_BATCH_BODY_BYTES`: the largest batch body (default 16 MiB).
    pub max_batch_body_bytes: usize,
    /// `CJ_INGESTION_MAX_BATCH_EVENTS`: events per batch request (default 1000).
    pub max_batch_events: usize,
    /// `CJ_INGESTION_STRICT_TYPES`: refuse event types outside the catalogue.
    pub strict_types: bool,
    /// `CJ_INGESTION_RATE_LIMIT`: requests per second per client; 0 disables the limit.
    pub rate_limit_per_sec: u32,
    /// `CJ_INGESTION_RATE_BURST`: bucket size of the per-client limit.
    pub rate_limit_burst: u32,
    /// `CJ_INGESTION_COMMIT_MAX_ROWS`: rows per group commit.
    pub commit_max_rows: usize,
    /// `CJ_INGESTION_COMMIT_CONCURRENCY`: group commits in flight at once.
    pub commit_concurrency: usize,
    /// `CJ_INGESTION_REQUEST_TIMEOUT`: the longest a client waits for its commit before a 503.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct EventHandlerConfig {
    /// `CJ_EVENTHANDLER_CONSUMER_GROUP` (default `event-handler`).
    pub consumer_group: String,
    /// `CJ_EVENTHANDLER_TOPICS`: comma-separated; default the three platform topics.
    pub topics: Vec<String>,
    /// `CJ_EVENTHANDLER_RETRY_DELAYS`: delays before each retry of a poison message (`0s,1s,2s`).
    pub retry_delays: Vec<Duration>,
    /// `CJ_EVENTHANDLER_MAX_BATCH`: messages applied per database transaction.
    pub max_batch: usize,
}

/// The time-series writer (SPEC §9): a consumer of `sensor-events` into `tsdb.sensor_readings`.
#[derive(Debug, Clone)]
pub struct TsdbConfig {
    /// `CJ_TSDB_CONSUMER_GROUP` (default `tsdb-writer`).
    pub consumer_group: String,
    /// `CJ_TSDB_TOPICS`: comma-separated; default the prefixed `sensor-events`.
    pub topics: Vec<String>,
    /// `CJ_TSDB_RETRY_DELAYS`: delays before each retry of a poison message (`0s,1s,2s`).
    pub retry_delays: Vec<Duration>,
    /// `CJ_TSDB_MAX_BATCH`: readings inserted per database transaction.
    pub max_batch: usize,
}

/// The action orchestrator (SPEC §10): rules, the consumer that records deliveries, and the
/// delivery worker with its retry schedule, rate limit, dedup window and circuit breaker.
#[derive(Debug, Clone)]
pub struct ActionsConfig {
    /// `CJ_ACTIONS_CONSUMER_GROUP` (default `action-orchestrator`).
    pub consumer_group: String,
    /// `CJ_ACTIONS_TOPICS`: comma-separated; default the three platform topics.
    pub topics: Vec<String>,
    /// `CJ_ACTIONS_CONSUMER_RETRY_DELAYS`: retries of a message that cannot be recorded (`0s,1s,2s`).
    pub consumer_retry_delays: Vec<Duration>,
    /// `CJ_ACTIONS_RETRY_DELAYS`: the wait before each webhook retry (`1s,2s,4s,8s,16s`); one
    /// attempt plus one per delay, then `failed`.
    pub retry_delays: Vec<Duration>,
    /// `CJ_ACTIONS_WEBHOOK_TIMEOUT`: per-request timeout when a rule sets none (30s).
    pub webhook_timeout: Duration,
    /// `CJ_ACTIONS_RATE_LIMIT`: deliveries per period across all endpoints, `N/period`
    /// (`10/1m`); `0` disables the limit.
    pub rate_limit: Option<(u32, Duration)>,
    /// `CJ_ACTIONS_DEDUP_WINDOW`: a rule's dedup window when it sets none (5m; 0s disables).
    pub dedup_window: Duration,
    /// `CJ_ACTIONS_BREAKER_THRESHOLD`: consecutive failures that open an endpoint's breaker (5).
    pub breaker_threshold: u32,
    /// `CJ_ACTIONS_BREAKER_COOLDOWN`: how long an open breaker short-circuits calls (5m).
    pub breaker_cooldown: Duration,
    /// `CJ_ACTIONS_WORKERS`: deliveries in flight at once in this process (1–256).
    pub workers: usize,
    /// `CJ_ACTIONS_POLL_INTERVAL`: how often the delivery worker looks for due deliveries when
    /// nothing woke it (1s).
    pub poll_interval: Duration,
    /// `CJ_ACTIONS_CLAIM_TIMEOUT`: a claimed delivery whose worker vanished is retried after this
    /// (must exceed the longest webhook timeout; 2m).
    pub claim_timeout: Duration,
    /// `CJ_ACTIONS_ALLOW_PRIVATE_TARGETS`: let webhooks reach loopback, private and link-local
    /// addresses (default false: a rule cannot be used to probe the platform's own network).
    pub allow_private_targets: bool,
}

/// Retention (SPEC §13, seed §8.3): how long data is kept, enforced by an hourly job per owning
/// service.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// `CJ_RETENTION_EVENTS`: the event store (and idempotency records), by ingest day (7d).
    pub events: Duration,
    /// `CJ_RETENTION_PROJECTIONS`: projections not updated for this long are removed (7d).
    pub projections: Duration,
    /// `CJ_RETENTION_TIMESERIES`: sensor readings (7d).
    pub timeseries: Duration,
    /// `CJ_RETENTION_DELIVERIES`: finished webhook deliveries (7d).
    pub deliveries: Duration,
    /// `CJ_RETENTION_INTERVAL`: how often each service runs its retention job (1h).
    pub interval: Duration,
    /// `CJ_RETENTION_ENABLED`: remove expired data at all (default true); the event store's
    /// daily partitions are created ahead either way.
    pub enabled: bool,
    /// `CJ_RETENTION_MAX_CLOCK_SKEW`: a retention round removes nothing when the host clock and
    /// the database's differ by more than this (60s; positive).
    pub max_clock_skew: Duration,
}

/// The per-client rate limit of the query and action APIs (ingestion has its own).
#[derive(Debug, Clone)]
pub struct ApiLimitConfig {
    /// `CJ_API_RATE_LIMIT`: requests per second per client IP; 0 (default) disables the limit.
    pub per_second: u32,
    /// `CJ_API_RATE_BURST`: bucket size; 0 means one second's worth.
    pub burst: u32,
}

/// What keeps a database that stops answering — without closing its connections — from holding
/// the platform (`infra::db`). Applied to every pooled connection; migrations run on a connection
/// of their own without the statement timeout (a migration may take long, and waits for another
/// instance's migration).
#[derive(Debug, Clone, Copy)]
pub struct DbTimeouts {
    /// `CJ_DB_STATEMENT_TIMEOUT`: PostgreSQL's `statement_timeout`, lock waits included (30s).
    pub statement: Duration,
    /// `CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT`: PostgreSQL's `idle_in_transaction_session_timeout`, so
    /// the session of a client that vanished mid-transaction gives its locks back (60s). Must
    /// exceed `CJ_KAFKA_MESSAGE_TIMEOUT`: the outbox processor keeps its claim open while the
    /// broker acknowledges.
    pub idle_in_transaction: Duration,
    /// `CJ_DB_RESPONSE_TIMEOUT`: how long the server may stay silent after the client sent it
    /// something before the connection is dropped (default: the statement timeout plus 5s; must
    /// exceed the statement timeout); `off` connects without the watching relay.
    pub response: Option<Duration>,
    /// `CJ_DB_TCP_KEEPALIVE`: idle time before TCP keepalive probes, on the platform's end and
    /// asked of the server for its end; probes every third of it, three of them (10s).
    pub keepalive: Duration,
}

impl DbTimeouts {
    fn parse(v: &Vars, message_timeout: Duration) -> Result<Self, ConfigError> {
        let statement = v.positive_duration("CJ_DB_STATEMENT_TIMEOUT", Duration::from_secs(30))?;
        let idle_var = "CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT";
        let idle_in_transaction = v.positive_duration(idle_var, Duration::from_secs(60))?;
        if idle_in_transaction <= message_timeout {
            return Err(Vars::err(
                idle_var,
                &humantime::format_duration(idle_in_transaction).to_string(),
                &format!(
                    "a duration longer than CJ_KAFKA_MESSAGE_TIMEOUT ({})",
                    humantime::format_duration(message_timeout)
                ),
            ));
        }
        let response = match v.raw(&["CJ_DB_RESPONSE_TIMEOUT"]) {
            Some((_, off)) if off.eq_ignore_ascii_case("off") => None,
            _ => {
                let var = "CJ_DB_RESPONSE_TIMEOUT";
                let d = v.duration(var, statement + Duration::from_secs(5))?;
                if d <= statement {
                    return Err(Vars::err(
                        var,
                        &humantime::format_duration(d).to_string(),
                        "off, or a duration longer than CJ_DB_STATEMENT_TIMEOUT",
                    ));
                }
                Some(d)
            }
        };
        let keepalive = v.duration("CJ_DB_TCP_KEEPALIVE", Duration::from_secs(10))?;
        if keepalive < Duration::from_secs(1) {
            return Err(Vars::err(
                "CJ_DB_TCP_KEEPALIVE",
                &humantime::format_duration(keepalive).to_string(),
                "a duration of at least 1s",
            ));
        }
        Ok(Self {
            statement,
            idle_in_transaction,
            response,
            keepalive,
        })
    }
}

/// What every HTTP port enforces on its clients (`infra::http::serve`), so slow or idle clients
/// cannot hold a port open; in `app` auth mode nothing in front of the platform does it.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// `CJ_HTTP_HEADER_TIMEOUT`: a request's headers must be complete within this long of the
    /// connection opening or of the request's first byte; the connection is closed otherwise (10s).
    pub header_timeout: Duration,
    /// `CJ_HTTP_BODY_TIMEOUT`: a request's whole body must arrive within this long of its headers;
    /// 408 otherwise (60s).
    pub body_timeout: Duration,
    /// `CJ_HTTP_IDLE_TIMEOUT`: a keep-alive connection without a request for this long is closed
    /// (120s: longer than a gateway keeps idle upstream connections — Traefik 90s — so the gateway
    /// closes first and never sends a request on a connection being closed).
    pub idle_timeout: Duration,
    /// `CJ_HTTP_MAX_CONNECTIONS`: open connections per port; further clients wait in the listen
    /// backlog until one closes (1024).
    pub max_connections: usize,
}

impl HttpLimits {
    fn parse(v: &Vars) -> Result<Self, ConfigError> {
        Ok(Self {
            header_timeout: v
                .positive_duration("CJ_HTTP_HEADER_TIMEOUT", Duration::from_secs(10))?,
            body_timeout: v.positive_duration("CJ_HTTP_BODY_TIMEOUT", Duration::from_secs(60))?,
            idle_timeout: v.positive_duration("CJ_HTTP_IDLE_TIMEOUT", Duration::from_secs(120))?,
            max_connections: v.ranged("CJ_HTTP_MAX_CONNECTIONS", 1024, 1, 1_000_000)?,
        })
    }
}

/// Where requests are authenticated (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Behind Traefik: the gateway calls `/internal/auth/verify` before forwarding.
    Gateway,
    /// Every API route checks the JWT itself (the default: secure without a gateway).
    App,
    /// No authentication; local development only.
    Off,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Gateway => "gateway",
            AuthMode::App => "app",
            AuthMode::Off => "off",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `CJ_AUTH_MODE`: gateway, app (default) or off.
    pub mode: AuthMode,
    /// `CJ_JWT_SECRET`: HS256 key, at least 32 characters.
    pub jwt_secret: Option<SecretString>,
    /// `CJ_JWT_PUBLIC_KEY_FILE`: an RS256 or ES256 public key (PEM).
    pub public_key_file: Option<std::path::PathBuf>,
    /// `CJ_JWT_ISSUER`: checked against `iss` when set.
    pub issuer: Option<String>,
    /// `CJ_JWT_AUDIENCE`: checked against `aud` when set.
    pub audience: Option<String>,
}

/// The largest packet MQTT allows (a remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// MQTT device ingestion (SPEC §12).
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// From `CJ_MQTT_URL` (`mqtt://host:port`; `off` disables MQTT ingestion).
    pub host: String,
    pub port: u16,
    /// `CJ_MQTT_USERNAME` (development default `cornjacket`).
    pub username: String,
    /// `CJ_MQTT_PASSWORD` (development default `cornjacket`).
    pub password: SecretString,
    /// `CJ_MQTT_ADMIN_USERNAME`: the broker's dynamic-security admin, used only by
    /// `cornjacket devices` (development default `cornjacket-admin`).
    pub admin_username: String,
    /// `CJ_MQTT_ADMIN_PASSWORD` (development default `cornjacket-admin`).
    pub admin_password: SecretString,
    /// `CJ_MQTT_TOPIC`: the subscription; its `+` segment is the device id.
    pub topic: String,
    /// `CJ_MQTT_CLIENT_ID`: stable per instance, so the persistent session survives restarts.
    pub client_id: String,
    /// `CJ_MQTT_INFLIGHT`: the client's own window of unacknowledged QoS 1 publishes (its error
    /// reports to devices). How many device messages the broker hands over unacknowledged is the
    /// broker's setting (Mosquitto `max_inflight_messages`, EMQX `mqtt.max_inflight`).
    pub inflight: u16,
    /// `CJ_MQTT_MAX_PACKET_BYTES`: the largest packet the client reads. It must be above the
    /// broker's own limit (Mosquitto `max_packet_size`, EMQX `mqtt.max_packet_size`): a packet
    /// the client cannot read drops the connection, and the broker hands it over again on every
    /// reconnect. Default: 1 MiB, or 64 KiB over `CJ_INGESTION_MAX_BODY_BYTES` if that is more.
    pub max_packet_bytes: usize,
    /// The largest payload taken in: `CJ_INGESTION_MAX_BODY_BYTES`, the HTTP body limit. A
    /// larger message is acknowledged, counted and reported to the device, never stored.
    pub max_payload_bytes: usize,
    /// `CJ_MQTT_QOS0_BACKLOG`: QoS 0 messages being committed at once; one arriving beyond it is
    /// dropped and counted (QoS 0 is at most once, and the broker does not wait for it). QoS 1
    /// messages are never dropped: the broker's in-flight window bounds them.
    pub qos0_backlog: usize,
}

impl MqttConfig {
    pub fn password_exposed(&self) -> String {
        self.password.expose_secret().to_string()
    }

    pub fn admin_password_exposed(&self) -> String {
        self.admin_password.expose_secret().to_string()
    }
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
    pub retention: RetentionConfig,
    pub api_limit: ApiLimitConfig,
    /// `None` when `CJ_MQTT_URL=off`.
    pub mqtt: Option<MqttConfig>,
    pub auth: AuthConfig,
    /// `CJ_SHUTDOWN_TIMEOUT`: the hard deadline for a graceful shutdown.
    pub shutdown_timeout: Duration,
}

/// Reads variables from a map so that parsing is testable without touching the process env.
/// Records every name it is asked for, so the list of variables comes from the parser itself.
struct Vars<'a>(
    &'a HashMap<String, String>,
    std::cell::RefCell<std::collections::BTreeSet<String>>,
);

impl Vars<'_> {
    fn raw(&self, names: &[&str]) -> Option<(String, String)> {
        self.1
            .borrow_mut()
            .extend(names.iter().map(|n| n.to_string()));
        names.iter().find_map(|n| {
            self.0
                .get(*n)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (n.to_string(), v.trim().to_string()))
        })
    }

    fn err(var: &str, value: &str, expected: &str) -> ConfigError {
        ConfigError {
            var: var.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.raw(&[name])
            .map(|(_, v)| v)
            .unwrap_or_else(|| default.to_string())
    }

    fn parse<T: FromStr>(&self, name: &str, default: T, expected: &str) -> Result<T, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => v.parse().map_err(|_| Self::err(&var, &v, expected)),
        }
    }

    fn ranged<T: FromStr + PartialOrd + Copy + std::fmt::Display>(
        &self,
        name: &str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        let expected = format!("an integer from {min} to {max}");
        let v = self.parse(name, default, &expected)?;
        if v < min || v > max {
            return Err(Self::err(name, &v.to_string(), &expected));
        }
        Ok(v)
    }

    fn port(&self, name: &str, default: u16) -> Result<u16, ConfigError> {
        self.parse(name, default, "a TCP port number from 0 to 65535")
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(Self::err(&var, &v, "true or false")),
            },
        }
    }

    fn duration(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => parse_duration(&v)
                .ok_or_else(|| Self::err(&var, &v, "a duration such as 500ms, 5s, 24h")),
        }
    }

    fn positive_duration(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration(name, default)?;
        if d.is_zero() {
            return Err(Self::err(name, "0", "a positive duration such as 5s"));
        }
        Ok(d)
    }

    fn list(&self, name: &str, default: &[String]) -> Result<Vec<String>, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default.to_vec()),
            Some((var, t)) => {
                let list: Vec<String> = t
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err(Self::err(&var, &t, "a comma-separated list of topic names"));
                }
                Ok(list)
            }
        }
    }

    fn durations(&self, name: &str, default: &[Duration]) -> Result<Vec<Duration>, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default.to_vec()),
            Some((var, t)) => t
                .split(',')
                .map(|s| parse_duration(s.trim()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Self::err(
                        &var,
                        &t,
                        "a comma-separated list of durations such as 0s,1s,2s",
                    )
                }),
        }
    }

    fn database_url(&self, names: &[&str], fallback: &str) -> Result<SecretString, ConfigError> {
        let Some((var, v)) = self.raw(names) else {
            return Ok(SecretString::from(fallback.to_string()));
        };
        validate_database_url(&v).map_err(|_| {
            Self::err(
                &var,
                &redact_url(&v),
                "a URL such as postgres://user:password@host:5432/db",
            )
        })?;
        Ok(SecretString::from(v))
    }
}

fn parse_duration(v: &str) -> Option<Duration> {
    humantime::parse_duration(v).ok()
}

fn validate_database_url(v: &str) -> Result<(), ()> {
    let rest = v
        .strip_prefix("postgres://")
        .or_else(|| v.strip_prefix("postgresql://"))
        .ok_or(())?;
    if rest.is_empty() {
        return Err(());
    }
    v.parse::<sqlx::postgres::PgConnectOptions>()
        .map(|_| ())
        .map_err(|_| ())
}

/// Hides the password of a database URL so it can appear in errors and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Config {
    /// Reads `.env` (when present) and the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_map(&vars)
    }

    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::parse(&Vars(map, Default::default()))
    }

    /// Every environment variable the configuration reads (with the seed's aliases), derived
    /// from the parser; deployment files are checked against it.
    pub fn known_variables() -> Vec<String> {
        let empty = HashMap::new();
        let v = Vars(&empty, Default::default());
        Self::parse(&v).expect("defaults are valid");
        v.1.into_inner().into_iter().collect()
    }

    fn parse(v: &Vars) -> Result<Self, ConfigError> {
        let log_format = match v.raw(&["CJ_LOG_FORMAT"]) {
            None => LogFormat::Json,
            Some((_, f)) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
            Some((_, f)) if f.eq_ignore_ascii_case("text") => LogFormat::Text,
            Some((var, f)) => return Err(Vars::err(&var, &f, "json or text")),
        };
        let log_level = v.string("CJ_LOG_LEVEL", "info");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(Vars::err(
                "CJ_LOG_LEVEL",
                &log_level,
                "a level (error, warn, info, debug, trace) or a tracing filter",
            ));
        }

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
        let databases = DatabaseUrls {
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
        };

        let brokers = v
            .raw(&["CJ_KAFKA_BROKERS", "CJ_REDPANDA_BROKERS"])
            .map(|(var, b)| {
                let ok = b.split(',').all(|hp| {
                    let hp = hp.trim();
                    hp.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                });
                if ok {
                    Ok(b)
                } else {
                    Err(Vars::err(&var, &b, "host:port[,host:port...]"))
                }
            })
            .transpose()?
            .unwrap_or_else(|| "localhost:9092".to_string());
        let topic_prefix = v.string("CJ_KAFKA_TOPIC_PREFIX", "");
        if !topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Vars::err(
                "CJ_KAFKA_TOPIC_PREFIX",
                &topic_prefix,
                "letters, digits, '.', '_' or '-'",
            ));
        }
        let topics = Topics::with_prefix(&topic_prefix);
        let kafka = KafkaConfig {
            brokers,
            partitions: v.ranged("CJ_KAFKA_PARTITIONS", 3, 1, 1024)?,
            retention: v.duration("CJ_KAFKA_RETENTION", Duration::from_secs(24 * 3600))?,
            linger_ms: v.ranged("CJ_KAFKA_PRODUCER_LINGER_MS", 5, 0, 10_000)?,
            fetch_wait_max_ms: v.ranged("CJ_KAFKA_FETCH_WAIT_MAX_MS", 10, 1, 10_000)?,
            message_timeout: v.duration("CJ_KAFKA_MESSAGE_TIMEOUT", Duration::from_secs(10))?,
            message_max_bytes: v.ranged(
                "CJ_KAFKA_MESSAGE_MAX_BYTES",
                1_000_000,
                1000,
                1_000_000_000,
            )?,
            topic_prefix,
            topics: topics.clone(),
        };

        let outbox = OutboxConfig {
            worker_count: v.ranged("CJ_OUTBOX_WORKER_COUNT", 4, 1, 16)?,
            batch_size: v.ranged("CJ_OUTBOX_BATCH_SIZE", 100, 1, 10_000)?,
            max_retries: v.ranged("CJ_OUTBOX_MAX_RETRIES", 5, 0, 1_000_000)?,
            poll_interval: v.duration("CJ_OUTBOX_POLL_INTERVAL", Duration::from_secs(5))?,
            enabled: v.bool("CJ_OUTBOX_ENABLED", true)?,
            bus_watch_interval: v
                .duration("CJ_OUTBOX_BUS_WATCH_INTERVAL", Duration::from_secs(2))?,
            sidecar_group: Some(v.string("CJ_AI_CONSUMER_GROUP", "ai-inference"))
                .filter(|g| !g.is_empty() && g != "off"),
        };
        if outbox.bus_watch_interval.is_zero() {
            return Err(Vars::err(
                "CJ_OUTBOX_BUS_WATCH_INTERVAL",
                "0",
                "a positive duration such as 2s",
            ));
        }
        if outbox.poll_interval.is_zero() {
            return Err(Vars::err(
                "CJ_OUTBOX_POLL_INTERVAL",
                "0",
                "a positive duration such as 5s",
            ));
        }

        let ingestion = IngestionConfig {
            max_body_bytes: v.ranged(
                "CJ_INGESTION_MAX_BODY_BYTES",
                64 * 1024,
                256,
                64 * 1024 * 1024,
            )?,
            max_batch_body_bytes: v.ranged(
                "CJ_INGESTION_MAX_BATCH_BODY_BYTES",
                16 * 1024 * 1024,
                1024,
                1024 * 1024 * 1024,
            )?,
            max_batch_events: v.ranged("CJ_INGESTION_MAX_BATCH_EVENTS", 1000, 1, 100_000)?,
            strict_types: v.bool("CJ_INGESTION_STRICT_TYPES", false)?,
            rate_limit_per_sec: v.ranged("CJ_INGESTION_RATE_LIMIT", 0, 0, 10_000_000)?,
            rate_limit_burst: v.ranged("CJ_INGESTION_RATE_BURST", 0, 0, 10_000_000)?,
            commit_max_rows: v.ranged("CJ_INGESTION_COMMIT_MAX_ROWS", 1000, 1, 100_000)?,
            commit_concurrency: v.ranged("CJ_INGESTION_COMMIT_CONCURRENCY", 4, 1, 64)?,
            request_timeout: v.duration("CJ_INGESTION_REQUEST_TIMEOUT", Duration::from_secs(10))?,
        };

        // An event admitted through the door must fit through the bus, or it would be accepted
        // and then never published (it would be quarantined, but the client was told 202).
        if ingestion.max_body_bytes + ENVELOPE_OVERHEAD > kafka.message_max_bytes {
            return Err(Vars::err(
                "CJ_INGESTION_MAX_BODY_BYTES",
                &ingestion.max_body_bytes.to_string(),
                &format!(
                    "at most CJ_KAFKA_MESSAGE_MAX_BYTES ({}) minus {ENVELOPE_OVERHEAD} bytes of \
                     envelope, so that every admitted event fits in a bus message; lower it or \
                     raise CJ_KAFKA_MESSAGE_MAX_BYTES (and the broker's limit)",
                    kafka.message_max_bytes
                ),
            ));
        }

        let all_topics: Vec<String> = topics.all().iter().map(|t| t.to_string()).collect();
        let poison_delays = [0, 1, 2].map(Duration::from_secs);
        let eventhandler = EventHandlerConfig {
            consumer_group: v.string("CJ_EVENTHANDLER_CONSUMER_GROUP", "event-handler"),
            topics: v.list("CJ_EVENTHANDLER_TOPICS", &all_topics)?,
            retry_delays: v.durations("CJ_EVENTHANDLER_RETRY_DELAYS", &poison_delays)?,
            max_batch: v.ranged("CJ_EVENTHANDLER_MAX_BATCH", 500, 1, 100_000)?,
        };
        let tsdb = TsdbConfig {
            consumer_group: v.string("CJ_TSDB_CONSUMER_GROUP", "tsdb-writer"),
            topics: v.list("CJ_TSDB_TOPICS", std::slice::from_ref(&topics.sensor))?,
            retry_delays: v.durations("CJ_TSDB_RETRY_DELAYS", &poison_delays)?,
            max_batch: v.ranged("CJ_TSDB_MAX_BATCH", 1000, 1, 100_000)?,
        };
        let rate_limit = match v.raw(&["CJ_ACTIONS_RATE_LIMIT"]) {
            None => Some((10, Duration::from_secs(60))),
            Some((_, r)) if r == "0" => None,
            Some((var, r)) => {
                let parsed = r.split_once('/').and_then(|(n, p)| {
                    let n = n.trim().parse::<u32>().ok().filter(|n| *n > 0)?;
                    let p = parse_duration(p.trim()).filter(|p| !p.is_zero())?;
                    Some((n, p))
                });
                Some(parsed.ok_or_else(|| {
                    Vars::err(&var, &r, "N/period such as 10/1m (or 0 for no limit)")
                })?)
            }
        };
        let actions = ActionsConfig {
            consumer_group: v.string("CJ_ACTIONS_CONSUMER_GROUP", "action-orchestrator"),
            topics: v.list("CJ_ACTIONS_TOPICS", &all_topics)?,
            consumer_retry_delays: v
                .durations("CJ_ACTIONS_CONSUMER_RETRY_DELAYS", &poison_delays)?,
            retry_delays: v.durations(
                "CJ_ACTIONS_RETRY_DELAYS",
                &[1, 2, 4, 8, 16].map(Duration::from_secs),
            )?,
            webhook_timeout: v
                .positive_duration("CJ_ACTIONS_WEBHOOK_TIMEOUT", Duration::from_secs(30))?,
            rate_limit,
            dedup_window: v.duration("CJ_ACTIONS_DEDUP_WINDOW", Duration::from_secs(300))?,
            breaker_threshold: v.ranged("CJ_ACTIONS_BREAKER_THRESHOLD", 5, 1, 1_000_000)?,
            breaker_cooldown: v
                .duration("CJ_ACTIONS_BREAKER_COOLDOWN", Duration::from_secs(300))?,
            workers: v.ranged("CJ_ACTIONS_WORKERS", 8, 1, 256)?,
            poll_interval: v
                .positive_duration("CJ_ACTIONS_POLL_INTERVAL", Duration::from_secs(1))?,
            claim_timeout: v
                .positive_duration("CJ_ACTIONS_CLAIM_TIMEOUT", Duration::from_secs(120))?,
            allow_private_targets: v.bool("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS", false)?,
        };
        let week = Duration::from_secs(7 * 24 * 3600);
        let retention = RetentionConfig {
            events: v.positive_duration("CJ_RETENTION_EVENTS", week)?,
            projections: v.positive_duration("CJ_RETENTION_PROJECTIONS", week)?,
            timeseries: v.positive_duration("CJ_RETENTION_TIMESERIES", week)?,
            deliveries: v.positive_duration("CJ_RETENTION_DELIVERIES", week)?,
            interval: v.positive_duration("CJ_RETENTION_INTERVAL", Duration::from_secs(3600))?,
            enabled: v.bool("CJ_RETENTION_ENABLED", true)?,
            max_clock_skew: v
                .positive_duration("CJ_RETENTION_MAX_CLOCK_SKEW", Duration::from_secs(60))?,
        };

        let ingestion_port = v.port("CJ_INGESTION_PORT", 8080)?;
        let mqtt = match v.raw(&["CJ_MQTT_URL"]) {
            Some((_, u))
                if matches!(u.to_ascii_lowercase().as_str(), "off" | "none" | "disabled") =>
            {
                None
            }
            other => {
                let (var, url) =
                    other.unwrap_or_else(|| ("CJ_MQTT_URL".into(), "mqtt://localhost:1883".into()));
                let expected = "mqtt://host:port, or off";
                let rest = url
                    .strip_prefix("mqtt://")
                    .or_else(|| url.strip_prefix("tcp://"))
                    .ok_or_else(|| Vars::err(&var, &url, expected))?;
                let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_string(),
                        p.parse::<u16>()
                            .map_err(|_| Vars::err(&var, &url, expected))?,
                    ),
                    None => (rest.trim_end_matches('/').to_string(), 1883),
                };
                if host.is_empty() {
                    return Err(Vars::err(&var, &url, expected));
                }
                let topic = v.string("CJ_MQTT_TOPIC", "$share/cornjacket/devices/+/events");
                if topic.split('/').filter(|s| *s == "+").count() != 1 || topic.contains('#') {
                    return Err(Vars::err(
                        "CJ_MQTT_TOPIC",
                        &topic,
                        "a filter with exactly one '+' (the device id) and no '#', e.g. $share/cornjacket/devices/+/events",
                    ));
                }
                let host_name = std::env::var("HOSTNAME")
                    .ok()
                    .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "local".into());
                Some(MqttConfig {
                    host,
                    port,
                    username: v.string("CJ_MQTT_USERNAME", "cornjacket"),
                    password: SecretString::from(v.string("CJ_MQTT_PASSWORD", "cornjacket")),
                    admin_username: v.string("CJ_MQTT_ADMIN_USERNAME", "cornjacket-admin"),
                    admin_password: SecretString::from(
                        v.string("CJ_MQTT_ADMIN_PASSWORD", "cornjacket-admin"),
                    ),
                    topic,
                    client_id: v.string(
                        "CJ_MQTT_CLIENT_ID",
                        &format!("cornjacket-{host_name}-{ingestion_port}"),
                    ),
                    inflight: v.ranged("CJ_MQTT_INFLIGHT", 1000, 1, 65_535)?,
                    max_packet_bytes: {
                        let least = ingestion.max_body_bytes + 1024;
                        let default = (1024 * 1024).max(ingestion.max_body_bytes + 64 * 1024);
                        let n =
                            v.ranged("CJ_MQTT_MAX_PACKET_BYTES", default, 1024, MQTT_MAX_PACKET)?;
                        if n < least {
                            return Err(Vars::err(
                                "CJ_MQTT_MAX_PACKET_BYTES",
                                &n.to_string(),
                                &format!(
                                    "at least CJ_INGESTION_MAX_BODY_BYTES plus 1 KiB ({least}), \
                                     and above the broker's packet limit"
                                ),
                            ));
                        }
                        n
                    },
                    max_payload_bytes: ingestion.max_body_bytes,
                    qos0_backlog: v.ranged("CJ_MQTT_QOS0_BACKLOG", 1000, 1, 1_000_000)?,
                })
            }
        };

        let mode = match v.raw(&["CJ_AUTH_MODE"]) {
            None => AuthMode::App,
            Some((var, m)) => match m.to_ascii_lowercase().as_str() {
                "gateway" => AuthMode::Gateway,
                "app" => AuthMode::App,
                "off" => AuthMode::Off,
                _ => return Err(Vars::err(&var, &m, "gateway, app or off")),
            },
        };
        let jwt_secret = match v.raw(&["CJ_JWT_SECRET"]) {
            Some((var, s)) if s.len() < 32 => {
                return Err(Vars::err(&var, "***", "a secret of at least 32 characters"));
            }
            other => other.map(|(_, s)| SecretString::from(s)),
        };
        let auth = AuthConfig {
            mode,
            jwt_secret,
            public_key_file: v.raw(&["CJ_JWT_PUBLIC_KEY_FILE"]).map(|(_, p)| p.into()),
            issuer: v.raw(&["CJ_JWT_ISSUER"]).map(|(_, s)| s),
            audience: v.raw(&["CJ_JWT_AUDIENCE"]).map(|(_, s)| s),
        };

        Ok(Self {
            log_level,
            log_format,
            bind_addr: v.parse(
                "CJ_BIND_ADDR",
                IpAddr::from([127, 0, 0, 1]),
                "an IP address such as 0.0.0.0",
            )?,
            ports: Ports {
                ingestion: ingestion_port,
                query: v.port("CJ_QUERY_PORT", 8081)?,
                actions: v.port("CJ_ACTIONS_PORT", 8082)?,
                actions_health: v.port("CJ_ACTIONS_HEALTH_PORT", 8083)?,
                eventhandler_health: v.port("CJ_EVENTHANDLER_HEALTH_PORT", 8084)?,
            },
            databases,
            db_max_connections: v.ranged("CJ_DB_MAX_CONNECTIONS", 16, 1, 1000)?,
            db_acquire_timeout: v.duration("CJ_DB_ACQUIRE_TIMEOUT", Duration::from_secs(3))?,
            db_timeouts: DbTimeouts::parse(v, kafka.message_timeout)?,
            http: HttpLimits::parse(v)?,
            kafka,
            outbox,
            ingestion,
            eventhandler,
            tsdb,
            actions,
            retention,
            api_limit: ApiLimitConfig {
                per_second: v.ranged("CJ_API_RATE_LIMIT", 0, 0, 10_000_000)?,
                burst: v.ranged("CJ_API_RATE_BURST", 0, 0, 10_000_000)?,
            },
            mqtt,
            auth,
            shutdown_timeout: v.duration("CJ_SHUTDOWN_TIMEOUT", Duration::from_secs(30))?,
        })
    }

    /// The database URL of a service, for connecting; never log it unredacted.
    pub fn database_url(&self, service: &str) -> &str {
        match service {
            "ingestion" => self.databases.ingestion.expose_secret(),
            "eventhandler" => self.databases.eventhandler.expose_secret(),
            "tsdb" => self.databases.tsdb.expose_secret(),
            "actions" => self.databases.actions.expose_secret(),
            _ => self.databases.query.expose_secret(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_map(&map)
    }

    #[test]
    fn defaults_are_valid() {
        let c = with(&[]).unwrap();
        assert_eq!(c.ports.ingestion, 8080);
        assert_eq!(c.ports.eventhandler_health, 8084);
        assert_eq!(c.kafka.brokers, "localhost:9092");
        assert_eq!(c.outbox.worker_count, 4);
        assert_eq!(c.outbox.batch_size, 100);
        assert_eq!(c.outbox.max_retries, 5);
        assert_eq!(c.outbox.poll_interval, Duration::from_secs(5));
        assert_eq!(c.kafka.retention, Duration::from_secs(86_400));
        assert_eq!(c.database_url("ingestion"), DEFAULT_DATABASE_URL);
        assert_eq!(c.kafka.topics.sensor, "sensor-events");
        let m = c.mqtt.unwrap();
        assert_eq!((m.host.as_str(), m.port), ("localhost", 1883));
        assert_eq!(m.topic, "$share/cornjacket/devices/+/events");
        assert_eq!(m.username, "cornjacket");
        assert_eq!(m.max_packet_bytes, 1024 * 1024);
        assert_eq!(m.max_payload_bytes, c.ingestion.max_body_bytes);
        assert_eq!(m.qos0_backlog, 1000);
        assert!(with(&[("CJ_MQTT_URL", "off")]).unwrap().mqtt.is_none());
        let a = &c.actions;
        assert_eq!(a.consumer_group, "action-orchestrator");
        assert_eq!(a.rate_limit, Some((10, Duration::from_secs(60))));
        assert_eq!(
            a.retry_delays,
            [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec()
        );
        assert_eq!(a.webhook_timeout, Duration::from_secs(30));
        assert_eq!(a.dedup_window, Duration::from_secs(300));
        assert_eq!(a.breaker_threshold, 5);
        assert_eq!(a.breaker_cooldown, Duration::from_secs(300));
        assert_eq!(c.tsdb.consumer_group, "tsdb-writer");
        assert_eq!(c.tsdb.topics, ["sensor-events"]);
        assert_eq!(c.retention.events, Duration::from_secs(7 * 86_400));
        assert_eq!(c.retention.interval, Duration::from_secs(3600));
        assert_eq!(c.retention.max_clock_skew, Duration::from_secs(60));
        let limited = with(&[("CJ_ACTIONS_RATE_LIMIT", "3/2s")]).unwrap();
        assert_eq!(
            limited.actions.rate_limit,
            Some((3, Duration::from_secs(2)))
        );
        let unlimited = with(&[("CJ_ACTIONS_RATE_LIMIT", "0")]).unwrap();
        assert_eq!(unlimited.actions.rate_limit, None);
    }

    #[test]
    fn each_malformed_variable_names_itself_and_the_expected_form() {
        let cases: &[(&str, &str, &str)] = &[
            ("CJ_LOG_FORMAT", "xml", "json or text"),
            ("CJ_LOG_LEVEL", "loud[", "tracing filter"),
            ("CJ_INGESTION_PORT", "80800", "TCP port"),
            ("CJ_QUERY_PORT", "abc", "TCP port"),
            ("CJ_ACTIONS_PORT", "-1", "TCP port"),
            ("CJ_ACTIONS_HEALTH_PORT", "x", "TCP port"),
            ("CJ_EVENTHANDLER_HEALTH_PORT", "1.5", "TCP port"),
            ("CJ_INGESTION_DATABASE_URL", "mysql://x", "postgres://"),
            ("INGESTION_DATABASE_URL", "not a url", "postgres://"),
            ("CJ_EVENTHANDLER_DATABASE_URL", "http://x", "postgres://"),
            ("CJ_QUERY_DATABASE_URL", "postgres://", "postgres://"),
            ("CJ_DATABASE_URL", "nope", "postgres://"),
            ("CJ_KAFKA_BROKERS", "localhost", "host:port"),
            ("CJ_REDPANDA_BROKERS", "a:b", "host:port"),
            ("CJ_KAFKA_PARTITIONS", "0", "from 1 to 1024"),
            ("CJ_KAFKA_RETENTION", "forever", "duration"),
            ("CJ_KAFKA_TOPIC_PREFIX", "a b", "letters"),
            ("CJ_KAFKA_FETCH_WAIT_MAX_MS", "0", "integer from 1"),
            ("CJ_OUTBOX_WORKER_COUNT", "0", "from 1 to 16"),
            ("CJ_OUTBOX_BATCH_SIZE", "ten", "integer"),
            ("CJ_OUTBOX_MAX_RETRIES", "-3", "integer"),
            ("CJ_OUTBOX_POLL_INTERVAL", "5", "duration"),
            ("CJ_OUTBOX_POLL_INTERVAL", "0s", "positive duration"),
            ("CJ_OUTBOX_ENABLED", "maybe", "true or false"),
            ("CJ_INGESTION_STRICT_TYPES", "sometimes", "true or false"),
            ("CJ_INGESTION_MAX_BODY_BYTES", "10", "integer from 256"),
            ("CJ_INGESTION_RATE_LIMIT", "fast", "integer"),
            ("CJ_EVENTHANDLER_RETRY_DELAYS", "1s,soon", "durations"),
            ("CJ_EVENTHANDLER_TOPICS", ",,", "comma-separated"),
            ("CJ_BIND_ADDR", "localhost", "IP address"),
            ("CJ_DB_MAX_CONNECTIONS", "0", "integer"),
            ("CJ_SHUTDOWN_TIMEOUT", "soon", "duration"),
            ("CJ_MQTT_URL", "http://broker", "mqtt://host:port"),
            ("CJ_MQTT_URL", "mqtt://broker:99999", "mqtt://host:port"),
            ("CJ_MQTT_TOPIC", "devices/#", "exactly one '+'"),
            ("CJ_MQTT_INFLIGHT", "0", "integer from 1"),
            (
                "CJ_MQTT_MAX_PACKET_BYTES",
                "2048",
                "at least CJ_INGESTION_MAX_BODY_BYTES",
            ),
            ("CJ_MQTT_QOS0_BACKLOG", "0", "integer from 1"),
            ("CJ_AUTH_MODE", "maybe", "gateway, app or off"),
            ("CJ_JWT_SECRET", "short", "at least 32 characters"),
            ("CJ_TSDB_DATABASE_URL", "mysql://x", "postgres://"),
            ("ACTIONS_DATABASE_URL", "nope", "postgres://"),
            ("CJ_TSDB_RETRY_DELAYS", "x", "durations"),
            ("CJ_ACTIONS_RETRY_DELAYS", "1s,,", "durations"),
            ("CJ_ACTIONS_RATE_LIMIT", "10", "N/period"),
            ("CJ_ACTIONS_RATE_LIMIT", "10/0s", "N/period"),
            ("CJ_ACTIONS_WEBHOOK_TIMEOUT", "0s", "positive duration"),
            ("CJ_ACTIONS_BREAKER_THRESHOLD", "0", "integer from 1"),
            ("CJ_ACTIONS_BREAKER_COOLDOWN", "later", "duration"),
            ("CJ_ACTIONS_WORKERS", "0", "integer from 1"),
            ("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS", "sure", "true or false"),
            ("CJ_API_RATE_LIMIT", "lots", "integer"),
            ("CJ_RETENTION_EVENTS", "0s", "positive duration"),
            ("CJ_RETENTION_INTERVAL", "hourly", "duration"),
            ("CJ_RETENTION_ENABLED", "perhaps", "true or false"),
            ("CJ_RETENTION_MAX_CLOCK_SKEW", "0s", "positive duration"),
            ("CJ_RETENTION_MAX_CLOCK_SKEW", "a bit", "duration"),
        ];
        for (var, value, expected) in cases {
            let err = with(&[(var, value)]).expect_err(var);
            assert_eq!(&err.var, var, "{var}");
            let msg = err.to_string();
            assert!(msg.contains(var), "{msg}");
            assert!(
                msg.contains(expected),
                "{var}: '{msg}' should mention '{expected}'"
            );
        }
    }

    #[test]
    fn database_url_errors_never_print_the_password() {
        let err = with(&[("CJ_INGESTION_DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn database_and_http_timeouts_have_defaults_and_are_checked_against_each_other() {
        let c = with(&[]).unwrap();
        let t = c.db_timeouts;
        assert_eq!(t.statement, Duration::from_secs(30));
        assert_eq!(t.idle_in_transaction, Duration::from_secs(60));
        assert_eq!(t.response, Some(Duration::from_secs(35)));
        assert_eq!(t.keepalive, Duration::from_secs(10));
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.body_timeout, Duration::from_secs(60));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.http.max_connections, 1024);
        let short = with(&[("CJ_DB_STATEMENT_TIMEOUT", "2s")]).unwrap();
        assert_eq!(short.db_timeouts.response, Some(Duration::from_secs(7)));
        let off = with(&[("CJ_DB_RESPONSE_TIMEOUT", "off")]).unwrap();
        assert_eq!(off.db_timeouts.response, None);

        let cases: &[(&str, &str, &str)] = &[
            ("CJ_DB_STATEMENT_TIMEOUT", "0s", "positive"),
            ("CJ_DB_STATEMENT_TIMEOUT", "soon", "duration"),
            (
                "CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT",
                "10s",
                "longer than CJ_KAFKA_MESSAGE_TIMEOUT (10s)",
            ),
            (
                "CJ_DB_RESPONSE_TIMEOUT",
                "30s",
                "longer than CJ_DB_STATEMENT_TIMEOUT",
            ),
            ("CJ_DB_RESPONSE_TIMEOUT", "never", "duration"),
            ("CJ_DB_TCP_KEEPALIVE", "500ms", "at least 1s"),
            ("CJ_HTTP_HEADER_TIMEOUT", "0s", "positive"),
            ("CJ_HTTP_BODY_TIMEOUT", "slow", "duration"),
            ("CJ_HTTP_IDLE_TIMEOUT", "0s", "positive"),
            ("CJ_HTTP_MAX_CONNECTIONS", "0", "integer from 1"),
        ];
        for (var, value, expected) in cases {
            let err = with(&[(var, value)]).expect_err(var);
            assert_eq!(&err.var, var);
            let msg = err.to_string();
            assert!(
                msg.contains(expected),
                "{var}: '{msg}' should mention '{expected}'"
            );
        }
    }

    #[test]
    fn seed_unprefixed_database_variables_are_accepted_and_prefixed_ones_win() {
        let c = with(&[("EVENTHANDLER_DATABASE_URL", "postgres://a:b@h:1/eh")]).unwrap();
        assert_eq!(c.database_url("eventhandler"), "postgres://a:b@h:1/eh");
        assert_eq!(c.database_url("ingestion"), DEFAULT_DATABASE_URL);
        let c = with(&[
            ("INGESTION_DATABASE_URL", "postgres://a:b@h:1/seed"),
            ("CJ_INGESTION_DATABASE_URL", "postgres://a:b@h:1/cj"),
        ])
        .unwrap();
        assert_eq!(c.database_url("ingestion"), "postgres://a:b@h:1/cj");
    }

    #[test]
    fn a_common_database_url_is_the_default_of_every_service() {
        let c = with(&[("CJ_DATABASE_URL", "postgres://a:b@h:1/all")]).unwrap();
        assert_eq!(c.database_url("query"), "postgres://a:b@h:1/all");
        assert_eq!(c.database_url("eventhandler"), "postgres://a:b@h:1/all");
    }

    #[test]
    fn redpanda_alias_and_topic_prefix() {
        let c = with(&[
            ("CJ_REDPANDA_BROKERS", "rp:9092"),
            ("CJ_KAFKA_TOPIC_PREFIX", "t1."),
        ])
        .unwrap();
        assert_eq!(c.kafka.brokers, "rp:9092");
        assert_eq!(c.kafka.topics.user, "t1.user-actions");
        assert_eq!(c.eventhandler.topics.len(), 3);
        assert!(c.eventhandler.topics.iter().all(|t| t.starts_with("t1.")));
    }

    #[test]
    fn known_variables_come_from_the_parser() {
        let vars = Config::known_variables();
        for v in [
            "CJ_INGESTION_PORT",
            "INGESTION_DATABASE_URL",
            "CJ_MQTT_TOPIC",
            "CJ_REDPANDA_BROKERS",
        ] {
            assert!(vars.iter().any(|x| x == v), "{v} in {vars:?}");
        }
    }

    #[test]
    fn redaction_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
