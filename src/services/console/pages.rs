//! The pages: one per question an operator has. Reads are SQL over the read side of every
//! schema; actions go through the owning service's HTTP API.

use std::collections::HashMap;
use std::fmt::Write as _;

use askama::Template;
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ConsoleState;
use super::error::ConsoleError;
use super::overview::OverviewLive;
use super::session::Session;
use crate::infra::dlq;

/// Every consumer's dead-letter table, by the name its DLQ API uses.
pub const DLQ_TABLES: [(&str, &str); 4] = [
    ("eventhandler", "eventhandler.dlq"),
    ("tsdb", "tsdb.dlq"),
    ("actions", "actions.dlq"),
    ("ai", "ai.dlq"),
];

/// What every page's frame needs.
pub struct Frame {
    pub title: String,
    pub nav: &'static str,
    pub subject: String,
    pub csrf: String,
    pub can_act: bool,
    pub auth_off: bool,
}

pub fn frame(s: &ConsoleState, session: &Session, title: &str, nav: &'static str) -> Frame {
    Frame {
        title: title.to_string(),
        nav,
        subject: session.subject.clone(),
        csrf: session.csrf.clone(),
        can_act: session.can_act,
        auth_off: s.auth.mode == crate::config::AuthMode::Off,
    }
}

pub fn html(t: impl Template) -> Result<Response, ConsoleError> {
    Ok(Html(t.render()?).into_response())
}

// ---------------------------------------------------------------- overview

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage<'a> {
    f: Frame,
    live: OverviewLive<'a>,
}

