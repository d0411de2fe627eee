//! Recovery from a bus that lost acknowledged messages: a broker that restarted on memory storage
//! (Tansu locally) comes back without the platform's topics and without what was on them. The
//! event store still has every event, so the processor recreates the topics and republishes,
//! before it publishes anything new, what the consumers had not yet consumed, in the order it was
//! first published.
//!
//! How a loss is noticed: a topic the platform publishes to is missing. The check runs before a
//! process publishes its first batch, after any failed publish, and on every watch tick. (Tansu
//! 0.6 reports a partition's high watermark as the base offset of its last batch plus one, not
//! the next offset, so watermarks cannot be compared with acknowledged offsets there.)
//!
//! What is republished. Each event gets a `publish_seq` in publish order as it moves, and the move
//! records per (shard, topic, partition) the highest acknowledged offset and the shard's highest
//! `publish_seq` (`ingestion.bus_offsets`). A shard's batches are sequential, so once every
//! consumer group of a topic has committed past those offsets, every event of that shard and topic
//! up to that `publish_seq` has been consumed: the watch records it as `consumed_seq`. A recovery
//! republishes the events after it; consumers are idempotent, so a few extra cost nothing. A
//! configured consumer group that never commits holds `consumed_seq` back: a loss then costs
//! more republishing, never an event.
//!
//! Why it cannot reorder. Publishing in a process takes the read side of `gate`; a recovery takes
//! the write side (no batch of this process in flight), then every shard's advisory lock (no batch
//! of any process in flight), recreates the topics, republishes and records the new offsets
//! before anything else is published. The platform's publishers only create topics here (and at
//! startup), so new events cannot reach a recreated topic ahead of the republished ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use sqlx::{PgPool, Row};
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

use super::processor::LOCK_NAMESPACE;
use super::writer::{SHARDS, shard_of};
use crate::config::{KafkaConfig, Topics};
use crate::infra::bus;
use crate::infra::bus::message::{EventMessage, Resend};

/// Rows republished per page.
const PAGE: i64 = 1000;
/// Broker calls of a check.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(String),
}

/// One recorded (shard, topic, partition) of `ingestion.bus_offsets`.
struct Mark {
    shard: i16,
    topic: String,
    partition: i32,
    max_offset: i64,
    last_seq: i64,
}

pub struct Recovery {
    pool: PgPool,
    producer: Arc<bus::SharedProducer>,
    kafka: KafkaConfig,
    topics: Topics,
    /// Each consumer group with the topics it reads.
    groups: Vec<(String, Vec<String>)>,
    readers: tokio::sync::OnceCell<Vec<Arc<bus::GroupOffsets>>>,
    gate: RwLock<()>,
    needs_check: AtomicBool,
}

impl Recovery {
    pub fn new(
        pool: PgPool,
        producer: Arc<bus::SharedProducer>,
        kafka: &KafkaConfig,
        readers: Vec<(String, Vec<String>)>,
    ) -> Self {
        Self {
            pool,
            producer,
            kafka: kafka.clone(),
            topics: kafka.topics.clone(),
            groups: readers,
            readers: tokio::sync::OnceCell::new(),
            gate: RwLock::new(()),
            // A process checks before its first publish: the bus may have lost data while it
            // was down.
            needs_check: AtomicBool::new(true),
        }
    }

    /// Asks for a check before the next publish (after a failed publish, say).
    pub fn suspect(&self) {
        self.needs_check.store(true, Ordering::Release);
    }

