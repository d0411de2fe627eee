//! The consumer's sink: each event is matched against the enabled rules and a delivery is
//! recorded per match — `pending`, or `deduplicated` when the rule already fired for the same
//! (event type, aggregate) within its window (a delivery that failed or was cancelled does not
//! count: its receiver never got the news; a parked `circuit_open` one does, it is sent when the
//! breaker closes) — in the same transaction
//! that makes the batch
//! durable. Only then does the shared consume loop commit the offsets, so a crash between the
//! two re-records (idempotently, on (event_id, rule_id)) instead of losing a webhook.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::condition::Condition;
use super::rules::{self, Rule};
use super::status::DeliveryStatus;
use crate::envelope::Envelope;
use crate::infra::bus::message;
use crate::infra::consume::{DeadLetter, Poison, Sink};
use crate::infra::dlq;

pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    pub ingested_at: DateTime<Utc>,
    /// The envelope exactly as it came off the bus: the webhook body.
    pub body: String,
    pub json: Value,
    pub traceparent: Option<String>,
    /// Republished by `cornjacket replay` (header `cj-replay`).
    pub replayed: bool,
}

pub struct Recorder {
    pub pool: PgPool,
    pub default_dedup: Duration,
    /// Wakes the delivery worker of this process when something new is pending.
    pub wake: Arc<Notify>,
}

impl Sink for Recorder {
    type Item = Event;

    fn decode(&self, m: &OwnedMessage) -> Result<Option<Event>, Poison> {
        let undecodable = |e: String| Poison::Undecodable(e);
        let bytes = m
            .payload()
            .ok_or_else(|| undecodable("empty message".into()))?;
        let env = Envelope::decode(bytes).map_err(undecodable)?;
        let body = String::from_utf8(bytes.to_vec()).map_err(|e| undecodable(e.to_string()))?;
        let json: Value = serde_json::from_str(&body).map_err(|e| undecodable(e.to_string()))?;
        let traceparent = message::traceparent(m)
            .or_else(|| {
                json.pointer("/metadata/traceparent")
                    .and_then(Value::as_str)
            })
            .map(str::to_string);
        let replayed = message::is_replay(m);
        Ok(Some(Event {
            replayed,
            event_id: env.event_id,
            event_type: env.event_type,
            aggregate_id: env.aggregate_id,
            ingested_at: env.ingested_at,
            body,
            json,
            traceparent,
        }))
    }

    async fn apply(&self, events: &[Event], letters: &[DeadLetter]) -> Result<(), sqlx::Error> {
        let rules: Vec<(Rule, Option<Condition>)> = if events.is_empty() {
            Vec::new()
        } else {
            rules::enabled(&self.pool)
                .await?
                .into_iter()
                .filter_map(|r| match r.condition.as_ref().map(Condition::parse) {
                    None => Some((r, None)),
                    Some(Ok(c)) => Some((r, Some(c))),
                    // Validated on the way in; a row that no longer parses must not match all.
                    Some(Err(e)) => {
                        tracing::error!(rule_id = %r.rule_id, errors = ?e,
                            "A stored rule condition does not parse; the rule is skipped.");
                        None
                    }
                })
                .collect()
        };
        let matches: Vec<(&Event, &Rule)> = events
            .iter()
            .flat_map(|e| {
                rules
                    .iter()
                    .filter(|(r, c)| r.matches(&e.event_type, &e.json, c.as_ref()))
                    // A replay refills the bus; it must not fire rules created after the event
                    // was accepted (they never promised it). Rules older than the event record
                    // it as they would have live — idempotently.
                    .filter(|(r, _)| !e.replayed || r.created_at <= e.ingested_at)
                    .map(move |(r, _)| (e, r))
            })
            .collect();
        if matches.is_empty() && letters.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let (mut pending, mut deduplicated) = (0u64, 0u64);
        for (e, r) in matches {
            let window_ms = r
                .dedup_window_ms
                .unwrap_or(self.default_dedup.as_millis() as i64);
            let status: Option<DeliveryStatus> = sqlx::query_scalar(
                "INSERT INTO actions.deliveries
                    (delivery_id, rule_id, event_id, event_type, aggregate_id, event_at, endpoint,
                     body, traceparent, status)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9,
                     CASE WHEN $10::bigint > 0 AND EXISTS (
                         SELECT 1 FROM actions.deliveries d
                         WHERE d.rule_id = $2 AND d.event_type = $4 AND d.aggregate_id = $5
                           AND d.status IN ('pending', 'delivering', 'delivered', 'circuit_open')
                           AND d.event_id <> $3
                           AND d.event_at <= $6
                           AND d.event_at > $6 - make_interval(secs => $10::bigint / 1000.0))
                     THEN 'deduplicated' ELSE 'pending' END
                 ON CONFLICT (event_id, rule_id) DO NOTHING
                 RETURNING status",
            )
            .bind(Uuid::now_v7())
            .bind(r.rule_id)
            .bind(e.event_id)
            .bind(&e.event_type)
            .bind(&e.aggregate_id)
            .bind(e.ingested_at)
            .bind(&r.webhook_url)
            .bind(&e.body)
            .bind(&e.traceparent)
            .bind(window_ms)
            .fetch_optional(&mut *tx)
            .await?;
            match status {
                Some(DeliveryStatus::Pending) => pending += 1,
                Some(_) => deduplicated += 1,
                None => {} // already recorded: a redelivery or a replay
            }
        }
        dlq::insert(&mut tx, "actions.dlq", letters).await?;
        tx.commit().await?;
        metrics::counter!("cj_webhook_deliveries_recorded_total", "status" => DeliveryStatus::Pending.as_str())
            .increment(pending);
        metrics::counter!("cj_webhook_deliveries_recorded_total", "status" => DeliveryStatus::Deduplicated.as_str())
            .increment(deduplicated);
        if pending > 0 {
            self.wake.notify_one();
        }
        Ok(())
    }
}
