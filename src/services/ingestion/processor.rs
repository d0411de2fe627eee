//! The outbox processor (SPEC §6, ADR-0002/0012): moves committed events to the event store and
//! the bus, and deletes them from the outbox only once the broker has acknowledged them.
//!
//! Ordering: rows carry `shard = hash(aggregate_id) % 16`. A worker takes a transaction-scoped
//! advisory lock per shard before claiming that shard's rows, so exactly one worker in the whole
//! cluster publishes a shard at a time, in `seq` order, and waits for every delivery before the
//! next claim. The writer draws `seq` under its own lock of the shard (migration V7), so a
//! committed row never has an uncommitted one of its shard below it: nothing is skipped.
//!
//! No row can block its shard: a batch refused for what it holds (not for an outage) is narrowed
//! down row by row, and the row that fails alone goes to `ingestion.outbox_quarantine`. An aggregate lives in one shard, so its events reach their partition in order
//! however many workers and processes run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::writer::SHARDS;
use crate::config::{KafkaConfig, OutboxConfig, Topics};
use crate::envelope;
use crate::infra::bus::message::EventMessage;
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
    seq: i64,
    shard: i16,
    body: String,
    aggregate_id: String,
    event_type: String,
    event_id: String,
    event_time: String,
    traceparent: Option<String>,
}

/// Shards being narrowed down after a batch failed for a reason waiting will not fix: their next
/// rows go one per batch, so that the row at fault fails alone and is quarantined, and the rest
/// of the shard moves on in order.
#[derive(Default)]
pub struct Narrowing(std::sync::Mutex<std::collections::HashMap<i16, (usize, Instant)>>);

impl Narrowing {
    /// How long a shard stays narrowed without progress (another process may have drained it).
    const FOR: Duration = Duration::from_secs(60);

    fn start(&self, shard: i16, rows: usize) {
        let mut m = self.0.lock().expect("narrowing lock");
        m.insert(shard, (rows, Instant::now()));
    }

    fn shards(&self, among: &[i16]) -> Vec<i16> {
        let mut m = self.0.lock().expect("narrowing lock");
        m.retain(|_, (_, since)| since.elapsed() < Self::FOR);
        among
            .iter()
            .copied()
            .filter(|s| m.contains_key(s))
            .collect()
    }

    /// One row of the shard moved (or was quarantined): one fewer to go singly.
    fn advance(&self, shard: i16, quarantined: bool) {
        let mut m = self.0.lock().expect("narrowing lock");
        if quarantined {
            m.remove(&shard);
        } else if let Some((left, since)) = m.get_mut(&shard) {
            *left = left.saturating_sub(1);
            *since = Instant::now();
            if *left == 0 {
                m.remove(&shard);
            }
        }
    }
}

/// Why a batch failed, as far as deciding between waiting and narrowing goes.
enum Failure {
    /// The bus or the database is away or overloaded: the batch waits and is retried whole.
    Transient,
    /// Something about one of the rows (a value the database refuses, a message the broker
    /// refuses): retrying the batch as it is would fail forever.
    Permanent,
}

/// A broker refusal that no retry can change: the message itself is what it refuses.
fn publish_failure(e: &KafkaError) -> Failure {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTimestamp
            | C::InvalidRequest,
        ) => Failure::Permanent,
        _ => Failure::Transient,
    }
}

fn failure_of(e: &ProcessError) -> Failure {
    match e {
        ProcessError::Publish(k, _) => publish_failure(k),
        ProcessError::Db(d) => move_failure(d),
        ProcessError::Recovery(_) => Failure::Transient,
    }
}

/// A database refusal of the move: data exceptions (22…), integrity violations (23…) and program
/// limits (54…) are about a row; everything else is the environment and is waited out.
fn move_failure(e: &sqlx::Error) -> Failure {
    match e {
        sqlx::Error::Database(d) => match d.code() {
            Some(c) if c.starts_with("22") || c.starts_with("23") || c.starts_with("54") => {
                Failure::Permanent
            }
            _ => Failure::Transient,
        },
        _ => Failure::Transient,
    }
}

