//! The consume loop (SPEC §7, ADR-0004, ADR-0014): gathers what the broker has ready, applies it
//! in one transaction, and only then stores and commits the offsets.
//!
//! Failures are sorted in two: a poison message (undecodable, invalid, or a handler error) is
//! retried after the configured delays and then dead-lettered, and its offset is committed; an
//! infrastructure failure (the database is unreachable) blocks — nothing is committed and
//! nothing is dead-lettered — and the same batch is retried with capped backoff until it lands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::handlers::{self, Entry, ProjectionWrite};
use super::store::{self, DeadLetter};
use crate::envelope::Envelope;
use crate::infra::bus::ObservedConsumer;
use crate::infra::db;

/// Why the consumer is not making progress, for `/health`.
#[derive(Default)]
pub struct Blocked(pub Mutex<Option<String>>);

pub struct Worker {
    pub pool: PgPool,
    pub consumer: Arc<ObservedConsumer>,
    pub group: String,
    pub retry_delays: Vec<Duration>,
    pub max_batch: usize,
    pub blocked: Arc<Blocked>,
    registry: HashMap<&'static str, Entry>,
}

enum Outcome {
    Write(ProjectionWrite),
    Skip,
    Poison(String),
}

impl Worker {
    pub fn new(
        pool: PgPool,
        consumer: Arc<ObservedConsumer>,
        group: String,
        retry_delays: Vec<Duration>,
        max_batch: usize,
        blocked: Arc<Blocked>,
    ) -> Self {
        Self {
            pool,
            consumer,
            group,
            retry_delays,
            max_batch,
            blocked,
            registry: handlers::registry(),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let mut batch = match first {
                Ok(m) => vec![m.detach()],
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "Consumer error.");
                    let _ = shutdown
                        .run_until_cancelled(tokio::time::sleep(Duration::from_millis(200)))
                        .await;
                    continue;
                }
            };
            // Take whatever else is already fetched, without waiting for more.
            while batch.len() < self.max_batch {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m.detach()),
                    _ => break,
                }
            }
            if !self.handle(&batch, &shutdown).await {
                break; // shut down mid-batch: nothing stored, the next owner re-reads it
            }
            for m in &batch {
                if let Err(e) = self
                    .consumer
                    .store_offset(m.topic(), m.partition(), m.offset())
                {
                    // A revoked partition: its new owner re-reads from the last commit.
                    tracing::debug!(error = %e, "Could not store an offset.");
                }
            }
            if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async) {
                tracing::debug!(error = %e, "Offset commit was not sent.");
            }
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || crate::infra::bus::commit_now(&consumer)).await;
    }

    fn outcome(&self, m: &OwnedMessage) -> Outcome {
        let Some(bytes) = m.payload() else {
            return Outcome::Poison("empty message".into());
        };
        let env = match Envelope::decode(bytes) {
            Ok(e) => e,
            Err(e) => return Outcome::Poison(e),
        };
        match self.registry.get(env.event_type.as_str()) {
            None => Outcome::Skip,
            Some(entry) => match (entry.handler)(&env) {
                Ok(w) => Outcome::Write(w),
                Err(e) => Outcome::Poison(format!("{}: {e}", env.event_type)),
            },
        }
    }

    /// Handles a batch until it is durably applied; false only when shut down first.
    async fn handle(&self, batch: &[OwnedMessage], shutdown: &CancellationToken) -> bool {
        let mut writes = Vec::new();
        let mut source: HashMap<uuid::Uuid, usize> = HashMap::new();
        let mut poison: Vec<(usize, String)> = Vec::new();
        let mut skipped = 0u64;
        for (i, m) in batch.iter().enumerate() {
            match self.outcome(m) {
                Outcome::Write(w) => {
                    source.insert(w.event_id, i);
                    writes.push(w);
                }
                Outcome::Skip => skipped += 1,
                Outcome::Poison(e) => poison.push((i, e)),
            }
        }
        if skipped > 0 {
            metrics::counter!("cj_events_skipped_total", "consumer" => self.group.clone())
                .increment(skipped);
        }
        // ADR-0004: retry poison messages after each configured delay before dead-lettering.
        let mut retries = 0;
        for delay in &self.retry_delays {
            if poison.is_empty() {
                break;
            }
            if shutdown
                .run_until_cancelled(tokio::time::sleep(*delay))
                .await
                .is_none()
            {
                return false;
            }
            retries += 1;
            poison.retain_mut(|(i, err)| match self.outcome(&batch[*i]) {
                Outcome::Write(w) => {
                    source.insert(w.event_id, *i);
                    writes.push(w);
                    false
                }
                Outcome::Skip => false,
                Outcome::Poison(e) => {
                    *err = e;
                    true
                }
            });
        }
        let mut letters: Vec<DeadLetter> = poison
            .into_iter()
            .map(|(i, error)| self.letter(&batch[i], error, retries))
            .collect();
        let writes = handlers::newest_per_row(writes);

        let mut backoff = Duration::from_millis(100);
        loop {
            match self.apply(&writes, &letters).await {
                Ok(()) => break,
                Err(e) if db::is_unavailable(&e) => {
                    *self.blocked.0.lock().expect("blocked lock") =
                        Some(format!("database unavailable: {e}"));
                    metrics::counter!("cj_consumer_blocked_total", "consumer" => self.group.clone())
                        .increment(1);
                    tracing::warn!(group = %self.group, error = %e, retry_in = ?backoff,
                        "Database unavailable; holding the batch (no commit) until it returns.");
                    if shutdown
                        .run_until_cancelled(tokio::time::sleep(backoff))
                        .await
                        .is_none()
                    {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The batch holds a write the database refuses: isolate it, one by one.
                    tracing::warn!(group = %self.group, error = %e, "Batch refused; applying one by one.");
                    match self
                        .apply_one_by_one(batch, &source, &writes, &mut letters)
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if db::is_unavailable(&e) => continue,
                        Err(e) => {
                            tracing::error!(group = %self.group, error = %e, "Could not apply or dead-letter a batch; retrying.");
                            if shutdown
                                .run_until_cancelled(tokio::time::sleep(backoff))
                                .await
                                .is_none()
                            {
                                return false;
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        }
        *self.blocked.0.lock().expect("blocked lock") = None;
        metrics::counter!("cj_projection_updates_total", "consumer" => self.group.clone())
            .increment(writes.len() as u64);
        if !letters.is_empty() {
            metrics::counter!("cj_dlq_written_total", "consumer" => self.group.clone())
                .increment(letters.len() as u64);
            for l in &letters {
                tracing::warn!(group = %self.group, topic = %l.topic, partition = l.partition,
                    offset = l.offset, error = %l.error, "Message dead-lettered.");
            }
        }
        true
    }

    fn letter(&self, m: &OwnedMessage, error: String, retries: i32) -> DeadLetter {
        DeadLetter {
            consumer: self.group.clone(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().map(<[u8]>::to_vec),
            error,
            retries,
        }
    }

    async fn apply(
        &self,
        writes: &[ProjectionWrite],
        letters: &[DeadLetter],
    ) -> Result<(), sqlx::Error> {
        if writes.is_empty() && letters.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        store::upsert(&mut tx, writes).await?;
        store::insert_dead_letters(&mut tx, letters).await?;
        tx.commit().await
    }

    async fn apply_one_by_one(
        &self,
        batch: &[OwnedMessage],
        source: &HashMap<uuid::Uuid, usize>,
        writes: &[ProjectionWrite],
        letters: &mut Vec<DeadLetter>,
    ) -> Result<(), sqlx::Error> {
        for w in writes {
            let mut tx = self.pool.begin().await?;
            match store::upsert(&mut tx, std::slice::from_ref(w)).await {
                Ok(_) => tx.commit().await?,
                Err(e) if db::is_unavailable(&e) => return Err(e),
                Err(e) => {
                    drop(tx);
                    let error = format!("projection write refused: {e}");
                    letters.push(self.letter(&batch[source[&w.event_id]], error, 0));
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        store::insert_dead_letters(&mut tx, letters).await?;
        tx.commit().await
    }
}
