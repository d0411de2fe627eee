//! `sensor.reading` envelopes → typed rows, inserted in one statement per batch.

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sqlx::PgPool;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::envelope::catalogue::{Payload, PayloadError, SensorReading};
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

pub fn reading(env: &Envelope) -> Result<Reading, PayloadError> {
    let SensorReading { value, unit } = env.payload_as()?;
    Ok(Reading {
        time: env.event_time,
        device_id: env.aggregate_id.clone(),
        value,
        unit,
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
        if env.event_type != SensorReading::EVENT_TYPE {
            return Ok(None);
        }
        reading(&env)
            .map(Some)
            .map_err(|e| Poison::Refused(format!("{}: {e}", SensorReading::EVENT_TYPE)))
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
