//! The handler registry (ADR-0014): event type → the projection write it produces. Handlers are
//! pure functions of the envelope, so replays and redeliveries give the same answer.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::envelope::catalogue::{Payload, SensorReading, UserLogin};
use crate::envelope::{Envelope, format_time};

/// An upsert of one projection row, applied only if newer than what is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionWrite {
    pub projection_type: &'static str,
    pub aggregate_id: String,
    pub state: Value,
    pub event_id: Uuid,
    pub event_time: DateTime<Utc>,
}

impl ProjectionWrite {
    /// The order in which writes to one projection apply: event time, then event id.
    pub fn version(&self) -> (DateTime<Utc>, Uuid) {
        (self.event_time, self.event_id)
    }
}

pub type Handler = fn(&Envelope) -> Result<ProjectionWrite, String>;

/// A registered handler and the projection type it writes.
#[derive(Clone, Copy)]
pub struct Entry {
    pub projection: &'static str,
    pub handler: Handler,
}

/// event type → handler (ADR-0014). Types without an entry are consumed and skipped.
pub fn registry() -> HashMap<&'static str, Entry> {
    HashMap::from([
        (
            SensorReading::EVENT_TYPE,
            Entry {
                projection: "sensor_state",
                handler: sensor_state,
            },
        ),
        (
            UserLogin::EVENT_TYPE,
            Entry {
                projection: "user_session",
                handler: user_session,
            },
        ),
    ])
}

fn sensor_state(e: &Envelope) -> Result<ProjectionWrite, String> {
    let SensorReading { value, unit } = e.payload_as().map_err(|e| e.to_string())?;
    Ok(ProjectionWrite {
        projection_type: "sensor_state",
        aggregate_id: e.aggregate_id.clone(),
        state: json!({ "value": value, "unit": unit, "event_time": format_time(&e.event_time) }),
        event_id: e.event_id,
        event_time: e.event_time,
    })
}

fn user_session(e: &Envelope) -> Result<ProjectionWrite, String> {
    let UserLogin { user_id, ip } = e.payload_as().map_err(|e| e.to_string())?;
    Ok(ProjectionWrite {
        projection_type: "user_session",
        aggregate_id: e.aggregate_id.clone(),
        state: json!({ "user_id": user_id, "ip": ip, "event_time": format_time(&e.event_time) }),
        event_id: e.event_id,
        event_time: e.event_time,
    })
}

/// Keeps only the newest write per projection row, so one multi-row upsert can apply a batch.
pub fn newest_per_row(writes: Vec<ProjectionWrite>) -> Vec<ProjectionWrite> {
    let mut best: HashMap<(&'static str, String), ProjectionWrite> = HashMap::new();
    for w in writes {
        let key = (w.projection_type, w.aggregate_id.clone());
        match best.get(&key) {
            Some(cur) if cur.version() >= w.version() => {}
            _ => {
                best.insert(key, w);
            }
        }
    }
    best.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Metadata, Source};

    fn env(value: Value, t: i64) -> Envelope {
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: "sensor.reading".into(),
            aggregate_id: "d1".into(),
            event_time: DateTime::from_timestamp(t, 0).unwrap(),
            ingested_at: DateTime::from_timestamp(t, 0).unwrap(),
            payload: json!({ "value": value, "unit": "c" })
                .as_object()
                .unwrap()
                .clone(),
            metadata: Metadata {
                source: Source::Http,
                traceparent: None,
                schema_version: 1,
                subject: None,
            },
        }
    }

    #[test]
    fn sensor_state_carries_value_unit_and_time() {
        let w = sensor_state(&env(json!(72.5), 1_700_000_000)).unwrap();
        assert_eq!(w.state["value"], json!(72.5));
        assert_eq!(w.state["unit"], json!("c"));
        assert_eq!(w.state["event_time"], json!("2023-11-14T22:13:20.000000Z"));
        assert!(sensor_state(&env(json!("x"), 1)).is_err());
    }

    #[test]
    fn newest_wins_within_a_batch() {
        let old = sensor_state(&env(json!(1), 100)).unwrap();
        let new = sensor_state(&env(json!(2), 200)).unwrap();
        let kept = newest_per_row(vec![new.clone(), old]);
        assert_eq!(kept, vec![new]);
    }
}
