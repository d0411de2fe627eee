//! The overview: one sampler every two seconds (the health of every port, the ingest rate from
//! the ingestion port's counter, dead letters and breakers from the database), shared by every
//! viewer through a watch channel and pushed to pages as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ConsoleState;
use crate::config::ConsoleConfig;

const EVERY: Duration = Duration::from_secs(2);

/// One port's `/readyz`, flattened for display.
#[derive(Clone, Debug)]
pub struct PortHealth {
    pub name: &'static str,
    pub url: String,
    pub status: String,
    /// `check: detail` of every check that is not healthy.
    pub failing: Vec<String>,
    pub raw: Value,
}

#[derive(Clone, Debug)]
pub struct Lag {
    pub group: String,
    pub lag: Option<i64>,
    pub status: String,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sampled: bool,
    pub events_per_s: Option<f64>,
    pub accepted_total: Option<f64>,
    pub outbox_backlog: Option<i64>,
    pub outbox_oldest_s: Option<f64>,
    pub mqtt: Option<String>,
    pub lags: Vec<Lag>,
    pub dead_letters: Vec<(String, i64)>,
    pub deliveries_due: Option<i64>,
    pub deliveries_failed: Option<i64>,
    pub open_breakers: Vec<(String, String)>,
    pub ports: Vec<PortHealth>,
}

impl Snapshot {
    pub fn dead_letters_total(&self) -> i64 {
        self.dead_letters.iter().map(|(_, n)| n).sum()
    }
}

#[derive(Template)]
#[template(path = "console/overview_live.html")]
pub struct OverviewLive<'a> {
    pub s: &'a Snapshot,
}

pub fn spawn_sampler(
    pool: sqlx::PgPool,
    http: reqwest::Client,
    upstream: Arc<ConsoleConfig>,
    jobs: &crate::infra::jobs::Jobs,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    jobs.spawn(async move {
        let mut last: Option<(Instant, f64)> = None;
        loop {
            let mut s = sample(&pool, &http, &upstream).await;
            if let Some(total) = s.accepted_total {
                let now = Instant::now();
                if let Some((t, prev)) = last {
                    let dt = now.duration_since(t).as_secs_f64();
                    if dt > 0.0 && total >= prev {
                        s.events_per_s = Some((total - prev) / dt);
                    }
                }
                last = Some((now, total));
            }
            tx.send_replace(Arc::new(s));
            if stop
                .run_until_cancelled(tokio::time::sleep(EVERY))
                .await
                .is_none()
            {
                break;
            }
        }
    });
    rx
}

async fn sample(pool: &sqlx::PgPool, http: &reqwest::Client, u: &ConsoleConfig) -> Snapshot {
    let targets: [(&'static str, &str); 5] = [
        ("ingestion", &u.ingestion_url),
        ("query", &u.query_url),
        ("actions", &u.actions_health_url),
        ("event handler + tsdb-writer", &u.eventhandler_url),
        ("ai-inference", &u.sidecar_url),
    ];
    let ports = futures::future::join_all(
        targets
            .iter()
            .map(|(name, base)| port_health(http, name, base)),
    )
    .await;
    let mut s = Snapshot {
        sampled: true,
        ..Default::default()
    };
    for p in &ports {
        if let Some(checks) = p.raw.get("checks") {
            collect(&mut s, checks);
        }
    }
    s.ports = ports;
    s.accepted_total = accepted_total(http, &u.ingestion_url).await;
    s.dead_letters = dead_letters(pool).await;
    if let Ok(rows) = sqlx::query_as::<_, (String, String)>(
        "SELECT endpoint, coalesce(to_char(open_until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), '')
           FROM actions.endpoint_health WHERE state <> 'closed' ORDER BY endpoint LIMIT 50",
    )
    .fetch_all(pool)
    .await
    {
        s.open_breakers = rows;
    }
    if let Ok(n) = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM actions.deliveries WHERE status = 'failed'",
    )
    .fetch_one(pool)
    .await
    {
        s.deliveries_failed = Some(n);
    }
    s
}

