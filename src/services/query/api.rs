//! The read API (SPEC §8): projections, the event log and dead letters.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use crate::infra::dlq;

use super::QueryState;
use super::error::QueryError;
use crate::envelope::{MAX_AGGREGATE_ID_LEN, PROJECTION_TYPES, format_time};
use crate::infra::extract::query::{Int, Time};
use crate::infra::extract::{Path, Query};

crate::infra::http::routes! {
    /// Every route this module serves, for the OpenAPI agreement test.
    pub const ROUTES;
    pub fn router() -> Router<QueryState> {
        get "/api/v1/query/projections/{type}/{aggregate_id}" => get_projection;
        get "/api/v1/query/projections/{type}" => list_projections;
        get "/api/v1/projections/{type}/{aggregate_id}" => get_projection;
        get "/api/v1/projections/{type}" => list_projections;
        get "/api/v1/query/events" => list_events;
        get "/api/v1/query/dlq" => list_dlq;
    }
}

#[derive(Debug, Serialize)]
struct Projection {
    projection_id: Uuid,
    projection_type: String,
    aggregate_id: String,
    state: Value,
    last_event_id: Uuid,
    #[serde(serialize_with = "ser_time")]
    last_event_timestamp: DateTime<Utc>,
    #[serde(serialize_with = "ser_time")]
    updated_at: DateTime<Utc>,
}

fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn projection(r: &sqlx::postgres::PgRow) -> Projection {
    Projection {
        projection_id: r.get("projection_id"),
        projection_type: r.get("projection_type"),
        aggregate_id: r.get("aggregate_id"),
        state: r.get("state"),
        last_event_id: r.get("last_event_id"),
        last_event_timestamp: r.get("last_event_timestamp"),
        updated_at: r.get("updated_at"),
    }
}

fn known_type(t: &str) -> Result<(), QueryError> {
    if PROJECTION_TYPES.contains(&t) {
        Ok(())
    } else {
        Err(QueryError::NotFound(format!(
            "unknown projection type '{t}'; known types: {}",
            PROJECTION_TYPES.join(", ")
        )))
    }
}

const PROJECTION_COLUMNS: &str = "projection_id, projection_type, aggregate_id, state, \
     last_event_id, last_event_timestamp, updated_at";

#[tracing::instrument(skip_all, fields(projection_type = %ptype, aggregate_id = %agg))]
async fn get_projection(
    State(s): State<QueryState>,
    Path((ptype, agg)): Path<(String, String)>,
) -> Result<Json<Projection>, QueryError> {
    known_type(&ptype)?;
    let row = sqlx::query(&format!(
        "SELECT {PROJECTION_COLUMNS} FROM eventhandler.projections
         WHERE projection_type = $1 AND aggregate_id = $2"
    ))
    .bind(&ptype)
    .bind(&agg)
    .fetch_optional(&s.pool)
    .await?;
    match row {
        Some(r) => Ok(Json(projection(&r))),
        None => Err(QueryError::NotFound(format!(
            "no {ptype} projection for aggregate '{agg}'"
        ))),
    }
}

/// A projection cursor is the last `aggregate_id` of a page, so anything ingestion could not
/// have accepted as one (envelope: 1 to `MAX_AGGREGATE_ID_LEN` printable characters) is not a
/// cursor but a client's mistake.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct ProjectionCursor(String);

impl TryFrom<String> for ProjectionCursor {
    type Error = String;

