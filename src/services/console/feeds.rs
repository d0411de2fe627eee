//! The two live feeds: anomalies as the sidecar reports them (with whether a rule fired), and
//! the tail of envelopes as the outbox processor publishes them, filtered by type and
//! aggregate. Each viewer's stream polls the database on its own: the queries read a few dozen
//! rows by index, and a feed nobody watches costs nothing.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Extension, Query, State};
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::ConsoleState;
use super::error::ConsoleError;
use super::pages::{fmt_time, frame, html, missing_is_empty};
use super::session::Session;

/// Rows the anomalies page shows.
const ANOMALIES: i64 = 50;
const ANOMALY_POLL: Duration = Duration::from_secs(2);

pub struct AnomalyRow {
    pub time: String,
    pub device: String,
    pub key: String,
    pub value: String,
    pub score: String,
    pub threshold: String,
    /// "no rule", or how many deliveries and their statuses.
    pub fired: String,
    pub fired_any: bool,
}

#[derive(Template)]
#[template(path = "console/anomalies_rows.html")]
pub struct AnomalyRows {
    pub rows: Vec<AnomalyRow>,
}

#[derive(Template)]
#[template(path = "console/anomalies.html")]
struct AnomaliesPage {
    f: super::pages::Frame,
    rows: AnomalyRows,
}

fn num(v: Option<&Value>, places: usize) -> String {
    match v.and_then(Value::as_f64) {
        Some(n) => format!("{n:.places$}"),
        None => "—".into(),
    }
}

/// The latest `ai.anomaly` events from the event store (each carries the sidecar's value,
/// score and threshold), with the deliveries the action orchestrator recorded for each.
async fn anomalies(s: &ConsoleState) -> Result<AnomalyRows, ConsoleError> {
    let found: Vec<(Uuid, DateTime<Utc>, String, Value)> = sqlx::query_as(
        "SELECT event_id, event_time, aggregate_id, payload FROM ingestion.event_store
          WHERE event_type = 'ai.anomaly' ORDER BY event_time DESC, event_id DESC LIMIT $1",
    )
    .bind(ANOMALIES)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    let ids: Vec<Uuid> = found.iter().map(|r| r.0).collect();
    let deliveries: Vec<(Uuid, String, i64)> = if ids.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT event_id, status, count(*) FROM actions.deliveries
              WHERE event_id = ANY($1) GROUP BY event_id, status ORDER BY status",
        )
        .bind(&ids)
        .fetch_all(&s.pool)
        .await
        .or_else(missing_is_empty)?
    };
    let mut fired: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (id, status, n) in deliveries {
        fired.entry(id).or_default().push(format!("{n} {status}"));
    }
    Ok(AnomalyRows {
        rows: found
            .into_iter()
            .map(|(id, t, device, p)| {
                let f = fired.remove(&id);
                AnomalyRow {
                    time: fmt_time(t),
                    key: p
                        .get("key")
                        .and_then(Value::as_str)
                        .unwrap_or("value")
                        .to_string(),
                    value: num(p.get("value"), 3),
                    score: num(p.get("score"), 2),
                    threshold: num(p.get("threshold"), 1),
                    fired_any: f.is_some(),
                    fired: f.map_or_else(|| "no rule".into(), |v| v.join(", ")),
                    device,
                }
            })
            .collect(),
    })
}

