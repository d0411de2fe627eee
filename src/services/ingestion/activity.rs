//! Devices that go quiet ([Telemetry]): the platform knows when it last committed a reading of
//! every device, and when a device has sent nothing for its inactivity period it puts a
//! `device.inactive` event into the pipeline — through the outbox, like any event, so it is in
//! the event store and on the bus in the device's order — and `device.active` once the device
//! reports again. Exactly once per transition, with several instances and across restarts.
//!
//! - The writer notes every committed `sensor.reading` in [`Seen`] (memory, no extra write on
//!   the hot path); every round the monitor folds what it noted into
//!   `ingestion.device_activity` (`greatest`, so instances and rounds commute).
//! - A round decides transitions with one UPDATE each (see the table's migration for how that
//!   makes them once), then hands the pending ones to the writer under an event_id derived from
//!   the transition, and clears them.
//! - Time the platform was down is not silence: a device counts as seen at least when this
//!   instance started, so a restart after an hour does not call every device inactive; what
//!   a crash lost of the last round's notes (at most one round) is covered the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::AppState;
use super::writer::{Outcome, Pending, Writer};
use crate::envelope::catalogue::{Payload, SensorReading};
use crate::envelope::{Clock, Envelope, FieldError, Metadata, Source, format_time};
use crate::infra::http::{self, DbFailure, error_body};

pub const INACTIVE: &str = "device.inactive";
pub const ACTIVE: &str = "device.active";

/// The namespace of transition event ids (UUID v5): fixed, so every instance derives the same.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a1c_0f3e_2b7d_4c55_9e21_d0c4_71f8_a0b3);

/// Devices whose readings were committed since the last round, and when (the latest
/// `ingested_at`, the platform's clock).
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<HashMap<String, DateTime<Utc>>>>);

impl Seen {
    /// Notes the readings among committed events.
    pub fn record(&self, events: &[Pending], outcomes: &[Outcome]) {
        let mut seen = self.0.lock().expect("seen lock");
        for (p, o) in events.iter().zip(outcomes) {
            let e = &p.envelope;
            if e.event_type != SensorReading::EVENT_TYPE || !matches!(o, Outcome::Accepted(_)) {
                continue;
            }
            match seen.get_mut(e.aggregate_id.as_str()) {
                Some(t) if *t >= e.ingested_at => {}
                Some(t) => *t = e.ingested_at,
                None => {
                    seen.insert(e.aggregate_id.clone(), e.ingested_at);
                }
            }
        }
    }

    fn take(&self) -> HashMap<String, DateTime<Utc>> {
        std::mem::take(&mut *self.0.lock().expect("seen lock"))
    }

    /// Puts back what a failed round could not store, keeping anything newer noted meanwhile.
    fn restore(&self, back: HashMap<String, DateTime<Utc>>) {
        let mut seen = self.0.lock().expect("seen lock");
        for (d, t) in back {
            let e = seen.entry(d).or_insert(t);
            *e = (*e).max(t);
        }
    }
}

/// What a monitor needs.
pub struct Monitor {
    pub pool: PgPool,
    pub writer: Writer,
    pub seen: Seen,
    pub clock: Arc<dyn Clock>,
    /// `CJ_DEVICE_INACTIVITY_TIMEOUT`; zero: only devices with their own period are watched.
    pub default_timeout: Duration,
    /// `CJ_DEVICE_ACTIVITY_INTERVAL`: how often a round runs.
    pub every: Duration,
}