pub async fn overview(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Result<Response, ConsoleError> {
    let snap = s.overview.borrow().clone();
    html(OverviewPage {
        f: frame(&s, &session, "Overview", "overview"),
        live: OverviewLive { s: &snap },
    })
}

// ---------------------------------------------------------------- devices

pub const PAGE: i64 = 50;

#[derive(Deserialize)]
pub struct DevicesQuery {
    #[serde(default)]
    q: String,
    /// Keyset paging: the last device id of the previous page.
    after: Option<String>,
}

pub struct DeviceRow {
    pub id: String,
    pub value: String,
    pub age: String,
    pub stale: bool,
    pub inactive: bool,
    /// SVG polyline points of the last hour, empty when no reading.
    pub spark: String,
}

#[derive(Template)]
#[template(path = "console/devices.html")]
struct DevicesPage {
    f: Frame,
    q: String,
    rows: Vec<DeviceRow>,
    next: Option<String>,
    total: i64,
}

/// A reading older than this shows the stale badge even before the inactivity monitor says so.
const STALE_S: i64 = 600;

/// The quantity a device's sparkline shows: `value`, or its first key.
fn main_key(state: &Value) -> Option<String> {
    if state.get("value").is_some_and(|v| !v.is_null()) {
        return Some("value".into());
    }
    state
        .get("values")
        .and_then(Value::as_object)
        .and_then(|m| m.keys().min().cloned())
}

/// `21.5 celsius` or `humidity 40.2 %, temperature 21.5 celsius`.
pub fn describe(state: &Value) -> String {
    let one = |v: &Value, unit: &Value| {
        let mut s = match v.as_f64() {
            Some(n) => format!("{}", (n * 1000.0).round() / 1000.0),
            None => v.to_string(),
        };
        if let Some(u) = unit.as_str() {
            s.push(' ');
            s.push_str(u);
        }
        s
    };
    if let Some(v) = state.get("value").filter(|v| !v.is_null()) {
        return one(v, state.get("unit").unwrap_or(&Value::Null));
    }
    match state.get("values").and_then(Value::as_object) {
        Some(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            keys.iter()
                .map(|k| {
                    let q = &m[*k];
                    format!(
                        "{k} {}",
                        one(
                            q.get("value").unwrap_or(&Value::Null),
                            q.get("unit").unwrap_or(&Value::Null)
                        )
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        None => "—".into(),
    }
}

pub fn age(seconds: i64) -> String {
    match seconds {
        s if s < 0 => "just now".into(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// `%` and `_` in a search are literal.
fn like_escape(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 2);
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub async fn devices(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(dq): Query<DevicesQuery>,
) -> Result<Response, ConsoleError> {
    let q = dq.q.trim().chars().take(200).collect::<String>();
    let pattern = format!("%{}%", like_escape(&q));
    let after = dq.after.unwrap_or_default();
    let rows: Vec<(String, Value, Option<String>)> = sqlx::query_as(
        "SELECT p.aggregate_id, p.state, a.state
           FROM eventhandler.projections p
           LEFT JOIN ingestion.device_activity a ON a.device_id = p.aggregate_id
          WHERE p.projection_type = 'sensor_state'
            AND ($4 = '' OR p.aggregate_id ILIKE $1) AND p.aggregate_id > $2
          ORDER BY p.aggregate_id
          LIMIT $3",
    )
    .bind(&pattern)
    .bind(&after)
    .bind(PAGE + 1)
    .bind(&q)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    // Without a search, no ILIKE: an index-only count (ILIKE costs ~1 µs a row, 8 ms at 10,000).
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM eventhandler.projections
          WHERE projection_type = 'sensor_state' AND ($1 = '' OR aggregate_id ILIKE $2)",
    )
    .bind(&q)
    .bind(&pattern)
    .fetch_one(&s.pool)
    .await
    .or_else(|e| missing_is_empty(e).map(|_: Vec<()>| 0))?;
    let more = rows.len() as i64 > PAGE;
    let rows = &rows[..rows.len().min(PAGE as usize)];
    let now = s.clock.now();
    let keys: Vec<(String, String)> = rows
        .iter()
        .filter_map(|(id, st, _)| main_key(st).map(|k| (id.clone(), k)))
        .collect();
    let sparks = sparklines(&s.pool, &keys, now).await?;
    let out = rows
        .iter()
        .map(|(id, st, activity)| {
            let seen = st
                .get("event_time")
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| (now - t.with_timezone(&Utc)).num_seconds());
            let inactive = activity.as_deref() == Some("inactive");
            DeviceRow {
                id: id.clone(),
                value: describe(st),
                age: seen.map(age).unwrap_or_else(|| "—".into()),
                stale: inactive || seen.is_none_or(|a| a > STALE_S),
                inactive,
                spark: sparks.get(id).cloned().unwrap_or_default(),
            }
        })
        .collect();
    html(DevicesPage {
        f: frame(&s, &session, "Devices", "devices"),
        next: more.then(|| rows.last().map(|r| r.0.clone())).flatten(),
        q,
        rows: out,
        total,
    })
}

/// A table another service owns and has not created yet holds nothing.
pub fn missing_is_empty<T>(e: sqlx::Error) -> Result<Vec<T>, ConsoleError> {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        _ => Err(e.into()),
    }
}

/// Last hour of each device's main quantity from the 1-minute rollups, as SVG points in a
/// 120×24 box: drawn by the server, so a page of fifty devices needs no script and one query.
async fn sparklines(
    pool: &sqlx::PgPool,
    keys: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<HashMap<String, String>, ConsoleError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (devices, ks): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
    let since = now - chrono::Duration::hours(1);
    // LATERAL: one primary-key range scan per device. As a plain join the planner may hash the
    // fifty keys against the whole table (a million rows in `make bench`'s console row).
    let rows: Vec<(String, DateTime<Utc>, f64)> = sqlx::query_as(
        "SELECT w.d, r.bucket, r.sum / r.count
           FROM unnest($1::text[], $2::text[]) AS w(d, k)
           CROSS JOIN LATERAL (
                SELECT bucket, sum, count FROM tsdb.sensor_rollups_1m
                 WHERE device_id = w.d AND key = w.k AND bucket >= $3
                 ORDER BY bucket) AS r
          ORDER BY w.d, r.bucket",
    )
    .bind(&devices)
    .bind(&ks)
    .bind(since)
    .fetch_all(pool)
    .await
    .or_else(missing_is_empty)?;
    let mut by: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for (d, t, v) in rows {
        let x = (t - since).num_seconds() as f64 / 3600.0;
        by.entry(d).or_default().push((x, v));
    }
    Ok(by
        .into_iter()
        .map(|(d, pts)| {
            let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(l, h), (_, v)| {
                (l.min(*v), h.max(*v))
            });
            let span = if hi > lo { hi - lo } else { 1.0 };
            let mut s = String::new();
            for (x, v) in &pts {
                let _ = write!(s, "{:.1},{:.1} ", x * 120.0, 22.0 - (v - lo) / span * 20.0);
            }
            (d, s.trim_end().to_string())
        })
        .collect())
}

// ---------------------------------------------------------------- device detail

pub struct EventRow {
    pub time: String,
    pub event_type: String,
    pub payload: String,
}

pub struct ModelRow {
    pub key: String,
    pub model: String,
    pub readings: i64,
    pub mean: String,
    pub stddev: String,
    pub updated: String,
}

#[derive(Template)]
#[template(path = "console/device.html")]
struct DevicePage {
    f: Frame,
    id: String,
    value: String,
    keys: Vec<String>,
    events: Vec<EventRow>,
    models: Vec<ModelRow>,
    state: String,
}

pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub async fn device(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let state: Option<Value> = sqlx::query_scalar(
        "SELECT state FROM eventhandler.projections
          WHERE projection_type = 'sensor_state' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_optional(&s.pool)
    .await?;
    let Some(state) = state else {
        return Err(ConsoleError::NotFound(format!(
            "no device {id:?} has reported a reading"
        )));
    };
    let mut keys: Vec<String> = match state.get("values").and_then(Value::as_object) {
        Some(m) => m.keys().cloned().collect(),
        None => Vec::new(),
    };
    if keys.is_empty() {
        keys.extend(main_key(&state));
    }
    keys.sort();
    let events: Vec<(DateTime<Utc>, String, Value)> = sqlx::query_as(
        "SELECT event_time, event_type, payload FROM ingestion.event_store
          WHERE aggregate_id = $1 ORDER BY event_time DESC LIMIT 20",
    )
    .bind(&id)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    let models: Vec<(String, String, i64, f64, f64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT key, model || ' ' || model_version, readings, mean, variance, updated_at
           FROM ai.device_models WHERE device_id = $1 ORDER BY key",
    )
    .bind(&id)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    html(DevicePage {
        f: frame(&s, &session, &id, "devices"),
        value: describe(&state),
        state: serde_json::to_string_pretty(&state).unwrap_or_default(),
        id,
        keys,
        events: events
            .into_iter()
            .map(|(t, ty, p)| EventRow {
                time: fmt_time(t),
                event_type: ty,
                payload: p.to_string(),
            })
            .collect(),
        models: models
            .into_iter()
            .map(|(key, model, readings, mean, var, t)| ModelRow {
                key,
                model,
                readings,
                mean: format!("{mean:.3}"),
                stddev: format!("{:.3}", var.max(0.0).sqrt()),
                updated: fmt_time(t),
            })
            .collect(),
    })
}

#[derive(Deserialize)]
pub struct SeriesQuery {
    key: Option<String>,
    #[serde(default = "default_bucket")]
    bucket: String,
    #[serde(default = "default_agg")]
    agg: String,
    #[serde(default = "default_window")]
    window: String,
}

fn default_bucket() -> String {
    "1m".into()
}
fn default_agg() -> String {
    "avg".into()
}
fn default_window() -> String {
    "1h".into()
}

/// `GET /console/devices/{id}/series`: one quantity's buckets and its anomalies, for the chart.
/// Buckets of an hour or more read the hourly rollup, others the minute rollup: both are kept by
/// the tsdb-writer in the statement that writes the raw row, so they are never behind it.
pub async fn series(
    State(s): State<ConsoleState>,
    Path(id): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> Response {
    series_json(&s, &id, q).await.unwrap_or_else(|e| e.json())
}

async fn series_json(s: &ConsoleState, id: &str, q: SeriesQuery) -> Result<Response, ConsoleError> {
    let bucket = match q.bucket.as_str() {
        "1m" => 60,
        "5m" => 300,
        "15m" => 900,
        "1h" => 3600,
        "1d" => 86_400,
        other => {
            return Err(ConsoleError::BadRequest(format!(
                "bucket {other:?}: expected 1m, 5m, 15m, 1h or 1d"
            )));
        }
    };
    let window = match q.window.as_str() {
        "1h" => 3600,
        "6h" => 6 * 3600,
        "24h" => 86_400,
        "7d" => 7 * 86_400,
        "30d" => 30 * 86_400,
        other => {
            return Err(ConsoleError::BadRequest(format!(
                "window {other:?}: expected 1h, 6h, 24h, 7d or 30d"
            )));
        }
    };
    let agg = match q.agg.as_str() {
        "avg" => "sum(r.sum) / sum(r.count)",
        "min" => "min(r.min)",
        "max" => "max(r.max)",
        "count" => "sum(r.count)::float8",
        "last" => "(array_agg(r.last_value ORDER BY r.last_time DESC, r.last_event_id DESC))[1]",
        other => {
            return Err(ConsoleError::BadRequest(format!(
                "agg {other:?}: expected avg, min, max, count or last"
            )));
        }
    };
    let key = q.key.unwrap_or_else(|| "value".into());
    if !crate::envelope::catalogue::is_quantity_key(&key) {
        return Err(ConsoleError::BadRequest(format!(
            "key {key:?} is not a quantity name"
        )));
    }
    let table = if bucket >= 3600 {
        "tsdb.sensor_rollups_1h"
    } else {
        "tsdb.sensor_rollups_1m"
    };
    let now = s.clock.now();
    let since = now - chrono::Duration::seconds(window);
    // `agg` and `table` come from the fixed lists above, never from the request.
    let sql = format!(
        "SELECT date_bin(make_interval(secs => $4), r.bucket, TIMESTAMPTZ '2000-01-01') AS b, {agg}
           FROM {table} r
          WHERE r.device_id = $1 AND r.key = $2 AND r.bucket >= $3
          GROUP BY b ORDER BY b"
    );
    let rows: Vec<(DateTime<Utc>, Option<f64>)> = sqlx::query_as(&sql)
        .bind(id)
        .bind(&key)
        .bind(since)
        .bind(bucket as f64)
        .fetch_all(&s.pool)
        .await
        .or_else(missing_is_empty)?;
    let anomalies: Vec<(DateTime<Utc>, f64, f64)> = sqlx::query_as(
        "SELECT time, value, score FROM ai.inference_results
          WHERE device_id = $1 AND key = $2 AND is_anomaly AND time >= $3
          ORDER BY time LIMIT 1000",
    )
    .bind(id)
    .bind(&key)
    .bind(since)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    Ok(Json(json!({
        "device_id": id,
        "key": key,
        "bucket_seconds": bucket,
        "agg": q.agg,
        "times": rows.iter().map(|(t, _)| t.timestamp()).collect::<Vec<_>>(),
        "values": rows.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        "anomalies": anomalies.iter().map(|(t, v, sc)| json!({
            "time": t.timestamp_millis() as f64 / 1000.0, "value": v, "score": sc
        })).collect::<Vec<_>>(),
    }))
    .into_response())
}

// ---------------------------------------------------------------- dead letters

pub struct LetterRow {
    pub id: Uuid,
    pub consumer: String,
    pub group: String,
    pub event_type: String,
    pub aggregate_id: String,
    pub payload: String,
    pub error: String,
    pub failed: String,
    pub retries: i32,
    pub status: String,
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLettersPage {
    f: Frame,
    rows: Vec<LetterRow>,
}

type LetterTuple = (
    Uuid,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    DateTime<Utc>,
    i32,
    String,
);

pub async fn dead_letters(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Result<Response, ConsoleError> {
    let mut rows = Vec::new();
    for (name, table) in DLQ_TABLES {
        let sql = format!(
            "SELECT dlq_id, consumer, event_type, aggregate_id,
                    coalesce(event_payload::text, raw_payload), error_message, failed_at,
                    retry_count, status
               FROM {table} WHERE status IN ('pending', 'replaying')
              ORDER BY failed_at DESC LIMIT 200"
        );
        let found: Vec<LetterTuple> = sqlx::query_as(&sql)
            .fetch_all(&s.pool)
            .await
            .or_else(missing_is_empty)?;
        rows.extend(found.into_iter().map(
            |(id, group, ty, agg, payload, error, failed, retries, status)| {
                LetterRow {
                    id,
                    consumer: name.to_string(),
                    group,
                    event_type: ty.unwrap_or_default(),
                    aggregate_id: agg.unwrap_or_default(),
                    payload: payload
                        .map(|p| p.chars().take(2000).collect())
                        .unwrap_or_default(),
                    error,
                    failed: fmt_time(failed),
                    retries,
                    status,
                }
            },
        ));
    }
    rows.sort_by(|a, b| b.failed.cmp(&a.failed));
    html(DeadLettersPage {
        f: frame(&s, &session, "Dead letters", "dead-letters"),
        rows,
    })
}

/// `POST /console/dead-letters/{consumer}/{id}/{replay|discard}`: through the consumer's DLQ
/// API (the event handler's and tsdb-writer's on their health port, the action orchestrator's
/// on its), with the operator's token. The sidecar's model runs only in Python: for it the
/// console requests the replay through the same function the CLI uses, and the sidecar's
/// replay worker performs it. Answers an HTML fragment that replaces the row.
pub async fn dead_letter_action(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Path((consumer, id, action)): Path<(String, Uuid, String)>,
) -> Response {
    match act(&s, &session, &consumer, id, &action).await {
        Ok(outcome) => Html(format!(
            "<td colspan=\"8\" class=\"done\">{}: {}</td>",
            id,
            askama::filters::escape(&outcome, askama::filters::Html)
                .map(|e| e.to_string())
                .unwrap_or_default()
        ))
        .into_response(),
        Err(e) => e.json(),
    }
}

async fn act(
    s: &ConsoleState,
    session: &Session,
    consumer: &str,
    id: Uuid,
    action: &str,
) -> Result<String, ConsoleError> {
    if !matches!(action, "replay" | "discard") {
        return Err(ConsoleError::NotFound(format!("no action {action:?}")));
    }
    let base = match consumer {
        "eventhandler" => &s.upstream.eventhandler_url,
        "tsdb" => &s.upstream.tsdb_url,
        "actions" => &s.upstream.actions_health_url,
        "ai" => {
            let owner = dlq::Owner {
                name: "ai",
                table: "ai.dlq",
                pool: s.pool.clone(),
                replay: dlq::Replay::Requested,
            };
            return Ok(if action == "discard" {
                if owner.discard(id).await? {
                    "discarded".into()
                } else {
                    "not pending".into()
                }
            } else {
                match owner.replay(id).await? {
                    dlq::ReplayOutcome::Requested => "replay requested from the sidecar".into(),
                    dlq::ReplayOutcome::Replayed => "replayed".into(),
                    dlq::ReplayOutcome::StillFailing(e) => format!("still failing: {e}"),
                    dlq::ReplayOutcome::NotPending => "not pending".into(),
                }
            });
        }
        other => return Err(ConsoleError::NotFound(format!("no consumer {other:?}"))),
    };
    let url = format!("{base}/api/v1/dlq/{consumer}/{id}/{action}");
    let body = upstream(
        s,
        session,
        reqwest::Method::POST,
        &url,
        None,
        "the consumer's DLQ API",
    )
    .await?;
    Ok(body
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or(if action == "replay" {
            "replayed"
        } else {
            "discarded"
        })
        .to_string())
}

/// One call to another service's API with the operator's token: its JSON answer when it
/// succeeded, its status and error message (passed through) when not.
pub async fn upstream(
    s: &ConsoleState,
    session: &Session,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
    service: &'static str,
) -> Result<Value, ConsoleError> {
    let mut req = s.http.request(method, url);
    if let Some(t) = &session.token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.map_err(|e| ConsoleError::Unreachable {
        service,
        message: e.to_string(),
    })?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    Err(ConsoleError::Upstream {
        service,
        status: axum::http::StatusCode::from_u16(status.as_u16())
            .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
        message: body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no error message")
            .to_string(),
    })
}

// ---------------------------------------------------------------- docs

#[derive(Template)]
#[template(path = "console/docs.html")]
struct DocsPage {
    f: Frame,
    docs: Vec<&'static str>,
}

pub async fn docs(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Result<Response, ConsoleError> {
    html(DocsPage {
        f: frame(&s, &session, "API docs", "docs"),
        docs: super::assets::OPENAPI.iter().map(|(n, _)| *n).collect(),
    })
}
