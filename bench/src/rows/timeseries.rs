//! timeseries-30d: p99 of a 30-day chart of one device (1-hour buckets) with a year of data at
//! one reading a minute, read the way the query serves it (the 1-hour rollup, raw rows at the
//! edges) and, for comparison in the same run, over raw rows alone (`source=raw`).

use std::time::Instant;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::ctx::Ctx;
use crate::report::Row;
use crate::{http, log};

/// The year of readings, generated in the database: raw rows, then both rollups from them as
/// the tsdb-writer would have kept them. `ingested_at` is now, so the raw retention job
/// (which keeps a row until its ingestion is old too) leaves them while the row runs.
const GENERATE: &str = "
    WITH raw AS (
        INSERT INTO tsdb.sensor_readings (time, device_id, key, value, unit, event_id, ingested_at)
        SELECT date_trunc('minute', now()) - i * interval '1 minute', $1, 'value',
               20 + 5 * sin(i / 240.0) + (i % 7) * 0.1, 'celsius', gen_random_uuid(), now()
        FROM generate_series(0, 525599) AS i
        RETURNING time, device_id, key, value, event_id),
    m AS (
        INSERT INTO tsdb.sensor_rollups_1m
        SELECT device_id, key, date_bin(interval '1 minute', time, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
               count(*), sum(value), min(value), max(value),
               (array_agg(time ORDER BY time DESC, event_id DESC))[1],
               (array_agg(event_id ORDER BY time DESC, event_id DESC))[1],
               (array_agg(value ORDER BY time DESC, event_id DESC))[1]
        FROM raw WHERE time > now() - interval '30 days' GROUP BY 1, 2, 3)
    INSERT INTO tsdb.sensor_rollups_1h
    SELECT device_id, key, date_bin(interval '1 hour', time, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
           count(*), sum(value), min(value), max(value),
           (array_agg(time ORDER BY time DESC, event_id DESC))[1],
           (array_agg(event_id ORDER BY time DESC, event_id DESC))[1],
           (array_agg(value ORDER BY time DESC, event_id DESC))[1]
    FROM raw GROUP BY 1, 2, 3";

async fn remove(ctx: &Ctx, device: &str) -> anyhow::Result<()> {
    let db = ctx.db()?;
    for table in [
        "tsdb.sensor_readings",
        "tsdb.sensor_rollups_1m",
        "tsdb.sensor_rollups_1h",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE device_id = $1"))
            .bind(device)
            .execute(db)
            .await?;
    }
    Ok(())
}

/// `n` sequential requests of `path` (after a few unmeasured ones): server time as the client
/// sees it on loopback, and the last answer.
async fn measure(ctx: &Ctx, path: &str, n: usize) -> anyhow::Result<(Histogram<u64>, Value)> {
    let (addr, host) = &ctx.query;
    let mut h = Histogram::<u64>::new(3)?;
    let mut last = Value::Null;
    for i in 0..n + 3 {
        let t = Instant::now();
        let (status, body) = http::get_once(*addr, host, path).await?;
        let us = t.elapsed().as_micros() as u64;
        if status != 200 {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        if i >= 3 {
            h.record(us.max(1))?;
        }
        last = serde_json::from_slice(&body).context("the answer is JSON")?;
    }
    Ok((h, last))
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let device = format!("ts-year-{}", ctx.run);
    let t = Instant::now();
    sqlx::query(GENERATE)
        .bind(&device)
        .execute(ctx.db()?)
        .await?;
    sqlx::query("ANALYZE tsdb.sensor_readings, tsdb.sensor_rollups_1m, tsdb.sensor_rollups_1h")
        .execute(ctx.db()?)
        .await?;
    log(format!(
        "timeseries-30d: a year of minutely readings generated in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    // The database's clock, which dated the readings.
    let to: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(ctx.db()?)
        .await?;
    let from = to - chrono::Duration::days(30);
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let path = format!(
        "/api/v1/query/timeseries/{device}?from={}&to={}&bucket=1h&agg=avg&key=value",
        fmt(from),
        fmt(to)
    );
    let result = async {
        let (rollup, a) = measure(ctx, &path, 200).await?;
        let (raw, b) = measure(ctx, &format!("{path}&source=raw"), 30).await?;
        anyhow::Ok((rollup, a, raw, b))
    }
    .await;
    remove(ctx, &device).await?;
    let (rollup, a, raw, b) = result?;
    let points = a["points"].as_array().map_or(0, Vec::len);
    let same = a["points"]
        .as_array()
        .zip(b["points"].as_array())
        .is_some_and(|(x, y)| {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| {
                    p["count"] == q["count"]
                        && (p["value"].as_f64().unwrap_or(f64::NAN)
                            - q["value"].as_f64().unwrap_or(f64::NAN))
                        .abs()
                            < 1e-9
                })
        });
    let mut r = Row::new("timeseries-30d");
    r.latency(&rollup);
    r.result = format!(
        "p99 {:.1} ms (raw rows: p99 {:.1} ms)",
        rollup.value_at_quantile(0.99) as f64 / 1000.0,
        raw.value_at_quantile(0.99) as f64 / 1000.0
    );
    r.goal = "reads the rollup, not 43,200 raw rows".into();
    r.goal_met = Some(
        same && a["sources"]
            .as_array()
            .is_some_and(|s| s.contains(&json!("rollup_1h"))),
    );
    r.config = format!(
        "one device, a year at one reading a minute (525,600 raw rows, 8,760 hourly rollup rows; generated in the database); GET 30 days, bucket=1h, agg=avg: {} points from {}; 200 sequential requests (raw: 30, source=raw, p50 {:.1} ms); answers equal: {same}; idle pipeline; client, platform and PostgreSQL share the 2 cores",
        points,
        a["sources"],
        raw.value_at_quantile(0.5) as f64 / 1000.0
    );
    r.details = json!({
        "rollup_p50_us": rollup.value_at_quantile(0.5),
        "rollup_p99_us": rollup.value_at_quantile(0.99),
        "raw_p50_us": raw.value_at_quantile(0.5),
        "raw_p99_us": raw.value_at_quantile(0.99),
        "points": points,
        "sources": a["sources"],
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