#[derive(Clone)]
pub struct Processor {
    pub pool: PgPool,
    pub producer: Arc<bus::SharedProducer>,
    pub topics: Topics,
    pub kafka: KafkaConfig,
    pub cfg: OutboxConfig,
    pub recovery: Arc<super::recovery::Recovery>,
    pub narrowing: Arc<Narrowing>,
}

impl Processor {
    /// Claims, publishes and moves one batch from the given shards. Returns how many rows moved
    /// (or were quarantined); 0 when there was nothing to do (or every shard was held by another
    /// worker).
    pub async fn process_batch(&self, shards: &[i16]) -> Result<usize, ProcessError> {
        let narrowed = self.narrowing.shards(shards);
        if !narrowed.is_empty() {
            let n = self.batch(&narrowed, 1).await?;
            if n > 0 {
                return Ok(n);
            }
        }
        let wide: Vec<i16> = shards
            .iter()
            .copied()
            .filter(|s| !narrowed.contains(s))
            .collect();
        if wide.is_empty() {
            return Ok(0);
        }
        self.batch(&wide, self.cfg.batch_size).await
    }

    async fn batch(&self, shards: &[i16], limit: i64) -> Result<usize, ProcessError> {
        // Held until the batch has moved: a bus recovery waits for it, and it for a recovery.
        let _publishing = self.recovery.permit().await?;
        let mut tx = self.pool.begin().await?;
        // One shard per batch: the first of `shards` (the caller rotates them) that has rows and
        // that no other worker holds. A single shard is an index range scan on (shard, seq);
        // several at once would sort the whole backlog on every claim. FOR UPDATE, though the
        // advisory lock already makes this worker the shard's only publisher: the statement's
        // snapshot can predate the commit of the worker that held the lock just before, and
        // FOR UPDATE re-checks each row, dropping those that worker moved meanwhile (else they
        // would be published twice). Never SKIP LOCKED: skipping a row would reorder the shard.
        let mut rows: Vec<Row_> = sqlx::query(
            "WITH chosen AS MATERIALIZED (
                 SELECT s FROM unnest($1::int2[]) WITH ORDINALITY AS t(s, n)
                 WHERE EXISTS (SELECT 1 FROM ingestion.outbox o WHERE o.shard = t.s)
                   AND pg_try_advisory_xact_lock($2::int4, t.s::int4)
                 ORDER BY n
                 LIMIT 1)
             SELECT seq, shard, event_payload::text AS body,
                    event_payload->>'aggregate_id' AS aggregate_id,
                    event_payload->>'event_type' AS event_type,
                    event_payload->>'event_id' AS event_id,
                    event_payload->>'event_time' AS event_time,
                    event_payload->'metadata'->>'traceparent' AS traceparent
             FROM ingestion.outbox
             WHERE shard = (SELECT s FROM chosen)
             ORDER BY seq
             LIMIT $3
             FOR UPDATE",
        )
        .bind(shards)
        .bind(LOCK_NAMESPACE)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| Row_ {
            seq: r.get("seq"),
            shard: r.get("shard"),
            body: r.get("body"),
            aggregate_id: r.get("aggregate_id"),
            event_type: r.get("event_type"),
            event_id: r.get("event_id"),
            event_time: r.get::<Option<String>, _>("event_time").unwrap_or_default(),
            traceparent: r.get("traceparent"),
        })
        .collect();
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let shard = rows[0].shard;

        // The event store takes only what validation admits (envelope::storable_time); a row
        // from before that rule, or written around it, is quarantined as soon as it is first,
        // and the rows before it move now. It never reaches the bus.
        if let Some(bad) = rows
            .iter()
            .position(|r| !envelope::storable_time_text(&r.event_time))
        {
            if bad == 0 {
                let why = format!(
                    "event_time {:?} is outside what the event store accepts ({})",
                    rows[0].event_time,
                    envelope::STORABLE_TIMES
                );
                self.quarantine(&mut tx, shard, rows[0].seq, &why).await?;
                tx.commit().await?;
                self.narrowing.advance(shard, true);
                return Ok(1);
            }
            rows.truncate(bad);
        }

        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        // Everything the batch does is in a savepoint, so that a refusal can be recorded (or its
        // row quarantined) while this worker still holds the shard.
        let mut sp = sqlx::Acquire::begin(&mut *tx).await?;

        // The event store first, before anything reaches the bus: a row the database refuses
        // is never published. Its key is (event_id, ingested_at) since it is partitioned by
        // ingest day (V4); a republished duplicate carries the same ingested_at (it is in the
        // envelope), so it conflicts and is skipped. publish_seq is drawn in outbox order, the
        // order about to be published (recovery.rs).
        let stored = sqlx::query_scalar::<_, Option<i64>>(
            "WITH stored AS (
                 INSERT INTO ingestion.event_store
                     (event_id, event_type, aggregate_id, event_time, ingested_at, payload,
                      metadata, publish_seq)
                 SELECT (p->>'event_id')::uuid, p->>'event_type', p->>'aggregate_id',
                        (p->>'event_time')::timestamptz, (p->>'ingested_at')::timestamptz,
                        p->'payload', p->'metadata', nextval('ingestion.publish_seq')
                 FROM (SELECT event_payload AS p FROM ingestion.outbox
                       WHERE shard = $2 AND seq = ANY($1) ORDER BY seq) AS m
                 ON CONFLICT (event_id, ingested_at) DO NOTHING
                 RETURNING publish_seq)
             SELECT max(publish_seq) FROM stored",
        )
        .bind(&seqs)
        .bind(shard)
        .fetch_one(&mut *sp)
        .await;
        let last_seq = match stored {
            Ok(s) => s.unwrap_or(0),
            Err(e) => {
                sp.rollback().await?;
                return self.settle_failure(tx, shard, &seqs, e.into()).await;
            }
        };

        let started = Instant::now();
        let acked = match self.publish(&rows).await {
            Ok(acked) => acked,
            Err(e) => {
                sp.rollback().await?;
                return self.settle_failure(tx, shard, &seqs, e).await;
            }
        };
        metrics::histogram!("cj_outbox_publish_seconds").record(started.elapsed().as_secs_f64());

        // Acknowledged: the rows leave the outbox, and the highest acknowledged offsets are
        // recorded for the bus recovery (recovery.rs), in the same transaction.
        let (topics, partitions, offsets): (Vec<&str>, Vec<i32>, Vec<i64>) =
            acked.iter().map(|(t, p, o)| (*t, *p, *o)).collect();
        let moved = sqlx::query(
            "WITH moved AS (
                 DELETE FROM ingestion.outbox WHERE shard = $2 AND seq = ANY($1) RETURNING 1),
             marks AS (
                 INSERT INTO ingestion.bus_offsets
                     (shard, topic, \"partition\", max_offset, last_seq)
                 SELECT $2, t, p, o, $6
                 FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, o)
                 ON CONFLICT (topic, \"partition\", shard)
                 DO UPDATE SET max_offset = GREATEST(bus_offsets.max_offset, EXCLUDED.max_offset),
                               last_seq = GREATEST(bus_offsets.last_seq, EXCLUDED.last_seq)
                 RETURNING 1)
             SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM marks)",
        )
        .bind(&seqs)
        .bind(shard)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(last_seq)
        .execute(&mut *sp)
        .await;
        match moved {
            Ok(_) => sp.commit().await?,
            Err(e) => {
                sp.rollback().await?;
                return self.settle_failure(tx, shard, &seqs, e.into()).await;
            }
        }
        tx.commit().await?;
        if self.narrowing.shards(&[shard]).contains(&shard) {
            self.narrowing.advance(shard, false);
        }
        metrics::counter!("cj_outbox_published_total").increment(rows.len() as u64);
        Ok(rows.len())
    }

    /// Records a failed batch while this worker still holds the shard (no other worker can claim
    /// its later rows meanwhile): a row that failed alone for a reason waiting will not fix is
    /// quarantined, a larger batch that did so is narrowed down, and any other failure counts
    /// as an attempt on every row of the batch. Ok(1) when the row was quarantined (the shard
    /// moved on), else the error, for the worker's backoff.
    async fn settle_failure(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        shard: i16,
        seqs: &[i64],
        e: ProcessError,
    ) -> Result<usize, ProcessError> {
        let failure = failure_of(&e);
        let quarantined = matches!((&failure, seqs), (Failure::Permanent, [_]));
        match (failure, seqs) {
            (Failure::Permanent, [seq]) => {
                self.quarantine(&mut tx, shard, *seq, &e.to_string())
                    .await?;
                self.narrowing.advance(shard, true);
            }
            (failure, _) => {
                if let Failure::Permanent = failure {
                    tracing::warn!(shard, rows = seqs.len(), error = %e, "A batch was refused for what it holds; narrowing it down row by row.");
                    self.narrowing.start(shard, seqs.len());
                }
                metrics::counter!("cj_outbox_publish_failures_total").increment(1);
                sqlx::query(
                    "UPDATE ingestion.outbox
                     SET retry_count = retry_count + 1, last_error = $3, last_attempt_at = now()
                     WHERE shard = $1 AND seq = ANY($2)",
                )
                .bind(shard)
                .bind(seqs)
                .bind(e.to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        if quarantined { Ok(1) } else { Err(e) }
    }

    /// Moves one outbox row to the quarantine, with why.
    async fn quarantine(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        shard: i16,
        seq: i64,
        why: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "WITH q AS (DELETE FROM ingestion.outbox WHERE shard = $3 AND seq = $1
                        RETURNING seq, shard, event_id, created_at, event_payload, retry_count)
             INSERT INTO ingestion.outbox_quarantine
                 (seq, shard, event_id, created_at, event_payload, retry_count, error)
             SELECT seq, shard, event_id, created_at, event_payload, retry_count + 1, $2 FROM q",
        )
        .bind(seq)
        .bind(why)
        .bind(shard)
        .execute(&mut **tx)
        .await?;
        metrics::counter!("cj_outbox_quarantined_total").increment(1);
        tracing::error!(seq, error = %why, "An outbox row can never move; it was quarantined so that its shard goes on. List it with `cornjacket outbox quarantine list`.");
        Ok(())
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
            let record = EventMessage {
                event_type: &r.event_type,
                event_id: &r.event_id,
                aggregate_id: &r.aggregate_id,
                body: &r.body,
                traceparent: traceparent.as_deref(),
                resend: None,
            }
            .record(topic);
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
                     WHERE (shard, seq) IN (SELECT shard, seq FROM ingestion.outbox
                                            ORDER BY seq LIMIT $1)",
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
            ProcessError::Publish(..) if matches!(failure_of(e), Failure::Permanent) => {
                tracing::warn!(worker, failures, error = %e, "The broker refused a message of the batch; narrowing the batch down to it.");
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

/// Rows counted exactly before the backlog is estimated instead.
pub const EXACT_BACKLOG: i64 = 100_000;

/// Outbox backlog for `/health` and `/metrics`: rows, age of the oldest, rows past the retry
/// limit. Cheap however large the backlog, since probes and scrapes call it every few seconds
/// exactly when the outbox is behind: the count is exact up to [`EXACT_BACKLOG`] rows (a bounded
/// index-only scan) and beyond that the planner's estimate (the outbox is analysed every 5,000
/// changes); the oldest row is the first of each shard (seq order is commit order, so 16 index
/// probes); the retried rows come from a partial index that holds only them.
pub async fn backlog(pool: &PgPool, max_retries: i32) -> Result<(i64, f64, i64), sqlx::Error> {
    let r = sqlx::query(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM ingestion.outbox LIMIT $2) AS b) AS n,
                (SELECT reltuples::bigint FROM pg_class
                  WHERE oid = 'ingestion.outbox'::regclass) AS estimate,
                COALESCE(EXTRACT(EPOCH FROM now() - (
                    SELECT min(f.created_at) FROM generate_series(0, 15) AS s(shard)
                    CROSS JOIN LATERAL (SELECT created_at FROM ingestion.outbox o
                                         WHERE o.shard = s.shard ORDER BY seq LIMIT 1) AS f)),
                         0)::float8 AS age,
                (SELECT count(*) FROM ingestion.outbox WHERE retry_count > 0
                    AND retry_count > $1) AS stuck",
    )
    .bind(max_retries)
    .bind(EXACT_BACKLOG + 1)
    .fetch_one(pool)
    .await?;
    let n: i64 = r.get("n");
    let n = if n > EXACT_BACKLOG {
        n.max(r.get::<i64, _>("estimate"))
    } else {
        n
    };
    Ok((n, r.get("age"), r.get("stuck")))
}
