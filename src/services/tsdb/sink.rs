//! `sensor.reading` envelopes → typed rows, inserted in one statement per batch.

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::infra::consume::{DeadLetter, Poison, Sink};
use crate::infra::dlq;

#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub time: DateTime<Utc>,
    pub device_id: String,
    pub value: f64,
    pub unit: String,
    pub event_id: Uuid,
    pub ingested_at: DateTime<Utc>,
}

pub fn reading(env: &Envelope) -> Result<Reading, String> {
    let value = match env.payload.get("value") {
        Some(Value::Number(n)) => n.as_f64().filter(|v| v.is_finite()),
        _ => None,
    }
    .ok_or("payload.value must be a finite number")?;
    let unit = env
        .payload
        .get("unit")
        .and_then(Value::as_str)
        .filter(|u| !u.trim().is_empty())
        .ok_or("payload.unit must be a non-empty string")?;
    Ok(Reading {
        time: env.event_time,
        device_id: env.aggregate_id.clone(),
        value,
        unit: unit.to_string(),
        event_id: env.event_id,
        ingested_at: env.ingested_at,
    })
}

pub struct Readings {
    pub pool: PgPool,
}

impl Sink for Readings {
    type Item = Reading;

    fn decode(&self, m: &OwnedMessage) -> Result<Option<Reading>, Poison> {
        let bytes = m
            .payload()
            .ok_or_else(|| Poison::Undecodable("empty message".into()))?;
        let env = Envelope::decode(bytes).map_err(Poison::Undecodable)?;
        if env.event_type != "sensor.reading" {
            return Ok(None);
        }
        reading(&env)
            .map(Some)
            .map_err(|e| Poison::Refused(format!("sensor.reading: {e}")))
    }

    async fn apply(&self, rows: &[Reading], letters: &[DeadLetter]) -> Result<(), sqlx::Error> {
        if rows.is_empty() && letters.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !rows.is_empty() {
            let r = sqlx::query(
                "INSERT INTO tsdb.sensor_readings (time, device_id, value, unit, event_id, ingested_at)
                 SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::float8[], $4::text[],
                                      $5::uuid[], $6::timestamptz[])
                 ON CONFLICT (device_id, time, event_id) DO NOTHING",
            )
            .bind(rows.iter().map(|r| r.time).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.value).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.unit.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.ingested_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            metrics::counter!("cj_tsdb_readings_written_total").increment(r.rows_affected());
        }
        dlq::insert(&mut tx, "tsdb.dlq", letters).await?;
        tx.commit().await
    }
}