    /// Waits until publishing is safe (running the pending check if there is one) and returns
    /// the guard a batch holds while it publishes.
    pub async fn permit(&self) -> Result<RwLockReadGuard<'_, ()>, RecoveryError> {
        loop {
            if !self.needs_check.load(Ordering::Acquire) {
                let guard = self.gate.read().await;
                if !self.needs_check.load(Ordering::Acquire) {
                    return Ok(guard);
                }
            }
            self.check_now().await?;
        }
    }

    /// Runs the pending check, if any, with this process's publishing stopped.
    async fn check_now(&self) -> Result<(), RecoveryError> {
        let _exclusive = self.gate.write().await;
        if self.needs_check.load(Ordering::Acquire) {
            self.check_and_recover().await?;
            self.needs_check.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Each platform topic with its partition count, `None` when the broker does not have it.
    async fn topic_states(&self) -> Result<Vec<(String, Option<usize>)>, RecoveryError> {
        let producer = self.producer.get();
        let names: Vec<String> = self.topics.all().iter().map(|t| t.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|topic| {
                    bus::partition_count(producer.client(), &topic, BROKER_TIMEOUT)
                        .map(|n| (topic, n))
                        .map_err(|e| RecoveryError::Broker(e.to_string()))
                })
                .collect()
        })
        .await
        .map_err(|e| RecoveryError::Broker(e.to_string()))?
    }

    /// Holds every shard, recreates missing topics and republishes what they lost.
    async fn check_and_recover(&self) -> Result<(), RecoveryError> {
        let mut tx = self.pool.begin().await?;
        // Ascending order, so two processes recovering at once cannot deadlock; each lock waits
        // for the batch (of any process) that holds the shard.
        sqlx::query("SELECT pg_advisory_xact_lock($1, s) FROM generate_series(0, $2) AS s")
            .bind(LOCK_NAMESPACE)
            .bind(SHARDS as i32 - 1)
            .execute(&mut *tx)
            .await?;
        let lost: Vec<String> = self
            .topic_states()
            .await?
            .into_iter()
            .filter(|(_, n)| n.is_none())
            .map(|(t, _)| t)
            .collect();
        if lost.is_empty() {
            tx.commit().await?;
            return Ok(());
        }
        bus::ensure_topics(&self.kafka, &self.topics.all())
            .await
            .map_err(|e| RecoveryError::Broker(e.to_string()))?;
        if self.topic_states().await?.iter().any(|(_, n)| n.is_none()) {
            return Err(RecoveryError::Broker(
                "topics are not available yet after creating them".into(),
            ));
        }
        let thresholds: HashMap<(String, i16), i64> = sqlx::query(
            "SELECT topic, shard, consumed_seq FROM ingestion.bus_progress WHERE topic = ANY($1)",
        )
        .bind(&lost)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| ((r.get("topic"), r.get("shard")), r.get("consumed_seq")))
        .collect();
        tracing::warn!(topics = ?lost, "The bus lost its topics; republishing what consumers had not consumed from the event store.");

        // A broker that lost its state no longer knows the idempotent producer's id and would
        // refuse its messages until they time out: republish on a new producer session.
        let current = self.producer.get();
        self.producer.replace(&current, &self.kafka).await;
        let (marks, republished) = self.republish(&mut tx, &lost, &thresholds).await?;
        sqlx::query("DELETE FROM ingestion.bus_offsets WHERE topic = ANY($1)")
            .bind(&lost)
            .execute(&mut *tx)
            .await?;
        for m in &marks {
            sqlx::query(
                "INSERT INTO ingestion.bus_offsets (shard, topic, \"partition\", max_offset, last_seq)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(m.shard)
            .bind(&m.topic)
            .bind(m.partition)
            .bind(m.max_offset)
            .bind(m.last_seq)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("INSERT INTO ingestion.bus_recoveries (topics, republished) VALUES ($1, $2)")
            .bind(&lost)
            .bind(republished as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for topic in &lost {
            metrics::counter!("cj_bus_recoveries_total", "topic" => topic.clone()).increment(1);
        }
        metrics::counter!("cj_bus_republished_total").increment(republished);
        tracing::warn!(topics = ?lost, republished, "Bus recovered.");
        Ok(())
    }

    /// Publishes the lost topics' unconsumed events in publish order and waits for every
    /// acknowledgement. Returns the new marks (per shard, topic and partition) and the count.
    async fn republish(
        &self,
        tx: &mut sqlx::PgConnection,
        lost: &[String],
        thresholds: &HashMap<(String, i16), i64>,
    ) -> Result<(Vec<Mark>, u64), RecoveryError> {
        let threshold = |topic: &str, shard: i16| {
            thresholds
                .get(&(topic.to_string(), shard))
                .copied()
                .unwrap_or(0)
        };
        let from = lost
            .iter()
            .flat_map(|t| (0..SHARDS).map(move |s| threshold(t, s)))
            .min()
            .unwrap_or(0);
        let producer = self.producer.get();
        let mut marks: HashMap<(i16, String, i32), (i64, i64)> = HashMap::new();
        let mut count = 0u64;
        let mut after = from;
        loop {
            let rows = sqlx::query(
                "SELECT event_id::text AS event_id, event_type, aggregate_id, publish_seq,
                        ingestion.envelope_json(s)::text AS body,
                        metadata->>'traceparent' AS traceparent
                 FROM ingestion.event_store s
                 WHERE publish_seq > $1
                 ORDER BY publish_seq
                 LIMIT $2",
            )
            .bind(after)
            .bind(PAGE)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.get("publish_seq");
            let mut deliveries = Vec::with_capacity(rows.len());
            for r in &rows {
                let event_type: &str = r.get("event_type");
                let aggregate_id: &str = r.get("aggregate_id");
                let topic = self.topics.for_event_type(event_type);
                let shard = shard_of(aggregate_id);
                let seq: i64 = r.get("publish_seq");
                if !lost.iter().any(|t| t == topic) || seq <= threshold(topic, shard) {
                    continue;
                }
                let record = EventMessage {
                    event_type,
                    event_id: r.get("event_id"),
                    aggregate_id,
                    body: r.get("body"),
                    traceparent: r.get("traceparent"),
                    resend: Some(Resend::BusRecovery),
                }
                .record(topic);
                let deadline = std::time::Instant::now() + self.kafka.message_timeout;
                let f = bus::enqueue(&producer, record, deadline)
                    .await
                    .map_err(|e| RecoveryError::Broker(format!("republish failed: {e}")))?;
                deliveries.push((topic, shard, seq, f));
            }
            for (topic, shard, seq, d) in deliveries {
                let delivery = d
                    .await
                    .map_err(|_| RecoveryError::Broker("republish canceled".into()))?
                    .map_err(|(e, _)| RecoveryError::Broker(format!("republish failed: {e}")))?;
                count += 1;
                let m = marks
                    .entry((shard, topic.to_string(), delivery.partition))
                    .or_insert((delivery.offset, seq));
                m.0 = m.0.max(delivery.offset);
                m.1 = m.1.max(seq);
            }
        }
        let marks = marks
            .into_iter()
            .map(|((shard, topic, partition), (max_offset, last_seq))| Mark {
                shard,
                topic,
                partition,
                max_offset,
                last_seq,
            })
            .collect();
        Ok((marks, count))
    }

    /// The watch: notices a loss while the processor is idle, and moves `consumed_seq` up as
    /// consumer groups commit.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.tick().await {
                tracing::debug!(error = %e, "Bus watch tick failed; trying again next tick.");
            }
        }
    }

    async fn tick(&self) -> Result<(), RecoveryError> {
        let states = self.topic_states().await?;
        if states.iter().any(|(_, n)| n.is_none()) {
            self.suspect();
        }
        if self.needs_check.load(Ordering::Acquire) {
            return self.check_now().await;
        }
        // The marks first, the committed offsets after: offsets only grow, so a mark that the
        // groups have passed stays passed.
        let marks: Vec<Mark> = sqlx::query(
            "SELECT shard, topic, \"partition\", max_offset, last_seq FROM ingestion.bus_offsets",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| Mark {
            shard: r.get("shard"),
            topic: r.get("topic"),
            partition: r.get("partition"),
            max_offset: r.get("max_offset"),
            last_seq: r.get("last_seq"),
        })
        .collect();
        let readers = self
            .readers
            .get_or_try_init(|| async {
                let mut v = Vec::new();
                for (g, _) in &self.groups {
                    v.push(Arc::new(bus::GroupOffsets::new(&self.kafka, g).await?));
                }
                anyhow::Ok(v)
            })
            .await
            .map_err(|e| RecoveryError::Broker(e.to_string()))?
            .clone();
        for (topic, partitions) in states {
            let Some(n) = partitions else { continue };
            let readers: Vec<Arc<bus::GroupOffsets>> = readers
                .iter()
                .zip(&self.groups)
                .filter(|(_, (_, topics))| topics.contains(&topic))
                .map(|(r, _)| r.clone())
                .collect();
            let t = topic.clone();
            let ceiling = ceiling(&marks, &topic, n);
            let committed = tokio::task::spawn_blocking(move || {
                readers
                    .iter()
                    .map(|r| r.committed(&t, n, BROKER_TIMEOUT))
                    .collect::<Result<Vec<_>, KafkaError>>()
            })
            .await
            .map_err(|e| RecoveryError::Broker(e.to_string()))?
            .map_err(|e| RecoveryError::Broker(e.to_string()))?;
            let committed = least_committed(&committed, &ceiling, n);
            for (shard, upto) in consumed(&marks, &topic, &committed) {
                sqlx::query(
                    "INSERT INTO ingestion.bus_progress (topic, shard, consumed_seq)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (topic, shard) DO UPDATE
                     SET consumed_seq = GREATEST(bus_progress.consumed_seq, EXCLUDED.consumed_seq),
                         updated_at = now()
                     WHERE bus_progress.consumed_seq < EXCLUDED.consumed_seq",
                )
                .bind(&topic)
                .bind(shard)
                .bind(upto)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }
}

/// Per partition of `topic`, one past the highest offset the platform recorded publishing: no
/// consumer can genuinely have read further.
fn ceiling(marks: &[Mark], topic: &str, partitions: usize) -> Vec<i64> {
    let mut c = vec![0; partitions];
    for m in marks.iter().filter(|m| m.topic == topic) {
        if let Some(x) = c.get_mut(m.partition as usize) {
            *x = (*x).max(m.max_offset + 1);
        }
    }
    c
}

/// Per partition, the least offset any group has committed (the next offset it will read). A
/// commit past `ceiling` counts as nothing: it is a position of the topic before it was lost,
/// committed into the new one by a consumer that had not noticed yet, and says nothing about
/// what the new log's consumers have read.
fn least_committed(per_group: &[Vec<i64>], ceiling: &[i64], partitions: usize) -> Vec<i64> {
    let mut least = vec![i64::MAX; partitions];
    for committed in per_group {
        for (p, l) in least.iter_mut().enumerate() {
            let c = committed.get(p).copied().unwrap_or(0);
            let c = if c > ceiling.get(p).copied().unwrap_or(0) {
                0
            } else {
                c
            };
            *l = (*l).min(c);
        }
    }
    least
}

/// The shards of `topic` whose every recorded offset the groups have consumed (`committed` is
/// the next offset each partition's slowest group reads), with the `publish_seq` consumed.
fn consumed(marks: &[Mark], topic: &str, committed: &[i64]) -> Vec<(i16, i64)> {
    let mut by_shard: HashMap<i16, (bool, i64)> = HashMap::new();
    for m in marks.iter().filter(|m| m.topic == topic) {
        let passed = committed
            .get(m.partition as usize)
            .is_some_and(|c| *c > m.max_offset);
        let e = by_shard.entry(m.shard).or_insert((true, 0));
        e.0 &= passed;
        e.1 = e.1.max(m.last_seq);
    }
    let mut v: Vec<(i16, i64)> = by_shard
        .into_iter()
        .filter(|(_, (passed, _))| *passed)
        .map(|(s, (_, seq))| (s, seq))
        .collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(shard: i16, partition: i32, max_offset: i64, last_seq: i64) -> Mark {
        Mark {
            shard,
            topic: "t".into(),
            partition,
            max_offset,
            last_seq,
        }
    }

    #[test]
    fn a_commit_past_what_was_published_counts_as_nothing() {
        let marks = [mark(0, 0, 9, 40), mark(1, 1, 4, 41)];
        let ceiling = ceiling(&marks, "t", 3);
        assert_eq!(ceiling, vec![10, 5, 0]);
        // Group a read everything; group b committed 500 on partition 0, a stale position.
        let least = least_committed(&[vec![10, 5, 0], vec![500, 5, 0]], &ceiling, 3);
        assert_eq!(least, vec![0, 5, 0]);
        assert_eq!(consumed(&marks, "t", &least), vec![(1, 41)]);
        // No group reads the topic: nothing holds it back.
        assert_eq!(least_committed(&[], &ceiling, 2), vec![i64::MAX; 2]);
    }

    #[test]
    fn a_shard_is_consumed_once_every_partition_it_wrote_is_passed() {
        let marks = [mark(0, 0, 9, 40), mark(0, 1, 4, 38), mark(1, 1, 7, 41)];
        // Partition 1 read up to offset 5: shard 0's offset 4 is passed, shard 1's 7 is not.
        assert_eq!(consumed(&marks, "t", &[10, 5]), vec![(0, 40)]);
        assert_eq!(consumed(&marks, "t", &[10, 8]), vec![(0, 40), (1, 41)]);
        assert_eq!(
            consumed(&marks, "t", &[9, 8]),
            vec![(1, 41)],
            "offset 9 not yet read"
        );
        assert!(consumed(&marks, "other", &[100, 100]).is_empty());
        // A partition the groups do not report (fewer partitions now) is never passed.
        assert_eq!(consumed(&marks, "t", &[10]), vec![]);
    }
}
