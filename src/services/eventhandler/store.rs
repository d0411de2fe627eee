//! The event handler's tables: projection upserts and the dead-letter queue (SPEC §7).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::handlers::{self, ProjectionWrite};
use crate::envelope::Envelope;

const UPSERT: &str = "
    INSERT INTO eventhandler.projections AS p
        (projection_id, projection_type, aggregate_id, state, last_event_id, last_event_timestamp, updated_at)
    SELECT u.id, u.ptype, u.agg, u.state::jsonb, u.eid, u.etime, now()
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[])
         AS u(id, ptype, agg, state, eid, etime)
    ON CONFLICT (projection_type, aggregate_id) DO UPDATE
    SET state = EXCLUDED.state,
        last_event_id = EXCLUDED.last_event_id,
        last_event_timestamp = EXCLUDED.last_event_timestamp,
        updated_at = now()
    WHERE (p.last_event_timestamp, p.last_event_id)
        < (EXCLUDED.last_event_timestamp, EXCLUDED.last_event_id)";

/// Applies writes (at most one per projection row) in one statement. Older or equal versions
/// leave the stored row alone, so redelivery and reordering never regress a projection.
pub async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    writes: &[ProjectionWrite],
) -> Result<u64, sqlx::Error> {
    if writes.is_empty() {
        return Ok(0);
    }
    let n = writes.len();
    let (mut ids, mut types, mut aggs, mut states, mut eids, mut times) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for w in writes {
        ids.push(Uuid::now_v7());
        types.push(w.projection_type);
        aggs.push(w.aggregate_id.as_str());
        states.push(w.state.to_string());
        eids.push(w.event_id);
        times.push(w.event_time);
    }
    let r = sqlx::query(UPSERT)
        .bind(&ids)
        .bind(&types)
        .bind(&aggs)
        .bind(&states)
        .bind(&eids)
        .bind(&times)
        .execute(&mut **tx)
        .await?;
    Ok(r.rows_affected())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DlqEntry {
    pub dlq_id: Uuid,
    pub consumer: String,
    pub event_id: Option<Uuid>,
    pub event_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_payload: Option<Value>,
    pub raw_payload: Option<String>,
    pub error_message: String,
    pub failed_at: DateTime<Utc>,
    pub retry_count: i32,
    pub status: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub updated_at: DateTime<Utc>,
}

pub async fn list_dlq(
    pool: &PgPool,
    consumer: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DlqEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT dlq_id, consumer, event_id, event_type, aggregate_id, event_payload, raw_payload,
                error_message, failed_at, retry_count, status, topic, \"partition\", \"offset\", updated_at
         FROM eventhandler.dlq
         WHERE ($1::text IS NULL OR consumer = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY failed_at, dlq_id LIMIT $3",
    )
    .bind(consumer)
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The handler succeeded (or had nothing to do): the entry is now `replayed`.
    Replayed,
    /// The handler failed again: still `pending`, with the new error.
    StillFailing(String),
    /// No pending entry with that id.
    NotPending,
}

/// Re-runs the handler on a pending dead letter (SPEC §7, `dlq replay`).
pub async fn replay(pool: &PgPool, dlq_id: Uuid) -> Result<ReplayOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(Option<Value>,)> = sqlx::query_as(
        "SELECT event_payload FROM eventhandler.dlq WHERE dlq_id = $1 AND status = 'pending' FOR UPDATE",
    )
    .bind(dlq_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((payload,)) = row else {
        return Ok(ReplayOutcome::NotPending);
    };
    let outcome = match payload {
        None => Err("the payload is not JSON; correct event_payload before replaying".to_string()),
        Some(p) => match Envelope::decode(p.to_string().as_bytes()) {
            Err(e) => Err(e),
            Ok(env) => match handlers::registry().get(env.event_type.as_str()) {
                None => Ok(None),
                Some(entry) => (entry.handler)(&env).map(Some),
            },
        },
    };
    match outcome {
        Ok(write) => {
            if let Some(w) = write {
                upsert(&mut tx, &[w]).await?;
            }
            sqlx::query(
                "UPDATE eventhandler.dlq SET status = 'replayed', updated_at = now() WHERE dlq_id = $1",
            )
            .bind(dlq_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(ReplayOutcome::Replayed)
        }
        Err(e) => {
            sqlx::query(
                "UPDATE eventhandler.dlq
                 SET error_message = $2, retry_count = retry_count + 1, updated_at = now()
                 WHERE dlq_id = $1",
            )
            .bind(dlq_id)
            .bind(&e)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(ReplayOutcome::StillFailing(e))
        }
    }
}

/// Marks a pending dead letter `discarded`; false when there was no such pending entry.
pub async fn discard(pool: &PgPool, dlq_id: Uuid) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE eventhandler.dlq SET status = 'discarded', updated_at = now()
         WHERE dlq_id = $1 AND status = 'pending'",
    )
    .bind(dlq_id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Dead letters per `(consumer, status)`, for the `cj_dlq_entries` gauge.
pub async fn dlq_sizes(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT consumer, status, count(*) FROM eventhandler.dlq GROUP BY 1, 2")
        .fetch_all(pool)
        .await
}

pub async fn pending_ids(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT dlq_id FROM eventhandler.dlq WHERE status = 'pending' ORDER BY failed_at",
    )
    .fetch_all(pool)
    .await
}
