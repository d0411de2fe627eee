//! console: p99 server time of the console's devices page and device page with 10,000 devices
//! and a million readings (100 a device, one a minute, with their rollups), generated in the
//! database as the event handler and the tsdb-writer would have left them.

use std::time::Instant;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::ctx::Ctx;
use crate::report::Row;
use crate::{http, log};

const DEVICES: i64 = 10_000;
const READINGS: i64 = 100;

/// Raw readings and their 1-minute rollups (one reading a minute: one row a bucket), then the
/// hourly rollups from those, then each device's projection.
const GENERATE: [&str; 3] = [
    "WITH d AS (SELECT $1 || lpad(i::text, 5, '0') AS id, i FROM generate_series(1, $2::bigint) AS i),
     raw AS (
        INSERT INTO tsdb.sensor_readings (time, device_id, key, value, unit, event_id, ingested_at)
        SELECT date_trunc('minute', now()) - j * interval '1 minute', d.id, 'value',
               20 + 3 * sin((d.i + j) / 10.0), 'celsius', gen_random_uuid(), now()
        FROM d, generate_series(0, $3::bigint - 1) AS j
        RETURNING time, device_id, key, value, event_id)
     INSERT INTO tsdb.sensor_rollups_1m
     SELECT device_id, key, time, 1, value, value, value, time, event_id, value FROM raw",
    "INSERT INTO tsdb.sensor_rollups_1h
     SELECT device_id, key, date_bin(interval '1 hour', bucket, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
            sum(count), sum(sum), min(min), max(max),
            (array_agg(last_time ORDER BY last_time DESC, last_event_id DESC))[1],
            (array_agg(last_event_id ORDER BY last_time DESC, last_event_id DESC))[1],
            (array_agg(last_value ORDER BY last_time DESC, last_event_id DESC))[1]
     FROM tsdb.sensor_rollups_1m WHERE starts_with(device_id, $1) GROUP BY 1, 2, 3",
    "INSERT INTO eventhandler.projections
        (projection_id, projection_type, aggregate_id, state, last_event_id, last_event_timestamp)
     SELECT gen_random_uuid(), 'sensor_state', r.device_id,
            jsonb_build_object('value', r.last_value, 'unit', 'celsius', 'event_time', to_jsonb(r.last_time),
                'values', jsonb_build_object('value', jsonb_build_object('value', r.last_value,
                    'unit', 'celsius', 'event_time', to_jsonb(r.last_time), 'event_id', r.last_event_id))),
            r.last_event_id, r.last_time
     FROM (SELECT DISTINCT ON (device_id) device_id, last_value, last_time, last_event_id
             FROM tsdb.sensor_rollups_1m WHERE starts_with(device_id, $1)
            ORDER BY device_id, bucket DESC) AS r",
];

async fn remove(ctx: &Ctx, prefix: &str) -> anyhow::Result<()> {
    let db = ctx.db()?;
    for (table, column) in [
        ("eventhandler.projections", "aggregate_id"),
        ("tsdb.sensor_readings", "device_id"),
        ("tsdb.sensor_rollups_1m", "device_id"),
        ("tsdb.sensor_rollups_1h", "device_id"),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE starts_with({column}, $1)"
        ))
        .bind(prefix)
        .execute(db)
        .await?;
    }
    Ok(())
}

/// `n` sequential GETs of each path in turn (after a few unmeasured ones); each answer must be
/// a 200 holding `want`.
async fn measure(
    ctx: &Ctx,
    paths: &[String],
    want: &str,
    n: usize,
) -> anyhow::Result<Histogram<u64>> {
    let (addr, host) = &ctx.console;
    let mut h = Histogram::<u64>::new(3)?;
    for i in 0..n + 3 {
        let path = &paths[i % paths.len()];
        let t = Instant::now();
        let (status, body) = http::get_once(*addr, host, path).await?;
        let us = t.elapsed().as_micros() as u64;
        if status != 200 || !String::from_utf8_lossy(&body).contains(want) {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        if i >= 3 {
            h.record(us.max(1))?;
        }
    }
    Ok(h)
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let prefix = format!("con-{}-", ctx.run);
    let t = Instant::now();
    for sql in GENERATE {
        sqlx::query(sql)
            .bind(&prefix)
            .bind(DEVICES)
            .bind(READINGS)
            .execute(ctx.db()?)
            .await?;
    }
    sqlx::query(
        "ANALYZE eventhandler.projections, tsdb.sensor_readings, tsdb.sensor_rollups_1m, tsdb.sensor_rollups_1h",
    )
    .execute(ctx.db()?)
    .await?;
    log(format!(
        "console: {DEVICES} devices, {} readings generated in {:.1}s",
        DEVICES * READINGS,
        t.elapsed().as_secs_f64()
    ));
    let result = async {
        // The first page, a search, a page deep into the list (keyset: as fast as the first).
        let list = measure(
            ctx,
            &[
                "/console/devices".to_string(),
                format!("/console/devices?q={prefix}0999"),
                format!("/console/devices?q={prefix}&after={prefix}07000"),
            ],
            "class=\"device\"",
            300,
        )
        .await?;
        let ids: Vec<String> = [17, 5000, 9999]
            .iter()
            .map(|i| format!("{prefix}{i:05}"))
            .collect();
        let detail = measure(
            ctx,
            &ids.iter()
                .map(|id| format!("/console/devices/{id}"))
                .collect::<Vec<_>>(),
            "id=\"chart\"",
            300,
        )
        .await?;
        // The chart's own request, a day in 5-minute buckets.
        let series = measure(
            ctx,
            &ids.iter()
                .map(|id| format!("/console/devices/{id}/series?key=value&window=24h&bucket=5m"))
                .collect::<Vec<_>>(),
            "\"times\"",
            300,
        )
        .await?;
        anyhow::Ok((list, detail, series))
    }
    .await;
    remove(ctx, &prefix).await?;
    let (list, detail, series) = result?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut r = Row::new("console");
    r.latency(&list);
    r.result = format!(
        "devices page p99 {:.1} ms; device page p99 {:.1} ms (its chart's series p99 {:.1} ms)",
        ms(&list, 0.99),
        ms(&detail, 0.99),
        ms(&series, 0.99)
    );
    r.goal = "both pages p99 ≤ 100 ms".into();
    r.goal_met =
        Some(list.value_at_quantile(0.99) <= 100_000 && detail.value_at_quantile(0.99) <= 100_000);
    r.config = format!(
        "{DEVICES} devices with {} readings (100 a device, one a minute, with 1-minute and 1-hour rollups and a projection each; generated in the database); 300 sequential GETs each of the devices page (first page, a search, a page 7,000 devices in: 50 rows with a server-drawn sparkline each), the device page and its chart's series (24 h in 5-min buckets); p50 {:.1} / {:.1} / {:.1} ms; idle pipeline; client, platform and PostgreSQL share the 2 cores",
        DEVICES * READINGS,
        ms(&list, 0.5),
        ms(&detail, 0.5),
        ms(&series, 0.5)
    );
    r.details = json!({
        "devices_p50_us": list.value_at_quantile(0.5),
        "devices_p99_us": list.value_at_quantile(0.99),
        "device_p50_us": detail.value_at_quantile(0.5),
        "device_p99_us": detail.value_at_quantile(0.99),
        "series_p50_us": series.value_at_quantile(0.5),
        "series_p99_us": series.value_at_quantile(0.99),
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
