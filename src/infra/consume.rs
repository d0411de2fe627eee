//! The consume loop every bus consumer of the platform shares (SPEC §7, ADR-0004): gather what
//! the broker has ready, apply it in one transaction, and only then store and commit offsets.
//!
//! Failures are sorted by cause ([`Poison`], [`db::classify`]):
//! - a message that is not one at all (no payload, not JSON, not an envelope) is dead-lettered
//!   at once: decoding is deterministic, so retrying it cannot help;
//! - a message refused by its handler, or whose write the database refuses for its data (a data
//!   exception, an integrity violation), is retried after each configured delay (SPEC §7:
//!   immediately, 1 s, 2 s) and only then dead-lettered;
//! - everything else the database says is about the environment — unreachable, a privilege
//!   revoked, a table renamed mid-rollout, a pooler's protocol error — and blocks: nothing is
//!   committed, nothing is dead-lettered, `/health` says why, and the same batch is retried
//!   with capped backoff until it lands.
//!
//! Dead letters ([`crate::infra::dlq`]) are written in the consuming service's own `dlq` table,
//! in the transaction that applies the batch's good messages; then the offsets are committed.
//!
//! What a consumer does with a message is its [`Sink`]; the services keep their tables and
//! logic, this module only the delivery guarantees.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;

pub use crate::infra::dlq::DeadLetter;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::bus::message;
use super::bus::{ConsumerState, ObservedConsumer};
use super::db::{self, Failure};
use super::http::{Check, Status};
use super::telemetry;

/// What a consumer does with messages.
pub trait Sink: Send + Sync + 'static {
    type Item: Send + Sync;

    /// A message's meaning: `Ok(None)` when it is not for this consumer (skipped and committed),
    /// `Err` when it is poison. Must be deterministic: retries call it again.
    fn decode(&self, m: &OwnedMessage) -> Result<Option<Self::Item>, Poison>;

    /// Applies items and dead letters atomically (one transaction).
    fn apply(
        &self,
        items: &[Self::Item],
        letters: &[DeadLetter],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Why a message cannot become an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    /// Not a message of the platform at all: no payload, not JSON, not an envelope.
    /// Dead-lettered without retries.
    #[error("{0}")]
    Undecodable(String),
    /// A well-formed message its handler refuses: retried on the schedule, then dead-lettered.
    #[error("{0}")]
    Refused(String),
}

/// Why a consumer is not making progress, for `/health`.
#[derive(Default)]
pub struct Blocked(pub Mutex<Option<String>>);

impl Blocked {
    fn set(&self, reason: Option<String>) {
        *self.0.lock().expect("blocked lock") = reason;
    }

    pub fn reason(&self) -> Option<String> {
        self.0.lock().expect("blocked lock").clone()
    }
}

/// The `consumer` line of a consuming service's `/health`.
pub fn consumer_check(
    group: &str,
    ready: bool,
    state: Option<&Arc<ConsumerState>>,
    blocked: &Blocked,
) -> Vec<(&'static str, Check)> {
    let mut checks = Vec::new();
    if let Some(reason) = blocked.reason() {
        checks.push((
            "processing",
            Check::new(Status::Unhealthy, json!({ "blocked": reason })),
        ));
    }
    let consumer = match (ready, state) {
        (false, _) => Check::new(
            Status::Unhealthy,
            json!({ "error": "migrations not applied yet: waiting for the database" }),
        ),
        (true, None) => Check::new(
            Status::Degraded,
            json!({ "group": group, "state": "starting" }),
        ),
        (true, Some(c)) => {
            let assigned = c.assigned_count();
            let status = if assigned == 0 {
                Status::Degraded
            } else {
                Status::Healthy
            };
            Check::new(
                status,
                json!({
                    "group": group,
                    "assigned_partitions": assigned,
                    "lag": c.total_lag(),
                    "last_error": c.last_error.lock().expect("error lock").clone(),
                }),
            )
        }
    };
    checks.push(("consumer", consumer));
    checks
}

