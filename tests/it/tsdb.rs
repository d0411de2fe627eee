//! The tsdb-writer and the time-series query (SPEC §9, §8) against real PostgreSQL and the
//! real broker: readings become typed rows once, poison goes to `tsdb.dlq`, and bucketed
//! aggregates match values computed by hand.

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

const SERVICES: &[Service] = &[Service::Ingestion, Service::Tsdb, Service::Query];

fn reading_at(device: &str, value: f64, t: &str) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": value, "unit": "celsius"}, "event_time": t})
}

async fn wait_rows(app: &TestApp, n: i64) {
    let pool = app.pool().await;
    eventually(Duration::from_secs(40), || async {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM tsdb.sensor_readings")
            .fetch_one(&pool)
            .await
            .ok()?;
        if c < n {
            let dlq: Vec<String> = sqlx::query_scalar("SELECT error_message FROM tsdb.dlq")
                .fetch_all(&pool)
                .await
                .ok()?;
            assert!(dlq.is_empty(), "dead-lettered: {dlq:?}");
        }
        (c >= n).then_some(())
    })
    .await;
}

async fn series(app: &TestApp, query: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(
            Service::Query,
            &format!("/api/v1/query/timeseries/ts-1?{query}"),
        ))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// (bucket start, value, count) of an answer.
