//! The event handler's projection upserts (its dead letters are `infra::dlq`'s).

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::handlers::ProjectionWrite;

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
