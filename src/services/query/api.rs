//! The read API (SPEC §8): projections, the event log and dead letters.

use std::collections::HashMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use crate::infra::dlq;

use super::QueryState;
use super::error::QueryError;
use crate::envelope::{MAX_AGGREGATE_ID_LEN, PROJECTION_TYPES, format_time};
use crate::infra::extract::{Path, Query};

/// Every route this module serves, for the OpenAPI agreement test.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/query/projections/{type}/{aggregate_id}"),
    ("get", "/api/v1/query/projections/{type}"),
    ("get", "/api/v1/projections/{type}/{aggregate_id}"),
    ("get", "/api/v1/projections/{type}"),
    ("get", "/api/v1/query/events"),
    ("get", "/api/v1/query/dlq"),
];

pub fn router() -> Router<QueryState> {
    Router::new()
        .route(
            "/api/v1/query/projections/{type}/{aggregate_id}",
            get(get_projection),
        )
        .route("/api/v1/query/projections/{type}", get(list_projections))
        .route(
            "/api/v1/projections/{type}/{aggregate_id}",
            get(get_projection),
        )
        .route("/api/v1/projections/{type}", get(list_projections))
        .route("/api/v1/query/events", get(list_events))
        .route("/api/v1/query/dlq", get(list_dlq))
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

pub(super) type Params = Query<HashMap<String, String>>;

pub(super) fn int_param(
    q: &HashMap<String, String>,
    k: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, QueryError> {
    crate::infra::http::int_param(q, k, default, min, max).map_err(QueryError::BadRequest)
}

pub(super) fn time_param(
    q: &HashMap<String, String>,
    k: &str,
) -> Result<Option<DateTime<Utc>>, QueryError> {
    q.get(k)
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    QueryError::BadRequest(format!("{k} must be an RFC 3339 timestamp, got '{v}'"))
                })
        })
        .transpose()
}

pub(super) fn only_known(q: &HashMap<String, String>, allowed: &[&str]) -> Result<(), QueryError> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QueryError::BadRequest(format!(
            "unknown query parameter '{k}'; allowed: {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A projection cursor is the last `aggregate_id` of a page, so anything ingestion could not
/// have accepted as one (envelope: 1 to `MAX_AGGREGATE_ID_LEN` printable characters) is not a
/// cursor but a client's mistake.
fn projection_cursor(a: &str) -> Result<&str, QueryError> {
    let n = a.chars().count();
    if (1..=MAX_AGGREGATE_ID_LEN).contains(&n) && !a.chars().any(char::is_control) {
        Ok(a)
    } else {
        Err(QueryError::BadRequest(format!(
            "after must be the next_cursor of a previous page (an aggregate_id of 1 to \
             {MAX_AGGREGATE_ID_LEN} printable characters)"
        )))
    }
}

#[tracing::instrument(skip_all, fields(projection_type = %ptype))]
async fn list_projections(
    State(s): State<QueryState>,
    Path(ptype): Path<String>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    known_type(&ptype)?;
    only_known(&q, &["limit", "offset", "after"])?;
    let limit = int_param(&q, "limit", 20, 1, 100)?;
    let offset = int_param(&q, "offset", 0, 0, i64::MAX)?;
    let after = q.get("after").map(|a| projection_cursor(a)).transpose()?;
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

#[tracing::instrument(skip_all)]
async fn list_events(
    State(s): State<QueryState>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    only_known(
        &q,
        &["aggregate_id", "event_type", "from", "to", "limit", "after"],
    )?;
    let limit = int_param(&q, "limit", 100, 1, 1000)?;
    let from = time_param(&q, "from")?;
    let to = time_param(&q, "to")?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(QueryError::BadRequest("from must not be after to".into()));
    }
    let after = q
        .get("after")
        .map(|a| {
            Uuid::parse_str(a).map_err(|_| {
                QueryError::BadRequest(format!("after must be an event_id, got '{a}'"))
            })
        })
        .transpose()?;
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
    .bind(q.get("aggregate_id"))
    .bind(q.get("event_type"))
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

#[tracing::instrument(skip_all)]
async fn list_dlq(
    State(s): State<QueryState>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    only_known(&q, &["consumer", "status", "limit", "offset"])?;
    let limit = int_param(&q, "limit", 50, 1, 500)?;
    let offset = int_param(&q, "offset", 0, 0, i64::MAX)?;
    let status = q
        .get("status")
        .map(|st| st.parse::<dlq::Status>())
        .transpose()
        .map_err(QueryError::BadRequest)?
        .map(dlq::Status::as_str);
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
        .bind(q.get("consumer"))
        .bind(status)
        .fetch_one(&s.pool)
        .await?;
    let entries: Vec<dlq::Entry> = sqlx::query_as(&format!(
        "SELECT * FROM ({union}) d {filter} ORDER BY failed_at, dlq_id LIMIT $3 OFFSET $4"
    ))
    .bind(q.get("consumer"))
    .bind(status)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(
        json!({ "entries": entries, "total": total, "limit": limit, "offset": offset }),
    ))
}
