//! The outbox processor (SPEC §6, ADR-0002/0012): moves committed events to the event store and
//! the bus, and deletes them from the outbox only once the broker has acknowledged them.
//!
//! Ordering: rows carry `shard = hash(aggregate_id) % 16`. A worker takes a transaction-scoped
//! advisory lock per shard before claiming that shard's rows, so exactly one worker in the whole
//! cluster publishes a shard at a time, in `outbox_id` order, and waits for every delivery before
//! the next claim. An aggregate lives in one shard, so its events reach their partition in order
//! however many workers and processes run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::writer::SHARDS;
use crate::config::{KafkaConfig, OutboxConfig, Topics};
use crate::infra::{bus, db, telemetry};

/// Namespace of the shard advisory locks (the other key is the shard). Whoever holds
/// `(LOCK_NAMESPACE, shard)` owns the shard: workers skip it meanwhile.
pub const LOCK_NAMESPACE: i32 = 0x636a_6f62;
pub const NOTIFY_CHANNEL: &str = "cj_outbox";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publish failed: {0}")]
    Publish(KafkaError, FailedProducer),
    #[error("bus recovery: {0}")]
    Recovery(#[from] super::recovery::RecoveryError),
}

/// One claimed outbox row.
struct Row_ {
    outbox_id: Uuid,
    shard: i16,
    body: String,
    aggregate_id: String,
    event_type: String,
    event_id: String,
    traceparent: Option<String>,
}

#[derive(Clone)]
pub struct Processor {
    pub pool: PgPool,
    pub producer: Arc<bus::SharedProducer>,
    pub topics: Topics,
    pub kafka: KafkaConfig,
    pub cfg: OutboxConfig,
    pub recovery: Arc<super::recovery::Recovery>,
}

