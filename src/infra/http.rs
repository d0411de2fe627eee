//! HTTP plumbing shared by every port: health reports, the metrics endpoint, serving with
//! graceful shutdown, error answers, route tables, and the per-client rate limit.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Value, json};

use super::telemetry;

mod error;
pub mod routes;
mod server;
pub use error::{CODES, DbFailure, code_of, coded, error_body, internal, invalid, unavailable};
pub use routes::Route;
pub(crate) use routes::{concat_routes, routes};
pub use server::serve;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

/// One line of a health report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub status: Status,
    #[serde(flatten)]
    pub detail: Value,
}

impl Check {
    pub fn new(status: Status, detail: Value) -> Self {
        Self { status, detail }
    }
    pub fn healthy(detail: Value) -> Self {
        Self::new(Status::Healthy, detail)
    }
    /// Several checks as one line: the worst status, each check's detail under its name.
    pub fn combine(checks: Vec<(&str, Check)>) -> Self {
        let status = checks
            .iter()
            .map(|(_, c)| c.status)
            .max()
            .unwrap_or(Status::Healthy);
        let detail: serde_json::Map<String, Value> = checks
            .into_iter()
            .map(|(k, c)| {
                (
                    k.to_string(),
                    serde_json::to_value(c).unwrap_or(Value::Null),
                )
            })
            .collect();
        Self::new(status, Value::Object(detail))
    }

    pub fn from_ping(r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Self::healthy(json!({})),
            Err(e) => Self::new(Status::Unhealthy, json!({ "error": e })),
        }
    }
}

type CheckFuture = futures::future::BoxFuture<'static, Check>;
type CheckFn = std::sync::Arc<dyn Fn() -> CheckFuture + Send + Sync>;
type Published = Vec<(u16, &'static str, CheckFn)>;

/// Checks published by services that run without a port of their own (because another service
/// of the process serves the same port, SPEC §2: the tsdb-writer beside the event handler on
/// 8084). The service serving that port adds them to its `/health`. The dead letters of every
/// consumer on a port are published here too, so that the port's DLQ API answers for each.
#[derive(Clone, Default)]
pub struct HealthBoard(
    std::sync::Arc<std::sync::Mutex<Published>>,
    std::sync::Arc<std::sync::Mutex<Vec<(u16, crate::infra::dlq::Owner)>>>,
);

impl HealthBoard {
    pub fn register<F, Fut>(&self, port: u16, name: &'static str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Check> + Send + 'static,
    {
        let f: CheckFn = std::sync::Arc::new(move || Box::pin(check()));
        self.0.lock().expect("board lock").push((port, name, f));
    }

    pub fn register_dead_letters(&self, port: u16, owner: crate::infra::dlq::Owner) {
        self.1.lock().expect("board lock").push((port, owner));
    }

    /// The dead letters published for a port under `name`.
    pub fn dead_letters(&self, port: u16, name: &str) -> Option<crate::infra::dlq::Owner> {
        self.1
            .lock()
            .expect("board lock")
            .iter()
            .find(|(p, o)| *p == port && o.name == name)
            .map(|(_, o)| o.clone())
    }

    /// The published checks for a port, evaluated now.
    pub async fn checks(&self, port: u16) -> Vec<(&'static str, Check)> {
        let fs: Vec<_> = self
            .0
            .lock()
            .expect("board lock")
            .iter()
            .filter(|(p, _, _)| *p == port)
            .map(|(_, n, f)| (*n, f.clone()))
            .collect();
        let mut out = Vec::with_capacity(fs.len());
        for (name, f) in fs {
            out.push((name, f().await));
        }
        out
    }
}

/// `{"status": worst-of-checks, "checks": {...}}`; 503 when unhealthy (SPEC §13).
pub fn health_response(checks: Vec<(&str, Check)>) -> Response {
    let status = checks
        .iter()
        .map(|(_, c)| c.status)
        .max()
        .unwrap_or(Status::Healthy);
    let code = if status == Status::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let checks: serde_json::Map<String, Value> = checks
        .into_iter()
        .map(|(k, c)| {
            (
                k.to_string(),
                serde_json::to_value(c).unwrap_or(Value::Null),
            )
        })
        .collect();
    (code, Json(json!({ "status": status, "checks": checks }))).into_response()
}

/// `GET /livez`: the process is running and its runtime answers — no dependency is asked, so a
/// database or broker outage never makes an orchestrator restart a healthy process (that is
/// `/readyz`'s job: take it out of traffic until it recovers).
pub async fn livez() -> Response {
    (StatusCode::OK, Json(json!({ "status": "alive" }))).into_response()
}

/// `GET /metrics` in Prometheus text format; every port renders the process-wide registry.
pub fn metrics_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        "/metrics",
        get(|| async {
            (
                [("content-type", "text/plain; version=0.0.4")],
                telemetry::render_metrics(),
            )
        }),
    )
}

