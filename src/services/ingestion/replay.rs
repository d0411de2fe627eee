//! `cornjacket replay` (ADR-0001, SPEC §13): republishes events from the event store to their
//! topics, oldest first by `(event_time, event_id)` — the order projections apply — so each
//! aggregate's events arrive in order. Consumers are idempotent, so a replay (or a replay run
//! twice, or interrupted and re-run) changes no projection that already saw the events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::infra::bus::message::{EventMessage, Resend};
use crate::infra::{bus, telemetry};

#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
}

const PAGE: i64 = 1000;

/// Counts what a replay would send.
pub async fn count(pool: &PgPool, f: &ReplayFilter) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM ingestion.event_store
         WHERE ($1::timestamptz IS NULL OR event_time >= $1) AND ($2::timestamptz IS NULL OR event_time < $2)
           AND ($3::text IS NULL OR aggregate_id = $3) AND ($4::text IS NULL OR event_type = $4)",
    )
    .bind(f.since)
    .bind(f.until)
    .bind(&f.aggregate_id)
    .bind(&f.event_type)
    .fetch_one(pool)
    .await
}

/// Republishes the selected events; returns how many were sent. `progress` shows rate and ETA.
pub async fn replay(
    pool: &PgPool,
    kafka: &KafkaConfig,
    f: &ReplayFilter,
    progress: bool,
) -> anyhow::Result<u64> {
    let total = count(pool, f).await?;
    let bar = telemetry::progress_bar(total as u64, progress);
    bus::ensure_topics(kafka, &kafka.topics.all()).await?;
    let producer: FutureProducer = bus::producer(kafka).await?;
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    let mut sent = 0u64;
    loop {
        // The stored envelope (ingestion.envelope_json, migration V8), marked as a replay.
        let rows = sqlx::query(
            "SELECT event_id, event_type, aggregate_id, event_time,
                    (ingestion.envelope_json(s)
                     || jsonb_build_object('metadata', metadata || '{\"source\": \"replay\"}'::jsonb))::text
                        AS body,
                    metadata->>'traceparent' AS traceparent
             FROM ingestion.event_store s
             WHERE ($1::timestamptz IS NULL OR event_time >= $1) AND ($2::timestamptz IS NULL OR event_time < $2)
               AND ($3::text IS NULL OR aggregate_id = $3) AND ($4::text IS NULL OR event_type = $4)
               AND ($5::timestamptz IS NULL OR (event_time, event_id) > ($5, $6))
             ORDER BY event_time, event_id
             LIMIT $7",
        )
        .bind(f.since)
        .bind(f.until)
        .bind(&f.aggregate_id)
        .bind(&f.event_type)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(PAGE)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        // Borrowed from the page (and these ids), which outlive the deliveries.
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r.get::<Uuid, _>("event_id").to_string())
            .collect();
        let mut deliveries = Vec::with_capacity(rows.len());
        for (r, id) in rows.iter().zip(&ids) {
            let event_type: &str = r.get("event_type");
            let aggregate_id: &str = r.get("aggregate_id");
            let body: &str = r.get("body");
            let traceparent: Option<&str> = r.get("traceparent");
            let record = EventMessage {
                event_type,
                event_id: id,
                aggregate_id,
                body,
                traceparent,
                resend: Some(Resend::Replay),
            }
            .record(kafka.topics.for_event_type(event_type));
            // `send` waits for queue space rather than failing, and keeps per-key order.
            deliveries.push(producer.send(record, Duration::from_secs(30)));
        }
        for d in futures::future::join_all(deliveries).await {
            d.map_err(|(e, _)| anyhow::anyhow!("publish failed: {e}"))?;
        }
        sent += rows.len() as u64;
        bar.inc(rows.len() as u64);
        let last = rows.last().expect("non-empty page");
        after = Some((last.get("event_time"), last.get("event_id")));
    }
    bar.finish();
    Ok(sent)
}
