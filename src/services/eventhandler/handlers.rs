//! The handler registry (ADR-0014): event type → the projection write it produces. Handlers are
//! pure functions of the envelope, so replays and redeliveries give the same answer.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
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

/// A device's state: the newest reading's time (and, when it measured one quantity, its value
/// and unit at the top, as before readings had several), and under `values` the latest value
/// of every quantity the device ever reported, each with the time and id of the event that
/// carried it. Quantities merge by that version ([`merge_values`], and the upsert's SQL), so
/// a reading of humidity alone never erases the latest temperature, and any interleaving or
/// duplication of a device's readings folds into the same state.
fn sensor_state(e: &Envelope) -> Result<ProjectionWrite, String> {
    let SensorReading { quantities } = e.payload_as().map_err(|e| e.to_string())?;
    let (time, id) = (format_time(&e.event_time), e.event_id.to_string());
    let values: Map<String, Value> = quantities
        .iter()
        .map(|q| {
            let entry =
                json!({ "value": q.value, "unit": q.unit, "event_time": time, "event_id": id });
            (q.key.clone(), entry)
        })
        .collect();
    let mut state = json!({ "event_time": time, "values": values });
    if let [only] = quantities.as_slice() {
        state["value"] = json!(only.value);
        state["unit"] = json!(only.unit);
    }
    Ok(ProjectionWrite {
        projection_type: "sensor_state",
        aggregate_id: e.aggregate_id.clone(),
        state,
        event_id: e.event_id,
        event_time: e.event_time,
    })
}

/// The version of one quantity's entry in `values`: its event's time, then id (the SQL
/// compares the same pair as timestamptz and uuid).
fn entry_version(v: &Value) -> Option<(DateTime<Utc>, Uuid)> {
    let t = DateTime::parse_from_rfc3339(v.get("event_time")?.as_str()?).ok()?;
    let id = Uuid::parse_str(v.get("event_id")?.as_str()?).ok()?;
    Some((t.with_timezone(&Utc), id))
}

/// `older`'s quantities that `newer` lacks or holds at an older version, added to `newer`.
fn merge_values(newer: &mut Value, older: &Value) {
    let (Some(old), Some(new)) = (
        older.get("values").and_then(Value::as_object),
        newer.get_mut("values").and_then(Value::as_object_mut),
    ) else {
        return;
    };
    for (k, o) in old {
        match new.get(k) {
            Some(n) if entry_version(n) >= entry_version(o) => {}
            _ => {
                new.insert(k.clone(), o.clone());
            }
        }
    }
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

/// One write per projection row, so one multi-row upsert can apply a batch: the newest write,
/// with the quantities of older ones merged into it (`values`, see [`sensor_state`]).
pub fn newest_per_row(writes: Vec<ProjectionWrite>) -> Vec<ProjectionWrite> {
    let mut best: HashMap<(&'static str, String), ProjectionWrite> = HashMap::new();
    for mut w in writes {
        let key = (w.projection_type, w.aggregate_id.clone());
        match best.get_mut(&key) {
            Some(cur) if cur.version() >= w.version() => merge_values(&mut cur.state, &w.state),
            Some(cur) => {
                merge_values(&mut w.state, &cur.state);
                *cur = w;
            }
            None => {
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
        assert_eq!(w.state["values"]["value"]["value"], json!(72.5));
        assert!(sensor_state(&env(json!("x"), 1)).is_err());
    }

    fn multi(values: Value, t: i64) -> ProjectionWrite {
        let mut e = env(json!(0), t);
        e.payload = json!({ "values": values }).as_object().unwrap().clone();
        sensor_state(&e).unwrap()
    }

    /// The fold of a device's readings, in any order and with any of them repeated, is one
    /// state: the newest reading's time, and every quantity's latest value.
    #[test]
    fn quantities_fold_to_one_state_in_any_order() {
        use proptest::prelude::*;
        let writes = [
            multi(json!({"t": 1.0, "h": 10.0}), 100),
            multi(json!({"h": 11.0}), 200),
            multi(json!({"t": 2.0, "p": 5.0}), 150),
            sensor_state(&env(json!(7.0), 120)).unwrap(),
            multi(json!({"t": 3.0}), 50),
        ];
        let fold = |order: &[usize]| {
            let ws = order.iter().map(|&i| writes[i].clone()).collect::<Vec<_>>();
            // Batches of any size: each folds within itself, then into the stored state.
            let mut stored: Option<ProjectionWrite> = None;
            for chunk in ws.chunks(2) {
                for mut w in newest_per_row(chunk.to_vec()) {
                    if let Some(s) = stored.take() {
                        if s.version() >= w.version() {
                            let mut s = s;
                            merge_values(&mut s.state, &w.state);
                            w = s;
                        } else {
                            merge_values(&mut w.state, &s.state);
                        }
                    }
                    stored = Some(w);
                }
            }
            stored.unwrap().state
        };
        let expected = fold(&[0, 1, 2, 3, 4]);
        assert_eq!(expected["values"]["t"]["value"], json!(2.0));
        assert_eq!(expected["values"]["h"]["value"], json!(11.0));
        assert_eq!(expected["values"]["p"]["value"], json!(5.0));
        assert_eq!(expected["values"]["value"]["value"], json!(7.0));
        assert_eq!(expected["event_time"], writes[1].state["event_time"]);
        proptest!(|(order in proptest::collection::vec(0..writes.len(), 1..12)
                        .prop_filter("every reading at least once", |o| (0..5).all(|i| o.contains(&i))))| {
            prop_assert_eq!(fold(&order), expected.clone());
        });
    }

    #[test]
    fn newest_wins_within_a_batch() {
        let old = sensor_state(&env(json!(1), 100)).unwrap();
        let new = sensor_state(&env(json!(2), 200)).unwrap();
        let kept = newest_per_row(vec![new.clone(), old]);
        assert_eq!(kept, vec![new]);
    }
}