fn points(v: &Value) -> Vec<(String, f64, i64)> {
    v["points"]
        .as_array()
        .unwrap_or_else(|| panic!("points in {v}"))
        .iter()
        .map(|p| {
            (
                p["time"].as_str().unwrap()[11..19].to_string(),
                p["value"].as_f64().unwrap(),
                p["count"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// (bucket start, value, count) as written in a test case.
type Point<'a> = (&'a str, f64, i64);

fn pts(list: &[Point]) -> Vec<(String, f64, i64)> {
    list.iter()
        .map(|(t, v, n)| (t.to_string(), *v, *n))
        .collect()
}

#[tokio::test]
async fn readings_become_rows_once_and_poison_goes_to_the_dlq() {
    let app = TestApp::spawn(SERVICES).await;
    app.wait_ready().await;
    let events: Vec<Value> = (0..20)
        .map(|i| reading_at(&format!("d{}", i % 4), i as f64, "2026-01-01T00:00:00Z"))
        .chain([json!({"event_type": "user.login", "aggregate_id": "u",
                       "payload": {"user_id": "u", "ip": "10.0.0.1"}})])
        .collect();
    app.ingest_batch(events).await;
    wait_rows(&app, 20).await;

    // Redeliver one reading as it was on the bus, and send one the writer cannot type.
    let topic = app.topic("sensor-events");
    let bus = read_topics(std::slice::from_ref(&topic), 20, Duration::from_secs(30)).await;
    let again = serde_json::to_vec(&bus[0].payload).unwrap();
    produce_raw(&topic, "d0", &again).await;
    let mut bad = bus[1].payload.clone();
    bad["event_id"] = json!(uuid::Uuid::now_v7());
    bad["payload"]["value"] = json!("hot");
    produce_raw(&topic, "d1", &serde_json::to_vec(&bad).unwrap()).await;

    let pool = app.pool().await;
    eventually(Duration::from_secs(40), || async {
        (count_rows(&pool, "tsdb.dlq").await == 1).then_some(())
    })
    .await;
    assert_eq!(count_rows(&pool, "tsdb.sensor_readings").await, 20);
    let (device, value, unit): (String, f64, String) = sqlx::query_as(
        "SELECT device_id, value, unit FROM tsdb.sensor_readings WHERE event_id = $1",
    )
    .bind(uuid::Uuid::parse_str(bus[0].payload["event_id"].as_str().unwrap()).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(device, bus[0].payload["aggregate_id"].as_str().unwrap());
    assert_eq!(value, bus[0].payload["payload"]["value"].as_f64().unwrap());
    assert_eq!(unit, "celsius");
    let err: String = sqlx::query_scalar("SELECT error_message FROM tsdb.dlq")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(err.contains("payload.value"), "{err}");
    // The query service lists it with every consumer's dead letters.
    let v: Value = app
        .http
        .get(app.url(Service::Query, "/api/v1/query/dlq"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 1, "{v}");
}

#[tokio::test]
async fn aggregates_match_hand_computed_values() {
    let app = TestApp::spawn(SERVICES).await;
    app.wait_ready().await;
    let data = [
        ("00:00:00", 10.0),
        ("00:00:30", 20.0),
        ("00:00:59.999", 30.0),
        ("00:01:00", 40.0), // on a boundary: the 00:01 bucket
        ("00:01:45", 50.0),
        ("00:02:10", 60.0),
        ("00:04:59", 70.0),
        ("00:05:00", 80.0), // `to` is exclusive
    ];
    let mut events: Vec<Value> = data
        .iter()
        .map(|(t, v)| reading_at("ts-1", *v, &format!("2026-01-01T{t}Z")))
        .collect();
    events.push(reading_at("ts-2", 999.0, "2026-01-01T00:00:10Z"));
    app.ingest_batch(events).await;
    wait_rows(&app, 9).await;

    let range = "from=2026-01-01T00:00:00Z&to=2026-01-01T00:05:00Z";
    let cases: &[(&str, &str, &[Point])] = &[
        (
            "1m",
            "avg",
            &[
                ("00:00:00", 20.0, 3),
                ("00:01:00", 45.0, 2),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "1m",
            "min",
            &[
                ("00:00:00", 10.0, 3),
                ("00:01:00", 40.0, 2),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "1m",
            "max",
            &[
                ("00:00:00", 30.0, 3),
                ("00:01:00", 50.0, 2),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "1m",
            "count",
            &[
                ("00:00:00", 3.0, 3),
                ("00:01:00", 2.0, 2),
                ("00:02:00", 1.0, 1),
                ("00:04:00", 1.0, 1),
            ],
        ),
        (
            "1m",
            "last",
            &[
                ("00:00:00", 30.0, 3),
                ("00:01:00", 50.0, 2),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "2m",
            "avg",
            &[
                ("00:00:00", 30.0, 5),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "2m",
            "min",
            &[
                ("00:00:00", 10.0, 5),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "2m",
            "max",
            &[
                ("00:00:00", 50.0, 5),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
        (
            "2m",
            "count",
            &[
                ("00:00:00", 5.0, 5),
                ("00:02:00", 1.0, 1),
                ("00:04:00", 1.0, 1),
            ],
        ),
        (
            "2m",
            "last",
            &[
                ("00:00:00", 50.0, 5),
                ("00:02:00", 60.0, 1),
                ("00:04:00", 70.0, 1),
            ],
        ),
    ];
    for (bucket, agg, want) in cases {
        let (status, v) = series(&app, &format!("{range}&bucket={bucket}&agg={agg}")).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(points(&v), pts(want), "bucket={bucket} agg={agg}: {v}");
        assert_eq!(v["agg"], *agg);
    }
    // `from` is inclusive: starting at 00:00:30 keeps 20 and 30 of the first minute.
    let (_, v) = series(
        &app,
        "from=2026-01-01T00:00:30Z&to=2026-01-01T00:01:00Z&bucket=1m&agg=avg",
    )
    .await;
    assert_eq!(points(&v), pts(&[("00:00:00", 25.0, 2)]));
    // Including 00:05:00 in the range brings the excluded reading in.
    let (_, v) = series(
        &app,
        "from=2026-01-01T00:04:00Z&to=2026-01-01T00:05:00.001Z&bucket=1m&agg=max",
    )
    .await;
    assert_eq!(
        points(&v),
        pts(&[("00:04:00", 70.0, 1), ("00:05:00", 80.0, 1)])
    );
    assert_eq!(v["bucket_seconds"], 60);
}

#[tokio::test]
async fn nonsense_parameters_are_refused() {
    let app = TestApp::spawn(&[Service::Query]).await;
    for q in [
        "bucket=0s",
        "bucket=2d",
        "bucket=1500ms",
        "bucket=soon",
        "agg=median",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&bucket=1s",
        "from=yesterday",
        "colour=red",
    ] {
        let (status, v) = series(&app, q).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    for q in ["limit=0", "since=never", "include_normal=maybe", "x=1"] {
        let r = app
            .http
            .get(app.url(Service::Query, &format!("/api/v1/query/anomalies?{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
}

#[tokio::test]
async fn the_writer_reports_on_the_event_handlers_port_when_both_run_in_one_process() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    let port = free_port();
    env.insert("CJ_EVENTHANDLER_HEALTH_PORT".into(), port.to_string());
    let app = TestApp::start(db, prefix, env, &[Service::Eventhandler, Service::Tsdb]).await;
    assert!(
        !app.addrs.contains_key(&Service::Tsdb),
        "one listener for both"
    );
    let url = format!("http://127.0.0.1:{port}/health");
    let v: Value = eventually(Duration::from_secs(30), || async {
        let v: Value = app.http.get(&url).send().await.ok()?.json().await.ok()?;
        (v["checks"]["tsdb"]["consumer"]["assigned_partitions"].as_u64() > Some(0)
            && v["checks"]["consumer"]["assigned_partitions"].as_u64() > Some(0))
        .then_some(v)
    })
    .await;
    assert!(v["checks"]["consumer"].is_object(), "{v}");
    assert_eq!(v["checks"]["tsdb"]["database"]["status"], "healthy", "{v}");
    // The port's DLQ API answers for both consumers.
    for consumer in ["eventhandler", "tsdb"] {
        let url = format!("http://127.0.0.1:{port}/api/v1/dlq/{consumer}");
        let v: Value = app
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["consumer"], consumer, "{v}");
        assert!(v["entries"].is_array(), "{v}");
    }
}
