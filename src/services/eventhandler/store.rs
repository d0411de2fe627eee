//! The event handler's projection upserts (its dead letters are `infra::dlq`'s).

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::handlers::ProjectionWrite;

/// Newer wins for the row as a whole; a state with `values` (sensor_state) also merges them
/// quantity by quantity, each keeping its newest entry by (event_time, event_id) — compared as
/// timestamptz and uuid, not as text, whose collation could order them otherwise — so an older
/// reading still contributes a quantity the stored state lacks or holds at an older version.
/// `handlers::newest_per_row` merges a batch the same way before it gets here.
const UPSERT: &str = "
    INSERT INTO eventhandler.projections AS p
        (projection_id, projection_type, aggregate_id, state, last_event_id, last_event_timestamp, updated_at)
    SELECT u.id, u.ptype, u.agg, u.state::jsonb, u.eid, u.etime, now()
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[])
         AS u(id, ptype, agg, state, eid, etime)
    ON CONFLICT (projection_type, aggregate_id) DO UPDATE
    SET state = (CASE WHEN (p.last_event_timestamp, p.last_event_id)
                           < (EXCLUDED.last_event_timestamp, EXCLUDED.last_event_id)
                      THEN EXCLUDED.state ELSE p.state END)
             || CASE WHEN EXCLUDED.state ? 'values' THEN jsonb_build_object('values', (
                    SELECT coalesce(jsonb_object_agg(k,
                               CASE WHEN o.v IS NULL THEN n.v
                                    WHEN n.v IS NULL THEN o.v
                                    WHEN ((n.v->>'event_time')::timestamptz, (n.v->>'event_id')::uuid)
                                         > ((o.v->>'event_time')::timestamptz, (o.v->>'event_id')::uuid)
                                    THEN n.v ELSE o.v END), '{}'::jsonb)
                    FROM jsonb_each(coalesce(p.state->'values', '{}'::jsonb)) AS o(k, v)
                    FULL JOIN jsonb_each(EXCLUDED.state->'values') AS n(k, v) USING (k)))
                ELSE '{}'::jsonb END,
        last_event_id = CASE WHEN (p.last_event_timestamp, p.last_event_id)
                                  < (EXCLUDED.last_event_timestamp, EXCLUDED.last_event_id)
                             THEN EXCLUDED.last_event_id ELSE p.last_event_id END,
        last_event_timestamp = greatest(p.last_event_timestamp, EXCLUDED.last_event_timestamp),
        updated_at = now()
    WHERE (p.last_event_timestamp, p.last_event_id)
            < (EXCLUDED.last_event_timestamp, EXCLUDED.last_event_id)
       OR EXCLUDED.state ? 'values'";

/// Applies writes (at most one per projection row) in one statement. Older or equal versions
/// leave the stored row alone (but for the quantities they add), so redelivery and reordering
/// never regress a projection.
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