/// Consumer lag, outbox and MQTT figures from the health checks' details, wherever they are
/// nested (the tsdb-writer reports inside the event handler's port).
fn collect(s: &mut Snapshot, checks: &Value) {
    let Some(map) = checks.as_object() else {
        return;
    };
    for (name, check) in map {
        if let Some(group) = check.get("group").and_then(Value::as_str) {
            s.lags.push(Lag {
                group: group.to_string(),
                lag: check.get("lag").and_then(Value::as_i64),
                status: status_of(check),
            });
        }
        match name.as_str() {
            "outbox" => {
                s.outbox_backlog = check.get("backlog").and_then(Value::as_i64);
                s.outbox_oldest_s = check.get("oldest_age_seconds").and_then(Value::as_f64);
            }
            "mqtt" => {
                let connected = check.get("connected").and_then(Value::as_bool);
                s.mqtt = Some(match connected {
                    Some(true) => "connected".into(),
                    Some(false) => "disconnected".into(),
                    None => status_of(check),
                });
            }
            "deliveries" => s.deliveries_due = check.get("due").and_then(Value::as_i64),
            _ => {}
        }
        if check.get("checks").is_some() {
            collect(s, &check["checks"]);
        } else if check.get("status").is_some() && check.as_object().is_some_and(|o| o.len() > 1) {
            // A nested service report (the tsdb-writer's) is a map of checks plus its status.
            let nested: serde_json::Map<String, Value> = check
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.is_object())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !nested.is_empty() {
                collect(s, &Value::Object(nested));
            }
        }
    }
}

fn status_of(v: &Value) -> String {
    v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string()
}

async fn port_health(http: &reqwest::Client, name: &'static str, base: &str) -> PortHealth {
    let url = format!("{base}/readyz");
    let (status, raw) = match http.get(&url).send().await {
        Ok(r) => match r.json::<Value>().await {
            Ok(v) => (status_of(&v), v),
            Err(e) => ("unreachable".into(), Value::String(e.to_string())),
        },
        Err(e) => ("unreachable".into(), Value::String(short(&e))),
    };
    let mut failing = Vec::new();
    failing_checks(&raw, "", &mut failing);
    if let Value::String(e) = &raw {
        failing.push(e.clone());
    }
    PortHealth {
        name,
        url: base.to_string(),
        status,
        failing,
        raw,
    }
}

fn short(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}

fn failing_checks(v: &Value, prefix: &str, out: &mut Vec<String>) {
    let Some(checks) = v
        .get("checks")
        .and_then(Value::as_object)
        .or_else(|| (!prefix.is_empty()).then(|| v.as_object()).flatten())
    else {
        return;
    };
    for (name, c) in checks {
        if !c.is_object() {
            continue;
        }
        let status = status_of(c);
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if status != "healthy" && status != "unknown" {
            let detail = c
                .get("error")
                .or_else(|| c.get("last_error").filter(|e| !e.is_null()))
                .map(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string())
                })
                .unwrap_or_else(|| status.clone());
            out.push(format!("{path}: {detail}"));
        }
        if c.get("checks").is_some() {
            failing_checks(c, &path, out);
        }
    }
}

/// The ingestion port's `cj_events_accepted_total`, summed over sources (HTTP and MQTT).
async fn accepted_total(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut sum = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("cj_events_accepted_total") {
            let v = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Pending dead letters per consumer; a consumer whose table does not exist yet (its service
/// has not migrated, or no sidecar runs) is left out.
async fn dead_letters(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (name, table) in super::pages::DLQ_TABLES {
        let sql = format!("SELECT count(*) FROM {table} WHERE status IN ('pending', 'replaying')");
        if let Ok(n) = sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await {
            out.push((name.to_string(), n));
        }
    }
    out
}

/// `GET /console/live/overview`: the overview's live part, re-rendered on every sample.
pub async fn live(
    State(s): State<ConsoleState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = s.overview.clone();
    let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let snap = rx.borrow_and_update().clone();
        let html = OverviewLive { s: &snap }
            .render()
            .unwrap_or_else(|e| format!("<p>render failed: {e}</p>"));
        Some((
            Ok(Event::default().event("overview").data(html)),
            (rx, false),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
