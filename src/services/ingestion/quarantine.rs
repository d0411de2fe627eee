//! The outbox quarantine: rows the processor narrowed down as never able to move (processor.rs),
//! listed, re-queued and discarded by operators through `cornjacket outbox quarantine …` and
//! `/api/v1/outbox/quarantine` (scope `outbox:admin`).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::AppState;
use crate::infra::http::{self, DbFailure, error_body};

#[derive(Debug, Serialize)]
pub struct Quarantined {
    /// The row's place in its shard when it was quarantined; its id here.
    pub seq: i64,
    pub shard: i16,
    pub event_id: Uuid,
    pub event_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub quarantined_at: DateTime<Utc>,
    /// Failed attempts, the one that quarantined it included.
    pub attempts: i32,
    pub error: String,
}

type QuarantineRow = (
    i64,
    i16,
    Uuid,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    i32,
    String,
);

pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<Quarantined>, sqlx::Error> {
    let rows: Vec<QuarantineRow> = sqlx::query_as(
        "SELECT seq, shard, event_id, event_payload->>'event_type', event_payload->>'aggregate_id',
                created_at, quarantined_at, retry_count, error
         FROM ingestion.outbox_quarantine ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Quarantined {
            seq: r.0,
            shard: r.1,
            event_id: r.2,
            event_type: r.3,
            aggregate_id: r.4,
            created_at: r.5,
            quarantined_at: r.6,
            attempts: r.7,
            error: r.8,
        })
        .collect())
}

pub async fn count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM ingestion.outbox_quarantine")
        .fetch_one(pool)
        .await
}

pub async fn seqs(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT seq FROM ingestion.outbox_quarantine ORDER BY seq")
        .fetch_all(pool)
        .await
}

/// Puts a quarantined row back into the outbox, at the end of its shard (after whatever its
/// aggregate sent since: it is a new attempt, not a rewrite of history), with a fresh attempt
/// count. Returns false when there is no such row.
pub async fn requeue(pool: &PgPool, seq: i64) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let shard: Option<i16> =
        sqlx::query_scalar("SELECT shard FROM ingestion.outbox_quarantine WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(shard) = shard else {
        return Ok(false);
    };
    // The writers' lock of the shard, so the new seq is drawn in commit order like theirs.
    sqlx::query("SELECT ingestion.lock_shards(ARRAY[$1]::int2[])")
        .bind(shard)
        .execute(&mut *tx)
        .await?;
    let moved = sqlx::query(
        "WITH q AS (DELETE FROM ingestion.outbox_quarantine WHERE seq = $1
                    RETURNING shard, event_id, created_at, event_payload)
         INSERT INTO ingestion.outbox (shard, event_id, created_at, event_payload)
         SELECT shard, event_id, created_at, event_payload FROM q",
    )
    .bind(seq)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    if moved > 0 {
        tracing::info!(seq, "A quarantined outbox row was re-queued.");
    }
    Ok(moved > 0)
}

/// Drops a quarantined row for good. Returns false when there is no such row.
pub async fn discard(pool: &PgPool, seq: i64) -> Result<bool, sqlx::Error> {
    let gone = sqlx::query("DELETE FROM ingestion.outbox_quarantine WHERE seq = $1")
        .bind(seq)
        .execute(pool)
        .await?
        .rows_affected();
    if gone > 0 {
        tracing::warn!(seq, "A quarantined outbox row was discarded.");
    }
    Ok(gone > 0)
}

crate::infra::http::routes! {
    /// This module's routes; [`super::ROUTES`] lists all of the service's.
    pub const ROUTES;
    pub fn router() -> Router<AppState> {
        get "/api/v1/outbox/quarantine" => http_list;
        post "/api/v1/outbox/quarantine/{seq}/requeue" => http_requeue;
        delete "/api/v1/outbox/quarantine/{seq}" => http_discard;
    }
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<i64>,
}

fn failed(e: sqlx::Error) -> Response {
    match DbFailure::of(e) {
        DbFailure::Unavailable | DbFailure::NotMigrated => {
            http::unavailable("the database is unavailable; retry later")
        }
        DbFailure::Internal(e) => http::internal("Quarantine request failed.", &e),
    }
}

fn bad_seq() -> Response {
    error_body(
        StatusCode::BAD_REQUEST,
        "seq must be the integer id of a quarantined row (see GET /api/v1/outbox/quarantine)",
        json!([]),
    )
}

fn no_such(seq: i64) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        format!("no quarantined row with seq {seq}"),
        json!([]),
    )
}

async fn http_list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match params {
        Ok(Query(p)) => p.limit.unwrap_or(100),
        Err(_) => -1,
    };
    if !(1..=10_000).contains(&limit) {
        return error_body(
            StatusCode::BAD_REQUEST,
            "limit must be an integer from 1 to 10000",
            json!([]),
        );
    }
    match list(&state.pool, limit).await {
        Ok(rows) => Json(json!({ "quarantined": rows })).into_response(),
        Err(e) => failed(e),
    }
}

async fn http_requeue(
    State(state): State<AppState>,
    seq: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(seq)) = seq else {
        return bad_seq();
    };
    match requeue(&state.pool, seq).await {
        Ok(true) => {
            state.wakers.wake_all();
            (
                StatusCode::ACCEPTED,
                Json(json!({ "seq": seq, "status": "requeued" })),
            )
                .into_response()
        }
        Ok(false) => no_such(seq),
        Err(e) => failed(e),
    }
}

async fn http_discard(
    State(state): State<AppState>,
    seq: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(seq)) = seq else {
        return bad_seq();
    };
    match discard(&state.pool, seq).await {
        Ok(true) => Json(json!({ "seq": seq, "status": "discarded" })).into_response(),
        Ok(false) => no_such(seq),
        Err(e) => failed(e),
    }
}
