//! What every service shares: retention windows, API rate limits, database and HTTP timeouts,
//! and authentication.

use std::time::Duration;

use secrecy::SecretString;

use super::ConfigError;
use super::vars::Vars;

/// Retention (SPEC §13, seed §8.3): how long data is kept, enforced by an hourly job per owning
/// service.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// `CJ_RETENTION_EVENTS`: the event store (and idempotency records), by ingest day (7d).
    pub events: Duration,
    /// `CJ_RETENTION_PROJECTIONS`: projections not updated for this long are removed (7d).
    pub projections: Duration,
    /// `CJ_RETENTION_TIMESERIES`: raw sensor readings (7d).
    pub timeseries: Duration,
    /// `CJ_RETENTION_ROLLUP_1M`: the 1-minute rollups of readings (30d).
    pub rollup_1m: Duration,
    /// `CJ_RETENTION_ROLLUP_1H`: the 1-hour rollups of readings (400d).
    pub rollup_1h: Duration,
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

impl RetentionConfig {
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
        let day = Duration::from_secs(24 * 3600);
        let week = 7 * day;
        Ok(RetentionConfig {
            events: v.positive_duration("CJ_RETENTION_EVENTS", week)?,
            projections: v.positive_duration("CJ_RETENTION_PROJECTIONS", week)?,
            timeseries: v.positive_duration("CJ_RETENTION_TIMESERIES", week)?,
            rollup_1m: v.positive_duration("CJ_RETENTION_ROLLUP_1M", 30 * day)?,
            rollup_1h: v.positive_duration("CJ_RETENTION_ROLLUP_1H", 400 * day)?,
            deliveries: v.positive_duration("CJ_RETENTION_DELIVERIES", week)?,
            interval: v.positive_duration("CJ_RETENTION_INTERVAL", Duration::from_secs(3600))?,
            enabled: v.bool("CJ_RETENTION_ENABLED", true)?,
            max_clock_skew: v
                .positive_duration("CJ_RETENTION_MAX_CLOCK_SKEW", Duration::from_secs(60))?,
        })
    }
}

/// The per-client rate limit of the query and action APIs (ingestion has its own).
#[derive(Debug, Clone)]
pub struct ApiLimitConfig {
    /// `CJ_API_RATE_LIMIT`: requests per second per client IP; 0 (default) disables the limit.
    pub per_second: u32,
    /// `CJ_API_RATE_BURST`: bucket size; 0 means one second's worth.
    pub burst: u32,
    /// `CJ_TRUSTED_PROXIES`: comma-separated addresses or CIDR networks of the proxies in front
    /// of the app (Traefik). A request from one of them is limited by the client its
    /// `X-Forwarded-For` names (the rightmost address that is not itself a trusted proxy);
    /// any other request by its peer address, whatever it claims. Default: none.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl ApiLimitConfig {
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
        Ok(ApiLimitConfig {
            per_second: v.ranged("CJ_API_RATE_LIMIT", 0, 0, 10_000_000)?,
            burst: v.ranged("CJ_API_RATE_BURST", 0, 0, 10_000_000)?,
            trusted_proxies: v.networks("CJ_TRUSTED_PROXIES")?,
        })
    }
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
    pub(super) fn parse(v: &Vars, message_timeout: Duration) -> Result<Self, ConfigError> {
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
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
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

impl AuthConfig {
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
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
        Ok(AuthConfig {
            mode,
            jwt_secret,
            public_key_file: v.raw(&["CJ_JWT_PUBLIC_KEY_FILE"]).map(|(_, p)| p.into()),
            issuer: v.raw(&["CJ_JWT_ISSUER"]).map(|(_, s)| s),
            audience: v.raw(&["CJ_JWT_AUDIENCE"]).map(|(_, s)| s),
        })
    }
}
