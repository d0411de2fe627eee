//! `sensor.reading` envelopes → one typed row per quantity, and the rollups, written in one
//! statement per batch.

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sqlx::PgPool;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::envelope::catalogue::{Payload, PayloadError, Quantity, SensorReading};
use crate::infra::consume::{DeadLetter, Poison, Sink};
use crate::infra::dlq;

/// One reading: the rows of its quantities share its time and event.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub time: DateTime<Utc>,
    pub device_id: String,
    pub quantities: Vec<Quantity>,
    pub event_id: Uuid,
    pub ingested_at: DateTime<Utc>,
}

pub fn reading(env: &Envelope) -> Result<Reading, PayloadError> {
    let SensorReading { quantities } = env.payload_as()?;
    Ok(Reading {
        time: env.event_time,
        device_id: env.aggregate_id.clone(),
        quantities,
        event_id: env.event_id,
        ingested_at: env.ingested_at,
    })
}

/// A rollup's upsert from the rows `ins` (the batch's newly inserted readings): the
/// aggregates of each (device, key, bucket) added to what the bucket holds, `last` kept by
/// (time, event_id). Rows go in key order so two writers never wait on each other in a cycle.
macro_rules! rollup_upsert {
    ($table:literal, $width:literal) => {
        concat!(
            "INSERT INTO ",
            $table,
            " AS r
             SELECT device_id, key,
                    date_bin(interval '",
            $width,
            "', time, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
                    count(*), sum(value), min(value), max(value),
                    (array_agg(time ORDER BY time DESC, event_id DESC))[1],
                    (array_agg(event_id ORDER BY time DESC, event_id DESC))[1],
                    (array_agg(value ORDER BY time DESC, event_id DESC))[1]
             FROM ins GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
             ON CONFLICT (device_id, key, bucket) DO UPDATE
             SET count = r.count + EXCLUDED.count,
                 sum = r.sum + EXCLUDED.sum,
                 min = least(r.min, EXCLUDED.min),
                 max = greatest(r.max, EXCLUDED.max),
                 last_time = CASE WHEN (EXCLUDED.last_time, EXCLUDED.last_event_id)
                                       > (r.last_time, r.last_event_id)
                                  THEN EXCLUDED.last_time ELSE r.last_time END,
                 last_value = CASE WHEN (EXCLUDED.last_time, EXCLUDED.last_event_id)
                                        > (r.last_time, r.last_event_id)
                                   THEN EXCLUDED.last_value ELSE r.last_value END,
                 last_event_id = CASE WHEN (EXCLUDED.last_time, EXCLUDED.last_event_id)
                                           > (r.last_time, r.last_event_id)
                                      THEN EXCLUDED.last_event_id ELSE r.last_event_id END
             RETURNING 1"
        )
    };
}

/// The raw rows and both rollups in one statement: the rollups see only what the insert
/// inserted, so a redelivery (its rows already there) adds nothing to them. That holds as long
/// as a redelivered reading's raw row is still there: the retention job keeps a row until both
/// its event time and its ingestion are older than the raw window (see `retention::enforce`),
/// and the event store, from which a replay would resend it, keeps events no longer than that
/// by default (`CJ_RETENTION_EVENTS` ≤ `CJ_RETENTION_TIMESERIES`).
const WRITE: &str = concat!(
    "WITH ins AS (
        INSERT INTO tsdb.sensor_readings (time, device_id, key, value, unit, event_id, ingested_at)
        SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::float8[], $5::text[],
                             $6::uuid[], $7::timestamptz[])
        ON CONFLICT (device_id, key, time, event_id) DO NOTHING
        RETURNING device_id, key, time, event_id, value),
     m AS (",
    rollup_upsert!("tsdb.sensor_rollups_1m", "1 minute"),
    "), h AS (",
    rollup_upsert!("tsdb.sensor_rollups_1h", "1 hour"),
    ") SELECT count(*) FROM ins"
);

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
            let n: usize = rows.iter().map(|r| r.quantities.len()).sum();
            let (mut time, mut device, mut key, mut value, mut unit, mut id, mut ingested) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for r in rows {
                for q in &r.quantities {
                    time.push(r.time);
                    device.push(r.device_id.as_str());
                    key.push(q.key.as_str());
                    value.push(q.value);
                    unit.push(q.unit.as_deref());
                    id.push(r.event_id);
                    ingested.push(r.ingested_at);
                }
            }
            let written: i64 = sqlx::query_scalar(WRITE)
                .bind(time)
                .bind(device)
                .bind(key)
                .bind(value)
                .bind(unit)
                .bind(id)
                .bind(ingested)
                .fetch_one(&mut *tx)
                .await?;
            metrics::counter!("cj_tsdb_readings_written_total").increment(written as u64);
        }
        dlq::insert(&mut tx, "tsdb.dlq", letters).await?;
        tx.commit().await
    }
}