    fn try_from(a: String) -> Result<Self, String> {
        let n = a.chars().count();
        if (1..=MAX_AGGREGATE_ID_LEN).contains(&n) && !a.chars().any(char::is_control) {
            Ok(ProjectionCursor(a))
        } else {
            Err(format!(
                "must be the next_cursor of a previous page (an aggregate_id of 1 to \
                 {MAX_AGGREGATE_ID_LEN} printable characters)"
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectionsParams {
    #[serde(default)]
    limit: Int<1, 100, 20>,
    #[serde(default)]
    offset: Int<0, { i64::MAX }, 0>,
    after: Option<ProjectionCursor>,
}

#[tracing::instrument(skip_all, fields(projection_type = %ptype))]
async fn list_projections(
    State(s): State<QueryState>,
    Path(ptype): Path<String>,
    // An unknown type is answered (404) before the parameters are looked at.
    q: Result<Query<ProjectionsParams>, QueryError>,
) -> Result<Json<Value>, QueryError> {
    known_type(&ptype)?;
    let Query(q) = q?;
    let (Int(limit), Int(offset)) = (q.limit, q.offset);
    let after = q.after.map(|ProjectionCursor(a)| a);
    if after.is_some() && offset != 0 {
        return Err(QueryError::BadRequest(
            "use either offset or after (a cursor), not both".into(),
        ));
    }
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM eventhandler.projections WHERE projection_type = $1",
    )
    .bind(&ptype)
    .fetch_one(&s.pool)
    .await?;
    let rows = sqlx::query(&format!(
        "SELECT {PROJECTION_COLUMNS} FROM eventhandler.projections
         WHERE projection_type = $1 AND ($2::text IS NULL OR aggregate_id > $2)
         ORDER BY aggregate_id LIMIT $3 OFFSET $4"
    ))
    .bind(&ptype)
    .bind(after)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await?;
    let items: Vec<Projection> = rows.iter().map(projection).collect();
    let next_cursor = if items.len() as i64 == limit {
        items.last().map(|p| p.aggregate_id.clone())
    } else {
        None
    };
    Ok(Json(json!({
        "projections": items, "total": total, "limit": limit, "offset": offset, "next_cursor": next_cursor
    })))
}

/// An event cursor is the last `event_id` of a page.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct EventCursor(Uuid);

impl TryFrom<String> for EventCursor {
    type Error = String;

    fn try_from(a: String) -> Result<Self, String> {
        Uuid::parse_str(&a)
            .map(EventCursor)
            .map_err(|_| format!("must be an event_id, got '{a}'"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    aggregate_id: Option<String>,
    event_type: Option<String>,
    from: Option<Time>,
    to: Option<Time>,
    #[serde(default)]
    limit: Int<1, 1000, 100>,
    after: Option<EventCursor>,
}

#[tracing::instrument(skip_all)]
async fn list_events(
    State(s): State<QueryState>,
    Query(q): Query<EventsParams>,
) -> Result<Json<Value>, QueryError> {
    let Int(limit) = q.limit;
    let from = q.from.map(|Time(t)| t);
    let to = q.to.map(|Time(t)| t);
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(QueryError::BadRequest("from must not be after to".into()));
    }
    let after = q.after.map(|EventCursor(id)| id);
    let rows = sqlx::query(
        "SELECT event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata
         FROM ingestion.event_store
         WHERE ($1::text IS NULL OR aggregate_id = $1)
           AND ($2::text IS NULL OR event_type = $2)
           AND ($3::timestamptz IS NULL OR event_time >= $3)
           AND ($4::timestamptz IS NULL OR event_time < $4)
           AND ($5::uuid IS NULL OR (event_time, event_id) >
                (SELECT event_time, event_id FROM ingestion.event_store WHERE event_id = $5))
         ORDER BY event_time, event_id
         LIMIT $6",
    )
    .bind(&q.aggregate_id)
    .bind(&q.event_type)
    .bind(from)
    .bind(to)
    .bind(after)
    .bind(limit)
    .fetch_all(&s.pool)
    .await?;
    let events: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "event_id": r.get::<Uuid, _>("event_id"),
                "event_type": r.get::<String, _>("event_type"),
                "aggregate_id": r.get::<String, _>("aggregate_id"),
                "event_time": format_time(&r.get("event_time")),
                "ingested_at": format_time(&r.get("ingested_at")),
                "payload": r.get::<Value, _>("payload"),
                "metadata": r.get::<Value, _>("metadata"),
            })
        })
        .collect();
    let next_cursor = if events.len() as i64 == limit {
        events.last().map(|e| e["event_id"].clone())
    } else {
        None
    };
    Ok(Json(
        json!({ "events": events, "limit": limit, "next_cursor": next_cursor }),
    ))
}

/// Dead-letter tables by consumer; a consumer whose service has not migrated has none yet.
const DLQ_TABLES: &[(&str, &str)] = &[
    ("event-handler", "eventhandler.dlq"),
    ("tsdb-writer", "tsdb.dlq"),
    ("action-orchestrator", "actions.dlq"),
    ("ai-inference", "ai.dlq"),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqParams {
    consumer: Option<String>,
    status: Option<dlq::Status>,
    #[serde(default)]
    limit: Int<1, 500, 50>,
    #[serde(default)]
    offset: Int<0, { i64::MAX }, 0>,
}

#[tracing::instrument(skip_all)]
async fn list_dlq(
    State(s): State<QueryState>,
    Query(q): Query<DlqParams>,
) -> Result<Json<Value>, QueryError> {
    let (Int(limit), Int(offset)) = (q.limit, q.offset);
    let status = q.status.map(dlq::Status::as_str);
    let mut parts = Vec::new();
    for (_, table) in DLQ_TABLES {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&s.pool)
            .await?;
        if exists.is_some() {
            parts.push(format!("SELECT {} FROM {table}", dlq::COLUMNS));
        }
    }
    if parts.is_empty() {
        return Ok(Json(
            json!({ "entries": [], "total": 0, "limit": limit, "offset": offset }),
        ));
    }
    let union = parts.join(" UNION ALL ");
    let filter = "WHERE ($1::text IS NULL OR consumer = $1) AND ($2::text IS NULL OR status = $2)";
    let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ({union}) d {filter}"))
        .bind(&q.consumer)
        .bind(status)
        .fetch_one(&s.pool)
        .await?;
    let entries: Vec<dlq::Entry> = sqlx::query_as(&format!(
        "SELECT * FROM ({union}) d {filter} ORDER BY failed_at, dlq_id LIMIT $3 OFFSET $4"
    ))
    .bind(&q.consumer)
    .bind(status)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(
        json!({ "entries": entries, "total": total, "limit": limit, "offset": offset }),
    ))
}