/// Percent-encodes everything but unreserved characters and `/`, for the console's own paths
/// and queries in a `Location` or a link (a few lines; no crate for it).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a request declares a JSON body (`application/json` or `application/*+json`).
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

/// A per-client (IP) request rate limit for an API port (SPEC §11: rate limits per client in
/// the gateway and in the app). `None` when configured off.
#[derive(Clone)]
pub struct ClientLimit {
    limiter: std::sync::Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    trusted: std::sync::Arc<[ipnet::IpNet]>,
}

/// The client a request counts against: its peer, unless the peer is a trusted proxy, in which
/// case the rightmost `X-Forwarded-For` address that is not itself trusted (each proxy appends
/// the address it saw, so everything left of that could be forged by the client). Behind a
/// proxy that is not trusted, or with no usable header, the peer.
pub fn client_ip(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

impl ClientLimit {
    /// `per_second` 0 turns the limit off; `burst` 0 means one second's worth.
    pub fn new(
        per_second: u32,
        burst: u32,
        trusted_proxies: &[ipnet::IpNet],
        jobs: &crate::infra::jobs::Jobs,
    ) -> Option<Self> {
        let rate = std::num::NonZeroU32::new(per_second)?;
        let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
        let limiter = std::sync::Arc::new(governor::RateLimiter::keyed(
            governor::Quota::per_second(rate).allow_burst(burst),
        ));
        // Forget idle clients so the limiter's memory stays bounded.
        let (l, shutdown) = (limiter.clone(), jobs.shutdown.clone());
        jobs.spawn(async move {
            while shutdown
                .run_until_cancelled(tokio::time::sleep(Duration::from_secs(60)))
                .await
                .is_some()
            {
                l.retain_recent();
            }
        });
        Some(Self {
            limiter,
            trusted: trusted_proxies.into(),
        })
    }

    /// Middleware: 429 with `Retry-After` once a client is over its rate.
    pub async fn check(
        axum::extract::State(limit): axum::extract::State<Self>,
        axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
        req: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> Response {
        let client = client_ip(peer.ip(), req.headers(), &limit.trusted);
        if let Err(not_until) = limit.limiter.check_key(&client) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let secs = wait.as_secs().max(1);
            metrics::counter!("cj_http_rate_limited_total").increment(1);
            let mut r = error_body(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit exceeded; retry after {secs} s"),
                json!([]),
            );
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
            return r;
        }
        next.run(req).await
    }
}

/// Adds the per-client limit to a router when one is configured.
pub fn limited<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    limit: Option<ClientLimit>,
) -> Router<S> {
    match limit {
        Some(l) => router.layer(axum::middleware::from_fn_with_state(l, ClientLimit::check)),
        None => router,
    }
}

/// The fallback for routes that do not exist, so clients get JSON and not an empty 404.
pub async fn not_found() -> Response {
    error_body(StatusCode::NOT_FOUND, "no such route", json!([]))
}

#[cfg(test)]
mod client_ip_tests {
    use super::client_ip;
    use axum::http::HeaderMap;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_proxy_may_name_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "10.1.2.3".parse().unwrap());
        // From Traefik: the rightmost untrusted hop (the client's forged 6.6.6.6 is left of it).
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &trusted), ip("203.0.113.7"));
        // From anyone else the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        // Nothing trusted configured: always the peer.
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &[]), ip("10.0.0.5"));
        // Every hop trusted: the leftmost; no usable header: the peer.
        let mut inner = HeaderMap::new();
        inner.insert("x-forwarded-for", "127.0.0.1, 10.9.9.9".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.5"), &inner, &trusted), ip("127.0.0.1"));
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.5"), &junk, &trusted), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.5"), &HeaderMap::new(), &trusted),
            ip("10.0.0.5")
        );
    }
}