impl Processor {
    /// Claims, publishes and moves one batch from the given shards. Returns how many rows moved;
    /// 0 when there was nothing to do (or every shard was held by another worker).
    pub async fn process_batch(&self, shards: &[i16]) -> Result<usize, ProcessError> {
        // Held until the batch has moved: a bus recovery waits for it, and it for a recovery.
        let _publishing = self.recovery.permit().await?;
        let mut tx = self.pool.begin().await?;
        // One shard per batch: the first of `shards` (the caller rotates them) that has rows and
        // that no other worker holds. A single shard is an index range scan on
        // (shard, outbox_id); several at once would sort the whole backlog on every claim.
        let rows: Vec<Row_> = sqlx::query(
            "WITH chosen AS MATERIALIZED (
                 SELECT s FROM unnest($1::int2[]) WITH ORDINALITY AS t(s, n)
                 WHERE EXISTS (SELECT 1 FROM ingestion.outbox o WHERE o.shard = t.s)
                   AND pg_try_advisory_xact_lock($2::int4, t.s::int4)
                 ORDER BY n
                 LIMIT 1)
             SELECT outbox_id, shard, event_payload::text AS body,
                    event_payload->>'aggregate_id' AS aggregate_id,
                    event_payload->>'event_type' AS event_type,
                    event_payload->>'event_id' AS event_id,
                    event_payload->'metadata'->>'traceparent' AS traceparent
             FROM ingestion.outbox
             WHERE shard = (SELECT s FROM chosen)
             ORDER BY outbox_id
             LIMIT $3
             FOR UPDATE SKIP LOCKED",
        )
        .bind(shards)
        .bind(LOCK_NAMESPACE)
        .bind(self.cfg.batch_size)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| Row_ {
            outbox_id: r.get("outbox_id"),
            shard: r.get("shard"),
            body: r.get("body"),
            aggregate_id: r.get("aggregate_id"),
            event_type: r.get("event_type"),
            event_id: r.get("event_id"),
            traceparent: r.get("traceparent"),
        })
        .collect();
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }

        let ids: Vec<Uuid> = rows.iter().map(|r| r.outbox_id).collect();
        let started = Instant::now();
        let acked = match self.publish(&rows).await {
            Ok(acked) => acked,
            Err(e) => {
                drop(tx);
                self.record_failure(&ids, &e).await;
                return Err(e);
            }
        };
        metrics::histogram!("cj_outbox_publish_seconds").record(started.elapsed().as_secs_f64());

        // One statement moves the batch: the event store insert absorbs a republished duplicate.
        // The event store's key is (event_id, ingested_at) since it is partitioned by ingest day
        // (V4); a duplicate carries the same ingested_at (it is in the envelope), so it conflicts.
        // publish_seq is drawn in outbox order (the order just published), and the highest
        // acknowledged offsets are recorded for the bus recovery (recovery.rs), all in the same
        // transaction as the delete.
        let (topics, partitions, offsets): (Vec<&str>, Vec<i32>, Vec<i64>) =
            acked.iter().map(|(t, p, o)| (*t, *p, *o)).collect();
        sqlx::query(
            "WITH moved AS (
                 DELETE FROM ingestion.outbox WHERE outbox_id = ANY($1)
                 RETURNING outbox_id, event_payload AS p),
             stored AS (
                 INSERT INTO ingestion.event_store
                     (event_id, event_type, aggregate_id, event_time, ingested_at, payload,
                      metadata, publish_seq)
                 SELECT (p->>'event_id')::uuid, p->>'event_type', p->>'aggregate_id',
                        (p->>'event_time')::timestamptz, (p->>'ingested_at')::timestamptz,
                        p->'payload', p->'metadata', nextval('ingestion.publish_seq')
                 FROM (SELECT * FROM moved ORDER BY outbox_id) AS m
                 ON CONFLICT (event_id, ingested_at) DO NOTHING
                 RETURNING publish_seq),
             marks AS (
                 INSERT INTO ingestion.bus_offsets
                     (shard, topic, \"partition\", max_offset, last_seq)
                 SELECT $2, t, p, o, (SELECT COALESCE(max(publish_seq), 0) FROM stored)
                 FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, o)
                 ON CONFLICT (topic, \"partition\", shard)
                 DO UPDATE SET max_offset = GREATEST(bus_offsets.max_offset, EXCLUDED.max_offset),
                               last_seq = GREATEST(bus_offsets.last_seq, EXCLUDED.last_seq)
                 RETURNING 1)
             SELECT (SELECT count(*) FROM stored), (SELECT count(*) FROM marks)",
        )
        .bind(&ids)
        .bind(rows[0].shard)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!("cj_outbox_published_total").increment(rows.len() as u64);
        Ok(rows.len())
    }

    /// Publishes the rows in order and waits for every acknowledgement; returns the highest
    /// acknowledged offset per (topic, partition).
    async fn publish(&self, rows: &[Row_]) -> Result<Vec<(&str, i32, i64)>, ProcessError> {
        let timeout = self.kafka.message_timeout;
        let producer = self.producer.get();
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut acked: Vec<(&str, i32, i64)> = Vec::new();
        // One span per event from enqueue to broker ack, when traces are on; its context is the
        // bus header, so consumers continue from the publish.
        let mut spans = Vec::new();
        for r in rows {
            let topic = self.topics.for_event_type(&r.event_type);
            let span =
                telemetry::event_span("outbox.publish", r.traceparent.as_deref(), &r.event_id);
            let traceparent = telemetry::traceparent_of(&span).or_else(|| r.traceparent.clone());
            spans.push(span);
            let headers =
                bus::event_headers(&r.event_type, &r.event_id, traceparent.as_deref(), &[]);
            let record = FutureRecord::to(topic)
                .key(r.aggregate_id.as_str())
                .payload(r.body.as_str())
                .headers(headers);
            // Enqueue strictly in order; a full local queue waits rather than reordering.
            match bus::enqueue(&producer, record, Instant::now() + timeout).await {
                Ok(f) => deliveries.push((topic, f)),
                Err(e) => return Err(ProcessError::Publish(e, FailedProducer(producer))),
            }
        }
        let mut first_err = None;
        for (topic, d) in deliveries {
            match d.await {
                Ok(Ok(delivery)) => {
                    match acked
                        .iter_mut()
                        .find(|(t, p, _)| *t == topic && *p == delivery.partition)
                    {
                        Some(a) => a.2 = a.2.max(delivery.offset),
                        None => acked.push((topic, delivery.partition, delivery.offset)),
                    }
                }
                Ok(Err((e, _))) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(KafkaError::Canceled);
                }
            }
        }
        drop(spans);
        match first_err {
            None => Ok(acked),
            Some(e) => Err(ProcessError::Publish(e, FailedProducer(producer))),
        }
    }

    async fn record_failure(&self, ids: &[Uuid], e: &ProcessError) {
        metrics::counter!("cj_outbox_publish_failures_total").increment(1);
        let r = sqlx::query(
            "UPDATE ingestion.outbox
             SET retry_count = retry_count + 1, last_error = $2, last_attempt_at = now()
             WHERE outbox_id = ANY($1)",
        )
        .bind(ids)
        .bind(e.to_string())
        .execute(&self.pool)
        .await;
        if let Err(db) = r {
            tracing::debug!(error = %db, "Could not record the failed attempt.");
        }
    }

    /// One worker: drains its home shards first, then helps with the others, then waits for a
    /// notification or the watchdog poll. Errors back off exponentially (capped at 30 s); rows are
    /// retried for as long as it takes, so no accepted event is ever dropped and no later event of
    /// an aggregate overtakes an earlier one.
    pub async fn run_worker(
        self,
        worker: usize,
        workers: usize,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let home: Vec<i16> = (0..SHARDS)
            .filter(|s| *s as usize % workers == worker)
            .collect();
        let all: Vec<i16> = (0..SHARDS).collect();
        let mut failures: u32 = 0;
        let mut turn = 0usize;
        while !shutdown.is_cancelled() {
            let mut moved = 0;
            let mut failed = false;
            for shards in [&home, &all] {
                loop {
                    // Rotate the starting shard so a busy shard cannot starve the others.
                    turn = turn.wrapping_add(1);
                    let mut order = shards.to_vec();
                    let by = turn % order.len();
                    order.rotate_left(by);
                    match self.process_batch(&order).await {
                        Ok(0) => break,
                        Ok(n) => {
                            moved += n;
                            failures = 0;
                            if shutdown.is_cancelled() {
                                return;
                            }
                        }
                        Err(e) => {
                            failed = true;
                            failures = failures.saturating_add(1);
                            self.on_error(worker, failures, &e).await;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
            }
            let wait = if failed {
                backoff(failures)
            } else {
                self.cfg.poll_interval
            };
            if moved > 0 && !failed {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified(), if !failed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn on_error(&self, worker: usize, failures: u32, e: &ProcessError) {
        match e {
            ProcessError::Db(err) if db::is_unavailable(err) => {
                tracing::warn!(worker, failures, error = %err, "Outbox database unavailable; retrying.");
            }
            ProcessError::Recovery(err) => {
                tracing::warn!(worker, failures, error = %err, "Checking the bus failed; nothing is published until it succeeds.");
                // The oldest waiting rows could not be attempted: count it against them, so the
                // backlog shows (retry_count, last_error, /health) why nothing moves.
                let r = sqlx::query(
                    "UPDATE ingestion.outbox
                     SET retry_count = retry_count + 1, last_error = $2, last_attempt_at = now()
                     WHERE outbox_id IN (SELECT outbox_id FROM ingestion.outbox
                                         ORDER BY outbox_id LIMIT $1)",
                )
                .bind(self.cfg.batch_size)
                .bind(e.to_string())
                .execute(&self.pool)
                .await;
                if let Err(db) = r {
                    tracing::debug!(error = %db, "Could not record the failed attempt.");
                }
            }
            ProcessError::Db(_) => {
                tracing::warn!(worker, failures, error = %e, "Outbox batch failed; it stays in the outbox and is retried.");
            }
            ProcessError::Publish(_, FailedProducer(failed)) => {
                tracing::warn!(worker, failures, error = %e, "Publishing failed; the batch stays in the outbox and is retried.");
                // A broker that restarted empty (Tansu in memory) has lost the topics and what
                // was on them, and librdkafka reports that only as a timeout. The check before
                // the next batch recreates the topics and republishes what was lost (recovery.rs).
                self.recovery.suspect();
                self.producer.replace(failed, &self.kafka).await;
            }
        }
    }
}

/// The producer a failed publish used, so that only it is replaced.
pub struct FailedProducer(Arc<rdkafka::producer::FutureProducer>);

impl std::fmt::Debug for FailedProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailedProducer")
    }
}

fn backoff(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(9));
    Duration::from_millis(ms.min(30_000))
}

/// Keeps a LISTEN connection open and wakes every worker on each notification; reconnects with
/// backoff when the connection drops, and wakes everyone after a reconnect to cover what was
/// missed meanwhile.
pub async fn listen(pool: PgPool, wakers: super::writer::Wakers, shutdown: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "LISTEN connection failed; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff(failures)) => continue,
                }
            }
        };
        // Without this, PgListener silently reconnects and swallows the gap.
        listener.ignore_pool_close_event(false);
        if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
            failures += 1;
            tracing::debug!(error = %e, "LISTEN failed; retrying.");
            continue;
        }
        failures = 0;
        wakers.wake_all();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => wakers.wake_all(),
                    Ok(None) | Err(_) => {
                        tracing::info!("LISTEN connection lost; reconnecting.");
                        metrics::counter!("cj_outbox_listen_reconnects_total").increment(1);
                        break;
                    }
                },
            }
        }
    }
}

/// Outbox backlog for `/health` and `/metrics`: rows, age of the oldest, rows past the retry limit.
pub async fn backlog(pool: &PgPool, max_retries: i32) -> Result<(i64, f64, i64), sqlx::Error> {
    let r = sqlx::query(
        "SELECT count(*) AS n,
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS age,
                count(*) FILTER (WHERE retry_count > $1) AS stuck
         FROM ingestion.outbox",
    )
    .bind(max_retries)
    .fetch_one(pool)
    .await?;
    Ok((r.get("n"), r.get("age"), r.get("stuck")))
}