pub async fn anomalies_page(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Result<Response, ConsoleError> {
    html(AnomaliesPage {
        f: frame(&s, &session, "Anomalies", "anomalies"),
        rows: anomalies(&s).await?,
    })
}

/// `GET /console/live/anomalies`: the rows again whenever they changed (a new anomaly, or a
/// delivery of one moving on).
pub async fn live_anomalies(
    State(s): State<ConsoleState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold((s, String::new()), |(s, last)| async move {
        loop {
            tokio::time::sleep(ANOMALY_POLL).await;
            let Ok(rows) = anomalies(&s).await else {
                continue;
            };
            let html = rows.render().unwrap_or_default();
            if html != last {
                let ev = Event::default().event("anomalies").data(html.clone());
                return Some((Ok(ev), (s, html)));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ---------------------------------------------------------------- live tail

const TAIL_POLL: Duration = Duration::from_secs(1);
/// Rows a poll reads at most; a faster stream is shown in samples of this size per second
/// rather than falling ever further behind.
const TAIL_BATCH: i64 = 100;
/// How far below the highest publish_seq seen a poll looks again. The sequence is drawn as a
/// batch moves, before its transaction commits, so concurrent shards can commit a lower number
/// after a higher one is visible; looking back (and skipping what was shown) catches those.
const LOOKBACK: i64 = 512;
/// Envelopes the first page load shows.
const TAIL_FIRST: i64 = 20;

#[derive(Deserialize, Default, Clone)]
pub struct TailFilter {
    /// An exact type, `prefix.*`, or empty / `*` for all.
    #[serde(default, rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub aggregate: String,
}

impl TailFilter {
    fn clean(mut self) -> Result<Self, ConsoleError> {
        self.event_type = self.event_type.trim().to_string();
        self.aggregate = self.aggregate.trim().to_string();
        if self.event_type == "*" {
            self.event_type.clear();
        }
        let t = self
            .event_type
            .strip_suffix(".*")
            .unwrap_or(&self.event_type);
        if t.len() > 255
            || !t
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        {
            return Err(ConsoleError::BadRequest(format!(
                "type {:?}: expected an event type, `prefix.*` or `*`",
                self.event_type
            )));
        }
        if self.aggregate.len() > 255 {
            return Err(ConsoleError::BadRequest(
                "aggregate: at most 255 characters".into(),
            ));
        }
        Ok(self)
    }

    /// ($exact, $prefix) for the query: an exact type, or a type prefix ending in `.`.
    fn types(&self) -> (String, String) {
        match self.event_type.strip_suffix('*') {
            Some(prefix) => (String::new(), prefix.to_string()),
            None => (self.event_type.clone(), String::new()),
        }
    }
}

pub struct TailRow {
    pub seq: i64,
    pub time: String,
    pub event_type: String,
    pub aggregate_id: String,
    pub source: String,
    pub payload: String,
}

#[derive(Template)]
#[template(path = "console/tail_row.html")]
pub struct TailRowHtml<'a> {
    pub r: &'a TailRow,
}

#[derive(Template)]
#[template(path = "console/tail.html")]
struct TailPage {
    f: super::pages::Frame,
    filter: TailFilter,
    query: String,
    rows: Vec<TailRow>,
}

type TailTuple = (i64, DateTime<Utc>, String, String, Option<String>, String);

async fn tail_rows(
    s: &ConsoleState,
    filter: &TailFilter,
    above: i64,
    except: &[i64],
    limit: i64,
    newest_first: bool,
) -> Result<Vec<TailRow>, ConsoleError> {
    let (exact, prefix) = filter.types();
    let order = if newest_first { "DESC" } else { "ASC" };
    // `order` is one of two constants.
    let sql = format!(
        "SELECT publish_seq, event_time, event_type, aggregate_id, metadata->>'source',
                left(payload::text, 600)
           FROM ingestion.event_store
          WHERE publish_seq > $1
            AND ($2 = '' OR event_type = $2)
            AND ($3 = '' OR starts_with(event_type, $3))
            AND ($4 = '' OR aggregate_id = $4)
            AND publish_seq <> ALL($6)
          ORDER BY publish_seq {order} LIMIT $5"
    );
    let rows: Vec<TailTuple> = sqlx::query_as(&sql)
        .bind(above)
        .bind(&exact)
        .bind(&prefix)
        .bind(&filter.aggregate)
        .bind(limit)
        .bind(except)
        .fetch_all(&s.pool)
        .await
        .or_else(missing_is_empty)?;
    Ok(rows
        .into_iter()
        .map(|(seq, t, ty, agg, source, payload)| TailRow {
            seq,
            time: fmt_time(t),
            event_type: ty,
            aggregate_id: agg,
            source: source.unwrap_or_default(),
            payload,
        })
        .collect())
}

/// The highest publish_seq drawn so far: the sequence's own counter, read without touching
/// the event store (a `max()` would scan it).
async fn seq_now(s: &ConsoleState) -> Result<i64, ConsoleError> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ingestion.publish_seq",
    )
    .fetch_optional(&s.pool)
    .await
    .or_else(|e| missing_is_empty(e).map(|_: Vec<()>| None))?;
    Ok(v.unwrap_or(0))
}

fn filter_query(f: &TailFilter) -> String {
    let enc = crate::infra::http::percent_encode;
    format!(
        "type={}&aggregate={}",
        enc(&f.event_type),
        enc(&f.aggregate)
    )
}

pub async fn tail_page(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(filter): Query<TailFilter>,
) -> Result<Response, ConsoleError> {
    let filter = filter.clean()?;
    let now = seq_now(&s).await?;
    // The last envelopes of a window below the counter, newest first, so the page is not empty.
    let rows = tail_rows(&s, &filter, (now - 5_000).max(0), &[], TAIL_FIRST, true).await?;
    html(TailPage {
        f: frame(&s, &session, "Live tail", "tail"),
        query: filter_query(&filter),
        filter,
        rows,
    })
}

struct Tail {
    s: ConsoleState,
    filter: TailFilter,
    /// The highest publish_seq read so far.
    cursor: i64,
    /// What was shown within the look-back window, oldest first.
    shown: VecDeque<i64>,
    queue: VecDeque<TailRow>,
}

/// `GET /console/live/tail?type=&aggregate=`: one `envelope` event (a table row) per envelope
/// published after the stream opened, oldest first. A stream faster than [`TAIL_BATCH`] a
/// second is sampled: after a full batch the tail jumps to the newest.
pub async fn live_tail(
    State(s): State<ConsoleState>,
    Query(filter): Query<TailFilter>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let filter = filter.clean().map_err(ConsoleError::json)?;
    let cursor = seq_now(&s).await.map_err(ConsoleError::json)?;
    let tail = Tail {
        s,
        filter,
        cursor,
        shown: VecDeque::new(),
        queue: VecDeque::new(),
    };
    let stream = futures::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(r) = t.queue.pop_front() {
                let html = TailRowHtml { r: &r }.render().unwrap_or_default();
                return Some((Ok(Event::default().event("envelope").data(html)), t));
            }
            tokio::time::sleep(TAIL_POLL).await;
            let floor = (t.cursor - LOOKBACK).max(0);
            t.shown.retain(|&q| q > floor);
            let except: Vec<i64> = t.shown.iter().copied().collect();
            let Ok(rows) = tail_rows(&t.s, &t.filter, floor, &except, TAIL_BATCH, false).await
            else {
                continue;
            };
            let full = rows.len() as i64 == TAIL_BATCH;
            for r in rows {
                t.cursor = t.cursor.max(r.seq);
                t.shown.push_back(r.seq);
                t.queue.push_back(r);
            }
            if full && let Ok(now) = seq_now(&t.s).await {
                t.cursor = t.cursor.max(now);
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