pub struct Worker<S: Sink> {
    pub sink: S,
    pub consumer: Arc<ObservedConsumer>,
    pub group: String,
    pub retry_delays: Vec<Duration>,
    pub max_batch: usize,
    pub blocked: Arc<Blocked>,
}

impl<S: Sink> Worker<S> {
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
            self.store_offsets(&batch);
            if self.consumer.context().state.commits_held() {
                tracing::debug!(group = %self.group, "Brokers were lost recently; holding the offset commit.");
            } else if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Async) {
                tracing::debug!(error = %e, "Offset commit was not sent.");
            }
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || super::bus::commit_now(&consumer)).await;
    }

    /// Stores the batch's offsets for the next commit, except on a partition whose position moved
    /// behind the batch meanwhile: its topic was recreated (the patched librdkafka resets such
    /// partitions to the beginning, vendor/rdkafka-sys/PATCHES.md), and an offset of the old
    /// topic committed into the new one would make the next owner skip the new log's head.
    fn store_offsets(&self, batch: &[OwnedMessage]) {
        let mut last: Vec<(&str, i32, i64)> = Vec::new();
        for m in batch {
            match last
                .iter_mut()
                .find(|(t, p, _)| *t == m.topic() && *p == m.partition())
            {
                Some(l) => l.2 = l.2.max(m.offset()),
                None => last.push((m.topic(), m.partition(), m.offset())),
            }
        }
        let positions = self.consumer.position().ok();
        for (topic, partition, offset) in last {
            let position = positions
                .as_ref()
                .and_then(|tpl| tpl.find_partition(topic, partition))
                .map(|e| e.offset());
            let Some(position) = position else {
                continue; // revoked meanwhile: its new owner re-reads from the last commit
            };
            if !matches!(position, rdkafka::Offset::Offset(p) if p > offset) {
                tracing::warn!(group = %self.group, topic, partition, offset, ?position,
                    "The partition was reset while its batch was applied; not storing the old offset.");
                continue;
            }
            if let Err(e) = self.consumer.store_offset(topic, partition, offset) {
                // A revoked partition: its new owner re-reads from the last commit.
                tracing::debug!(error = %e, "Could not store an offset.");
            }
        }
    }

    /// Handles a batch until it is durably applied; false only when shut down first.
    async fn handle(&self, batch: &[OwnedMessage], shutdown: &CancellationToken) -> bool {
        // Items with the index of the message they came from.
        let mut items: Vec<(usize, S::Item)> = Vec::new();
        let mut poison: Vec<(usize, String)> = Vec::new();
        let mut skipped = 0u64;
        // One span per message, from its decoding until the batch is applied (traces on only).
        let _spans: Vec<tracing::Span> = if telemetry::traces_on() {
            batch.iter().map(|m| self.message_span(m)).collect()
        } else {
            Vec::new()
        };
        let mut letters: Vec<DeadLetter> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match self.sink.decode(m) {
                Ok(Some(item)) => items.push((i, item)),
                Ok(None) => skipped += 1,
                Err(Poison::Undecodable(e)) => {
                    letters.push(DeadLetter::of(&self.group, m, e, 0));
                }
                Err(Poison::Refused(e)) => poison.push((i, e)),
            }
        }
        if skipped > 0 {
            metrics::counter!("cj_events_skipped_total", "consumer" => self.group.clone())
                .increment(skipped);
        }
        // ADR-0004: retry refused messages after each configured delay before dead-lettering.
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
            poison.retain_mut(|(i, err)| match self.sink.decode(&batch[*i]) {
                Ok(Some(item)) => {
                    items.push((*i, item));
                    false
                }
                Ok(None) => false,
                Err(e) => {
                    *err = e.to_string();
                    true
                }
            });
        }
        // Poison retried into items joined at the end: restore message order.
        items.sort_by_key(|(i, _)| *i);
        letters.extend(
            poison
                .into_iter()
                .map(|(i, error)| DeadLetter::of(&self.group, &batch[i], error, retries)),
        );
        let (sources, items): (Vec<usize>, Vec<S::Item>) = items.into_iter().unzip();

        let mut backoff = Duration::from_millis(100);
        let applied = loop {
            let result = match self.sink.apply(&items, &letters).await {
                Err(e) if db::classify(&e) == Failure::Refusal => {
                    // The batch holds a write the database refuses: isolate it, one by one.
                    tracing::warn!(group = %self.group, error = %e, "Batch refused; applying one by one.");
                    match self
                        .apply_one_by_one(batch, &sources, &items, &mut letters, shutdown)
                        .await
                    {
                        Some(result) => result,
                        None => return false,
                    }
                }
                other => other.map(|()| items.len()),
            };
            match result {
                Ok(n) => break n,
                Err(e) => {
                    if db::classify(&e) == Failure::Outage {
                        self.blocked.set(Some(outage_reason(&e)));
                        metrics::counter!("cj_consumer_blocked_total", "consumer" => self.group.clone())
                            .increment(1);
                        if db::is_unavailable(&e) {
                            tracing::warn!(group = %self.group, error = %e, retry_in = ?backoff,
                                "Database unavailable; holding the batch (no commit) until it returns.");
                        } else {
                            // A grant, a relation, a pooler: it does not come back by itself.
                            tracing::error!(group = %self.group, error = %e, sqlstate = ?sqlstate(&e), retry_in = ?backoff,
                                "The database refuses the batch for a reason that is not the messages' (privileges, schema, pooler); holding it (no commit, nothing dead-lettered) until that is fixed.");
                        }
                    } else {
                        tracing::error!(group = %self.group, error = %e, "Could not dead-letter refused messages; retrying.");
                    }
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
        };
        self.blocked.set(None);
        metrics::counter!("cj_consumer_applied_total", "consumer" => self.group.clone())
            .increment(applied as u64);
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

    fn message_span(&self, m: &OwnedMessage) -> tracing::Span {
        telemetry::with_parent(
            tracing::info_span!(
                "event",
                otel.name = "consume",
                otel.kind = "consumer",
                messaging.consumer.group.name = %self.group,
                messaging.destination.name = m.topic(),
            ),
            message::traceparent(m),
        )
    }

    /// Applies items one transaction each, in order; one the database refuses is retried after
    /// each configured delay, then dead-lettered. Returns how many were applied, an outage to
    /// block on, or None when shut down first.
    async fn apply_one_by_one(
        &self,
        batch: &[OwnedMessage],
        sources: &[usize],
        items: &[S::Item],
        letters: &mut Vec<DeadLetter>,
        shutdown: &CancellationToken,
    ) -> Option<Result<usize, sqlx::Error>> {
        let mut refused = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let mut delays = self.retry_delays.iter();
            let mut retries = 0;
            loop {
                let e = match self.sink.apply(std::slice::from_ref(item), &[]).await {
                    Ok(()) => break,
                    Err(e) if db::classify(&e) == Failure::Outage => return Some(Err(e)),
                    Err(e) => e,
                };
                let Some(delay) = delays.next() else {
                    refused.push(DeadLetter::of(
                        &self.group,
                        &batch[sources[i]],
                        format!("write refused: {e}{}", sqlstate_suffix(&e)),
                        retries,
                    ));
                    break;
                };
                tracing::debug!(group = %self.group, error = %e, retry_in = ?delay, "Write refused; retrying it.");
                shutdown
                    .run_until_cancelled(tokio::time::sleep(*delay))
                    .await?;
                retries += 1;
            }
        }
        let applied = items.len() - refused.len();
        let mut all = letters.clone();
        all.extend(refused);
        if let Err(e) = self.sink.apply(&[], &all).await {
            return Some(Err(e));
        }
        *letters = all;
        Some(Ok(applied))
    }
}

/// The SQLSTATE of a database error, when it has one.
fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

fn sqlstate_suffix(e: &sqlx::Error) -> String {
    sqlstate(e).map_or_else(String::new, |c| format!(" (SQLSTATE {c})"))
}

/// What `/health` says while an outage blocks the consumer.
fn outage_reason(e: &sqlx::Error) -> String {
    let cause = if db::is_unavailable(e) {
        "database unavailable"
    } else {
        "the database refuses every write for a reason that is not the messages'"
    };
    format!("{cause}: {e}{}", sqlstate_suffix(e))
}
