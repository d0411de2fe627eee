//! [Telemetry] against real PostgreSQL and the real broker: readings of several quantities
//! become a row per key, a state with every key's latest value and a series per key; the
//! rollups answer every bucket exactly as raw rows do, and a redelivered reading changes
//! neither; tsdb's V2 migration keeps every existing row.

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

const SERVICES: &[Service] = &[
    Service::Ingestion,
    Service::Eventhandler,
    Service::Tsdb,
    Service::Query,
];

async fn wait_rows(pool: &sqlx::PgPool, n: i64) {
    eventually(Duration::from_secs(60), || async {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM tsdb.sensor_readings")
            .fetch_one(pool)
            .await
            .ok()?;
        let dlq: Vec<String> = sqlx::query_scalar("SELECT error_message FROM tsdb.dlq")
            .fetch_all(pool)
            .await
            .ok()?;
        assert!(dlq.is_empty(), "dead-lettered: {dlq:?}");
        assert!(c <= n, "{c} rows, more than the {n} written");
        (c == n).then_some(())
    })
    .await;
}

async fn get(app: &TestApp, svc: Service, path: &str) -> (u16, Value) {
    let r = app.http.get(app.url(svc, path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn several_quantities_become_rows_a_state_and_a_series_each() {
    let app = TestApp::spawn(SERVICES).await;
    app.wait_ready().await;
    let dev = "multi-1";
    let at = |s: &str| format!("2026-03-01T00:00:{s}Z");
    app.ingest_batch(vec![
        json!({"event_type": "sensor.reading", "aggregate_id": dev, "event_time": at("00"),
                   "payload": {"values": {"temperature": 20.0, "humidity": 40.0},
                               "units": {"temperature": "celsius", "humidity": "percent"}}}),
        json!({"event_type": "sensor.reading", "aggregate_id": dev, "event_time": at("10"),
                   "payload": {"values": {"humidity": 41.0}}}),
        json!({"event_type": "sensor.reading", "aggregate_id": dev, "event_time": at("20"),
                   "payload": {"value": 1013.0, "unit": "hPa", "metric": "pressure"}}),
        // Older than the rest: it neither overwrites humidity nor is lost for co2.
        json!({"event_type": "sensor.reading", "aggregate_id": dev, "event_time": at("05"),
                   "payload": {"values": {"humidity": 1.0, "co2": 400.0}}}),
    ])
    .await;
    let pool = app.pool().await;
    wait_rows(&pool, 6).await;
    let rows: Vec<(String, f64, Option<String>)> = sqlx::query_as(
        "SELECT key, value, unit FROM tsdb.sensor_readings WHERE device_id = $1 ORDER BY time, key",
    )
    .bind(dev)
    .fetch_all(&pool)
    .await
    .unwrap();
    let want: Vec<(String, f64, Option<String>)> = vec![
        ("humidity".into(), 40.0, Some("percent".into())),
        ("temperature".into(), 20.0, Some("celsius".into())),
        ("co2".into(), 400.0, None),
        ("humidity".into(), 1.0, None),
        ("humidity".into(), 41.0, None),
        ("pressure".into(), 1013.0, Some("hPa".into())),
    ];
    assert_eq!(rows, want);

    // The state: every key's latest value; the newest reading's time and single value on top.
    let path = format!("/api/v1/query/projections/sensor_state/{dev}");
    let state = eventually(Duration::from_secs(30), || async {
        let (status, v) = get(&app, Service::Query, &path).await;
        let s = v.get("state")?.clone();
        (status == 200 && s["values"].as_object()?.len() == 4).then_some(s)
    })
    .await;
    let latest = |k: &str| state["values"][k]["value"].as_f64();
    assert_eq!(latest("temperature"), Some(20.0), "{state}");
    assert_eq!(latest("humidity"), Some(41.0), "{state}");
    assert_eq!(latest("co2"), Some(400.0), "{state}");
    assert_eq!(latest("pressure"), Some(1013.0), "{state}");
    assert_eq!(state["values"]["temperature"]["unit"], "celsius");
    assert_eq!(state["value"], 1013.0, "{state}");
    assert_eq!(state["event_time"], "2026-03-01T00:00:20.000000Z");

    // A series per key asked for, in that order; every key of the device without `key`.
    let range = "from=2026-03-01T00:00:00Z&to=2026-03-01T00:01:00Z&bucket=1m&agg=last";
    let (status, v) = get(
        &app,
        Service::Query,
        &format!("/api/v1/query/timeseries/{dev}?{range}&key=humidity,temperature"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let keys: Vec<&str> = v["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["humidity", "temperature"]);
    assert_eq!(v["series"][0]["points"][0]["value"], 41.0, "{v}");
    assert_eq!(v["series"][0]["points"][0]["count"], 3, "{v}");
    assert!(v.get("points").is_none(), "several series have no `points`");
    let (_, v) = get(
        &app,
        Service::Query,
        &format!("/api/v1/query/timeseries/{dev}?{range}"),
    )
    .await;
    assert_eq!(v["series"].as_array().unwrap().len(), 4, "{v}");
    let (_, v) = get(
        &app,
        Service::Query,
        &format!("/api/v1/query/timeseries/{dev}?{range}&key=pressure"),
    )
    .await;
    assert_eq!(
        v["points"][0]["value"], 1013.0,
        "one key answers as points too: {v}"
    );
    for bad in ["key=a,,b", "key=x%20y", "source=fast"] {
        let (status, v) = get(
            &app,
            Service::Query,
            &format!("/api/v1/query/timeseries/{dev}?{bad}"),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            matches!(
                v["code"].as_str(),
                Some("bad_request" | "validation_failed")
            ),
            "{bad}: {v}"
        );
    }
}

#[tokio::test]
async fn wrong_quantities_are_refused_field_by_field_and_nothing_is_stored() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!(i))).collect();
    let cases = [
        (
            json!({"value": 1, "unit": "c", "values": {"a": 1}}),
            vec!["payload.value"],
        ),
        (
            json!({"values": {"ok": 1, "9lives": 2, "nan": "NaN", "flag": true}}),
            vec![
                "payload.values.9lives",
                "payload.values.flag",
                "payload.values.nan",
            ],
        ),
        (
            json!({"values": {"a": 1}, "units": {"b": "c"}}),
            vec!["payload.units.b"],
        ),
        (json!({"values": {}}), vec!["payload.values"]),
        (json!({ "values": many }), vec!["payload.values"]),
        (
            json!({"value": 1, "unit": "c", "metric": "a b"}),
            vec!["payload.metric"],
        ),
        (
            json!({"values": {"a\u{1}b": 1}}),
            vec!["payload.values.a?b"],
        ),
    ];
    for (payload, fields) in cases {
        let (status, body) = app
            .ingest(
                json!({"event_type": "sensor.reading", "aggregate_id": "d", "payload": payload}),
            )
            .await;
        assert_eq!(status, 400, "{payload}: {body}");
        let mut got: Vec<&str> = body["details"]
            .as_array()
            .unwrap_or_else(|| panic!("details in {body}"))
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, fields, "{payload}: {body}");
    }
    let pool = app.pool().await;
    assert_eq!(count_rows(&pool, "ingestion.outbox").await, 0);
}

/// Readings spread over five hours at random times, some of them delivered twice on the bus:
/// every bucket width and aggregate gives the same answer from the rollups as from raw rows,
/// and the rollups count each reading once.
#[tokio::test]
async fn rollups_answer_every_bucket_as_raw_rows_do_and_count_a_redelivery_once() {
    let app = TestApp::spawn(SERVICES).await;
    app.wait_ready().await;
    let dev = "roll-1";
    let start = chrono::DateTime::parse_from_rfc3339("2026-02-01T09:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    // A fixed-seed LCG: the same "random" readings each run, so a failure reproduces.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        x >> 33
    };
    let mut events = Vec::new();
    for _ in 0..1200 {
        let ms = (next() % (5 * 3600 * 1000)) as i64;
        let t = start + chrono::Duration::milliseconds(ms);
        let a = (next() % 10_000) as f64 / 100.0;
        let b = (next() % 500) as f64 - 250.0;
        events.push(json!({"event_type": "sensor.reading", "aggregate_id": dev,
            "event_time": cornjacket::envelope::format_time(&t),
            "payload": {"values": {"a": a, "b": b}}}));
    }
    app.ingest_batch(events).await;
    let pool = app.pool().await;
    wait_rows(&pool, 2400).await;

    // Redeliver 50 of the readings as the processor published them.
    let envelopes: Vec<Value> = sqlx::query_scalar(
        "SELECT ingestion.envelope_json(e) FROM ingestion.event_store e ORDER BY random() LIMIT 50",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let topic = app.topic("sensor-events");
    for e in &envelopes {
        produce_raw(&topic, dev, e.to_string().as_bytes()).await;
    }
    // Then one reading more, so that once it is written the redeliveries were consumed.
    app.ingest_batch(vec![
        json!({"event_type": "sensor.reading", "aggregate_id": dev,
            "event_time": "2026-02-01T13:59:59Z", "payload": {"values": {"a": 1.0}}}),
    ])
    .await;
    wait_rows(&pool, 2401).await;
    let group = app.config.tsdb.consumer_group.clone();
    eventually(Duration::from_secs(30), || async {
        let applied = metric(
            &scrape(&app, Service::Tsdb).await,
            "cj_consumer_applied_total",
            &[("consumer", &group)],
        );
        (applied >= 1251.0).then_some(())
    })
    .await;
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(count) FROM tsdb.sensor_rollups_1m)::bigint,
                (SELECT sum(count) FROM tsdb.sensor_rollups_1h)::bigint",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        counted,
        (2401, 2401),
        "each reading counted once per rollup"
    );

    let ranges = [
        ("2026-02-01T09:00:00Z", "2026-02-01T14:00:00Z"),
        ("2026-02-01T09:17:23Z", "2026-02-01T13:42:05.5Z"),
        ("2026-02-01T08:00:00Z", "2026-02-01T11:30:00Z"),
    ];
    for (from, to) in ranges {
        for bucket in ["1h", "2h", "1m", "5m", "90s", "7s"] {
            if bucket == "7s" && from.ends_with("00:00Z") {
                continue; // 2,500+ buckets of raw rows: nothing the other cases don't cover
            }
            for agg in ["avg", "min", "max", "count", "last"] {
                let q = format!(
                    "/api/v1/query/timeseries/{dev}?from={from}&to={to}&bucket={bucket}&agg={agg}&key=a,b"
                );
                let (s1, auto) = get(&app, Service::Query, &q).await;
                let (s2, raw) = get(&app, Service::Query, &format!("{q}&source=raw")).await;
                assert_eq!((s1, s2), (200, 200), "{auto} {raw}");
                assert_eq!(raw["sources"], json!(["raw"]));
                if bucket == "1h" || bucket == "2h" {
                    assert!(
                        auto["sources"]
                            .as_array()
                            .unwrap()
                            .contains(&json!("rollup_1h")),
                        "{q}: {}",
                        auto["sources"]
                    );
                }
                assert_same_series(&auto, &raw, &q);
            }
        }
    }
}

fn assert_same_series(a: &Value, b: &Value, q: &str) {
    let (sa, sb) = (
        a["series"].as_array().unwrap(),
        b["series"].as_array().unwrap(),
    );
    assert_eq!(sa.len(), sb.len(), "{q}");
    for (x, y) in sa.iter().zip(sb) {
        let (px, py) = (
            x["points"].as_array().unwrap(),
            y["points"].as_array().unwrap(),
        );
        assert!(!py.is_empty(), "{q}: no points");
        assert_eq!(px.len(), py.len(), "{q}: {x} vs {y}");
        for (p, r) in px.iter().zip(py) {
            assert_eq!(p["time"], r["time"], "{q}");
            assert_eq!(p["count"], r["count"], "{q}: {p} vs {r}");
            let (u, v) = (p["value"].as_f64().unwrap(), r["value"].as_f64().unwrap());
            // Sums added in another order differ in the last bits, nothing more.
            assert!((u - v).abs() <= 1e-9 * v.abs().max(1.0), "{q}: {p} vs {r}");
        }
    }
}

/// tsdb's V2 on a database that V1 left with readings: every row stays (under the key
/// `value`) and the rollups start out holding them.
#[tokio::test]
async fn the_migration_keeps_every_reading_and_rolls_them_up() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let sql = |v: &str| {
        std::fs::read_to_string(format!(
            "{}/migrations/tsdb/{v}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA tsdb; {}",
        sql("V1__sensor_readings.sql")
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tsdb.sensor_readings (time, device_id, value, unit, event_id, ingested_at)
         SELECT TIMESTAMPTZ '2026-01-01 00:00:00+00' + i * interval '17 seconds',
                'd' || (i % 3), i, 'c', gen_random_uuid(), now()
         FROM generate_series(1, 1000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(&sql("V2__quantities_and_rollups.sql"))
        .execute(&pool)
        .await
        .unwrap();
    let (n, keys, sum): (i64, Vec<String>, f64) = sqlx::query_as(
        "SELECT count(*), array_agg(DISTINCT key), sum(value) FROM tsdb.sensor_readings",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((n, keys, sum), (1000, vec!["value".to_string()], 500_500.0));
    for table in ["tsdb.sensor_rollups_1m", "tsdb.sensor_rollups_1h"] {
        let (count, sum, max): (i64, f64, f64) = sqlx::query_as(&format!(
            "SELECT sum(count)::bigint, sum(sum), max(max) FROM {table}"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((count, sum, max), (1000, 500_500.0, 1000.0), "{table}");
    }
    let last: f64 = sqlx::query_scalar(
        "SELECT last_value FROM tsdb.sensor_rollups_1h WHERE device_id = 'd1' ORDER BY bucket DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(last, 1000.0);
}