impl Monitor {
    pub async fn run(self, shutdown: CancellationToken) {
        let started = self.clock.now();
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = self.round(started).await {
                tracing::warn!(error = %e, "Device activity round failed; the next one retries.");
            }
        }
        // What was noted since the last round goes in before the process ends.
        let _ = self.flush().await;
    }

    /// Folds the noted readings in, decides the transitions that are due and emits them. A
    /// deadlock with another instance's flush (which locks rows in device order, these
    /// UPDATEs in scan order) fails one of the two rounds; both run again next tick and the
    /// flush puts its notes back, so nothing is lost.
    pub async fn round(&self, started: DateTime<Utc>) -> Result<(), RoundError> {
        self.flush().await?;
        let now = self.clock.now();
        let timeout = i32::try_from(self.default_timeout.as_secs()).unwrap_or(i32::MAX);
        sqlx::query(
            "UPDATE ingestion.device_activity
             SET state = 'inactive', changed_seen = last_seen, pending = 'device.inactive',
                 pending_at = $1, pending_since = last_seen,
                 pending_timeout = coalesce(timeout_seconds, $2), updated_at = now()
             WHERE state = 'active' AND pending IS NULL
               AND coalesce(timeout_seconds, $2) > 0
               AND greatest(last_seen, $3) + make_interval(secs => coalesce(timeout_seconds, $2)) <= $1",
        )
        .bind(now)
        .bind(timeout)
        .bind(started)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE ingestion.device_activity
             SET state = 'active', changed_seen = last_seen, pending = 'device.active',
                 pending_at = last_seen, pending_since = changed_seen, pending_timeout = NULL,
                 updated_at = now()
             WHERE state = 'inactive' AND pending IS NULL AND last_seen > changed_seen",
        )
        .execute(&self.pool)
        .await?;
        self.emit().await
    }

    async fn flush(&self) -> Result<(), sqlx::Error> {
        let seen = self.seen.take();
        if seen.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<(&String, &DateTime<Utc>)> = seen.iter().collect();
        // One lock order for every instance, so two flushes never deadlock.
        rows.sort();
        let r = sqlx::query(
            "INSERT INTO ingestion.device_activity AS a (device_id, last_seen)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[])
             ON CONFLICT (device_id) DO UPDATE SET last_seen = EXCLUDED.last_seen, updated_at = now()
             WHERE EXCLUDED.last_seen > a.last_seen",
        )
        .bind(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| *r.1).collect::<Vec<_>>())
        .execute(&self.pool)
        .await;
        if r.is_err() {
            self.seen.restore(seen);
        }
        r.map(drop)
    }

    /// Puts the pending transitions into the outbox and clears them.
    async fn emit(&self) -> Result<(), RoundError> {
        let pending: Vec<PendingRow> = sqlx::query_as(
            "SELECT device_id, pending, changed_seen, pending_at, pending_since, pending_timeout
             FROM ingestion.device_activity WHERE pending IS NOT NULL
             ORDER BY device_id LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        if pending.is_empty() {
            return Ok(());
        }
        let events: Vec<Pending> = pending.iter().map(PendingRow::event).collect();
        let outcomes = self.writer.submit(events).await?;
        let mut done = Vec::new();
        for (row, o) in pending.iter().zip(&outcomes) {
            match o {
                Outcome::Accepted(_) => done.push(row),
                other => {
                    tracing::warn!(device = %row.device_id, outcome = ?other, "A device transition was not stored; the next round retries.")
                }
            }
        }
        for kind in [INACTIVE, ACTIVE] {
            let (ids, seen): (Vec<&str>, Vec<DateTime<Utc>>) = done
                .iter()
                .filter(|r| r.pending == kind)
                .map(|r| (r.device_id.as_str(), r.changed_seen))
                .unzip();
            sqlx::query(
                "UPDATE ingestion.device_activity a SET pending = NULL, updated_at = now()
                 FROM UNNEST($1::text[], $2::timestamptz[]) AS d(id, seen)
                 WHERE a.device_id = d.id AND a.changed_seen = d.seen AND a.pending = $3",
            )
            .bind(ids)
            .bind(seen)
            .bind(kind)
            .execute(&self.pool)
            .await?;
            metrics::counter!("cj_device_transitions_total", "event_type" => kind)
                .increment(done.iter().filter(|r| r.pending == kind).count() as u64);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Write(#[from] super::writer::WriteError),
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    device_id: String,
    pending: String,
    changed_seen: DateTime<Utc>,
    pending_at: DateTime<Utc>,
    pending_since: Option<DateTime<Utc>>,
    pending_timeout: Option<i32>,
}

impl PendingRow {
    /// The transition's event: everything in it comes from the row, so whichever instance or
    /// round emits it, it is the same event (same id, same body).
    fn event(&self) -> Pending {
        let id = Uuid::new_v5(
            &NAMESPACE,
            format!(
                "{}\n{}\n{}",
                self.device_id,
                self.pending,
                self.changed_seen.timestamp_micros()
            )
            .as_bytes(),
        );
        let t = |t: Option<DateTime<Utc>>| t.map(|t| format_time(&t));
        let payload = if self.pending == INACTIVE {
            json!({ "last_seen": t(self.pending_since), "timeout_seconds": self.pending_timeout })
        } else {
            json!({ "last_seen": format_time(&self.changed_seen), "inactive_since": t(self.pending_since) })
        };
        let envelope = Envelope {
            event_id: id,
            event_type: self.pending.clone(),
            aggregate_id: self.device_id.clone(),
            event_time: self.pending_at,
            ingested_at: self.pending_at,
            payload: payload.as_object().expect("an object").clone(),
            metadata: Metadata {
                source: Source::Platform,
                traceparent: None,
                schema_version: 1,
                subject: None,
            },
        };
        // As a client that chose its event_id and event_time: a second emission is a retry.
        let body = json!({ "event_id": id, "event_time": format_time(&self.pending_at) });
        Pending::new(envelope, &body, None)
    }
}

// ---- The API: a device's activity, and its own inactivity period ----

crate::infra::http::routes! {
    /// Every route this module serves, for the OpenAPI agreement test.
    pub const ROUTES;
    pub fn router() -> Router<AppState> {
        get "/api/v1/devices/{device_id}/activity" => get_activity;
        put "/api/v1/devices/{device_id}/activity" => put_activity;
    }
}

fn failed(e: sqlx::Error) -> Response {
    match DbFailure::of(e) {
        DbFailure::Unavailable | DbFailure::NotMigrated => {
            http::unavailable("the database is unavailable; retry later")
        }
        DbFailure::Internal(e) => http::internal("Device activity request failed.", &e),
    }
}

fn bad(field: &str, message: &str) -> Response {
    http::invalid(
        "validation failed",
        &[FieldError {
            field: field.into(),
            message: message.into(),
        }],
    )
}

/// The device's activity as the API answers it, or None when it was never seen.
async fn activity(s: &AppState, device: &str) -> Result<Option<Value>, sqlx::Error> {
    /// last_seen, state, changed_seen, timeout_seconds.
    type Row = (DateTime<Utc>, String, Option<DateTime<Utc>>, Option<i32>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT last_seen, state, changed_seen, timeout_seconds
         FROM ingestion.device_activity WHERE device_id = $1",
    )
    .bind(device)
    .fetch_optional(&s.pool)
    .await?;
    let Some((last_seen, state, changed, own)) = row else {
        return Ok(None);
    };
    let effective = own.map_or(s.config.ingestion.inactivity_timeout.as_secs(), |t| {
        t as u64
    });
    let timeout = if effective == 0 {
        Value::from("off")
    } else {
        Value::from(humantime::format_duration(Duration::from_secs(effective)).to_string())
    };
    let inactive_since = match (state.as_str(), changed) {
        ("inactive", Some(c)) => Value::from(format_time(&c)),
        _ => Value::Null,
    };
    Ok(Some(json!({
        "device_id": device,
        "state": state,
        "last_seen": format_time(&last_seen),
        "inactive_since": inactive_since,
        "inactivity_timeout": timeout,
        "inactivity_timeout_seconds": effective,
        "inactivity_timeout_source": if own.is_some() { "device" } else { "default" },
    })))
}

async fn get_activity(State(s): State<AppState>, Path(device): Path<String>) -> Response {
    match activity(&s, &device).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error_body(
            StatusCode::NOT_FOUND,
            format!("no reading of device '{device}' was committed, and it has no settings"),
            json!([]),
        ),
        Err(e) => failed(e),
    }
}

/// Sets a device's own inactivity period: `{"inactivity_timeout": "30m"}`, `"off"` (never
/// inactive) or `null` (back to `CJ_DEVICE_INACTIVITY_TIMEOUT`). A device not seen yet gets a
/// row (seen now), so a period can be set before it first reports.
async fn put_activity(
    State(s): State<AppState>,
    Path(device): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(problem) = crate::envelope::aggregate_id_problem(&device) {
        return bad("device_id", problem);
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => {
            return bad(
                "body",
                "must be a JSON object: {\"inactivity_timeout\": \"30m\"}",
            );
        }
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                format!("invalid JSON: {e}"),
                json!([]),
            );
        }
    };
    if let Some(k) = body
        .as_object()
        .and_then(|m| m.keys().find(|k| *k != "inactivity_timeout"))
    {
        let k: String = k.chars().take(64).collect();
        return bad(&k, "unknown field; the only one is inactivity_timeout");
    }
    const RANGE: &str =
        "must be a whole number of seconds from 1s to 366d (90s, 30m, 12h), \"off\", or null";
    let seconds: Option<i32> = match body.get("inactivity_timeout") {
        None => {
            return bad(
                "inactivity_timeout",
                "required (null sets the default back)",
            );
        }
        Some(Value::Null) => None,
        Some(Value::String(t)) if t == "off" => Some(0),
        Some(Value::String(t)) => match humantime::parse_duration(t) {
            Ok(d)
                if (Duration::from_secs(1)..=Duration::from_secs(366 * 86_400)).contains(&d)
                    && d.subsec_nanos() == 0 =>
            {
                Some(d.as_secs() as i32)
            }
            _ => return bad("inactivity_timeout", RANGE),
        },
        Some(_) => return bad("inactivity_timeout", RANGE),
    };
    let stored = sqlx::query(
        "INSERT INTO ingestion.device_activity (device_id, last_seen, timeout_seconds)
         VALUES ($1, $2, $3)
         ON CONFLICT (device_id) DO UPDATE
         SET timeout_seconds = EXCLUDED.timeout_seconds, updated_at = now()",
    )
    .bind(&device)
    .bind(s.clock.now())
    .bind(seconds)
    .execute(&s.pool)
    .await;
    if let Err(e) = stored {
        return failed(e);
    }
    match activity(&s, &device).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => http::internal(
            "Device activity request failed.",
            &anyhow::anyhow!("row gone"),
        ),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::catalogue::{DeviceActive, DeviceInactive};

    fn row(kind: &str) -> PendingRow {
        let t = DateTime::from_timestamp(1_780_000_000, 123_456_000).unwrap();
        PendingRow {
            device_id: "d-1".into(),
            pending: kind.into(),
            changed_seen: t,
            pending_at: t + chrono::Duration::seconds(600),
            pending_since: Some(t - chrono::Duration::seconds(5)),
            pending_timeout: (kind == INACTIVE).then_some(600),
        }
    }

    /// What the platform emits is what the catalogue admits, and the same row always makes
    /// the same event (so a second emission is a duplicate, not a second transition).
    #[test]
    fn a_transition_is_one_well_formed_event() {
        for kind in [INACTIVE, ACTIVE] {
            let (a, b) = (row(kind).event(), row(kind).event());
            assert_eq!(a.envelope, b.envelope);
            assert_eq!(a.fingerprint, b.fingerprint);
            assert!(a.client_event_id);
            let p = &a.envelope.payload;
            if kind == INACTIVE {
                DeviceInactive::read(p).unwrap();
            } else {
                DeviceActive::read(p).unwrap();
            }
        }
        assert_ne!(
            row(INACTIVE).event().envelope.event_id,
            row(ACTIVE).event().envelope.event_id
        );
    }
}
