//! `cornjacket projections rebuild` (ADR-0001, SPEC §13): recomputes projections straight from the
//! event store, without the bus, through the same handlers and the same "newer wins" upsert the
//! consumer uses — so the result equals what consumption produced, and a rebuild interrupted and
//! run again converges to the same state.

use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::handlers::{self, newest_per_row};
use super::store;
use crate::envelope::Envelope;
use crate::infra::telemetry;

const PAGE: i64 = 2000;

/// The event types whose handlers write the given projection type (all when `None`).
fn event_types(projection: Option<&str>) -> Vec<String> {
    let registry = handlers::registry();
    let mut types: Vec<String> = registry
        .iter()
        .filter(|(_, e)| projection.is_none_or(|p| e.projection == p))
        .map(|(t, _)| t.to_string())
        .collect();
    types.sort();
    types
}

pub async fn count(events: &PgPool, projection: Option<&str>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM ingestion.event_store WHERE event_type = ANY($1)")
        .bind(event_types(projection))
        .fetch_one(events)
        .await
}

/// Rebuilds; returns (events read, events refused by their handler).
pub async fn rebuild(
    events: &PgPool,
    projections: &PgPool,
    projection: Option<&str>,
    progress: bool,
) -> anyhow::Result<(u64, u64)> {
    let types = event_types(projection);
    let total = count(events, projection).await?;
    let bar = telemetry::progress_bar(total as u64, progress);
    let registry = handlers::registry();
    let mut after: Option<Uuid> = None;
    let (mut read, mut refused) = (0u64, 0u64);
    loop {
        let rows = sqlx::query(
            "SELECT ingestion.envelope_json(s)::text AS body, event_id
             FROM ingestion.event_store s
             WHERE event_type = ANY($1) AND ($2::uuid IS NULL OR event_id > $2)
             ORDER BY event_id LIMIT $3",
        )
        .bind(&types)
        .bind(after)
        .bind(PAGE)
        .fetch_all(events)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut writes = Vec::with_capacity(rows.len());
        for r in &rows {
            let body: String = r.get("body");
            match Envelope::decode(body.as_bytes()).and_then(|e| {
                let entry = registry.get(e.event_type.as_str()).ok_or("no handler")?;
                (entry.handler)(&e)
            }) {
                Ok(w) => writes.push(w),
                Err(e) => {
                    refused += 1;
                    tracing::warn!(error = %e, "Event skipped by rebuild: its handler refuses it.");
                }
            }
        }
        let writes = newest_per_row(writes);
        let mut tx = projections.begin().await?;
        store::upsert(&mut tx, &writes).await?;
        tx.commit().await?;
        read += rows.len() as u64;
        bar.inc(rows.len() as u64);
        after = rows.last().map(|r| r.get("event_id"));
    }
    bar.finish();
    Ok((read, refused))
}
