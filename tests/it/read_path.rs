//! Read path (SPEC §7, §8) against real PostgreSQL and the real broker.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};
use uuid::Uuid;

const ALL: &[Service] = &[Service::Ingestion, Service::Eventhandler, Service::Query];

fn reading_at(device: &str, value: f64, t: &str) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": value, "unit": "celsius"}, "event_time": t})
}

async fn get(app: &TestApp, path: &str) -> (u16, Value, Vec<u8>) {
    let r = app
        .http
        .get(app.url(Service::Query, path))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let bytes = r.bytes().await.unwrap().to_vec();
    (
        s,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        bytes,
    )
}

async fn projection(app: &TestApp, ptype: &str, agg: &str) -> Option<Value> {
    let (s, v, _) = get(app, &format!("/api/v1/query/projections/{ptype}/{agg}")).await;
    (s == 200).then_some(v)
}

async fn wait_value(app: &TestApp, agg: &str, want: f64) -> Value {
    eventually(Duration::from_secs(45), || async {
        projection(app, "sensor_state", agg)
            .await
            .filter(|p| p["state"]["value"].as_f64() == Some(want))
    })
    .await
}

fn fast_retries(e: &mut std::collections::HashMap<String, String>) {
    e.insert(
        "CJ_EVENTHANDLER_RETRY_DELAYS".into(),
        "0s,100ms,200ms".into(),
    );
}

#[tokio::test]
async fn ingested_reading_is_readable_through_both_query_paths() {
    let app = TestApp::spawn(ALL).await;
    app.wait_ready().await;
    let (s, v) = app
        .ingest(reading_at("dev-1", 21.5, "2026-01-01T00:00:00Z"))
        .await;
    assert_eq!(s, 202);
    let p = wait_value(&app, "dev-1", 21.5).await;
    assert_eq!(p["projection_type"], "sensor_state");
    assert_eq!(p["aggregate_id"], "dev-1");
    assert_eq!(p["state"]["unit"], "celsius");
    assert_eq!(p["last_event_id"], v["event_id"]);
    assert_eq!(p["last_event_timestamp"], "2026-01-01T00:00:00.000000Z");
    let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "aggregate_id",
            "last_event_id",
            "last_event_timestamp",
            "projection_id",
            "projection_type",
            "state",
            "updated_at"
        ]
    );
    let (_, _, a) = get(&app, "/api/v1/query/projections/sensor_state/dev-1").await;
    let (s, _, b) = get(&app, "/api/v1/projections/sensor_state/dev-1").await;
    assert_eq!(s, 200);
    assert_eq!(a, b, "alias body is byte-identical");
    let (_, _, a) = get(&app, "/api/v1/query/projections/sensor_state?limit=5").await;
    let (_, _, b) = get(&app, "/api/v1/projections/sensor_state?limit=5").await;
    assert_eq!(a, b, "list alias body is byte-identical");

    // user.login → user_session
    let (s, _) = app
        .ingest(
            json!({"event_type": "user.login", "aggregate_id": "user-123",
                        "payload": {"user_id": "user-123", "ip": "192.168.1.1"}}),
        )
        .await;
    assert_eq!(s, 202);
    let u = eventually(Duration::from_secs(45), || {
        projection(&app, "user_session", "user-123")
    })
    .await;
    assert_eq!(u["state"]["ip"], "192.168.1.1");
    assert_eq!(u["state"]["user_id"], "user-123");

    // The event log shows both.
    let (s, v, _) = get(&app, "/api/v1/query/events?aggregate_id=dev-1").await;
    assert_eq!(s, 200);
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["payload"]["value"], 21.5);
}

#[tokio::test]
async fn reordering_and_duplicates_never_regress_a_projection() {
    let app = TestApp::spawn(ALL).await;
    app.wait_ready().await;
    let (s, newer) = app
        .ingest(reading_at("r1", 2.0, "2026-01-01T00:00:02Z"))
        .await;
    assert_eq!(s, 202);
    wait_value(&app, "r1", 2.0).await;
    // An older reading arriving later does not win.
    assert_eq!(
        app.ingest(reading_at("r1", 1.0, "2026-01-01T00:00:01Z"))
            .await
            .0,
        202
    );
    // A duplicate delivery of the newer event (straight onto the bus) changes nothing either.
    let pool = app.pool().await;
    let env: Value = sqlx::query_scalar(
        "SELECT ingestion.envelope_json(s) FROM ingestion.event_store s WHERE event_id = $1",
    )
    .bind(Uuid::parse_str(newer["event_id"].as_str().unwrap()).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    produce_raw(
        &app.topic("sensor-events"),
        "r1",
        env.to_string().as_bytes(),
    )
    .await;
    // Sentinel: a newer event after both; once it shows, the older ones were processed.
    assert_eq!(
        app.ingest(reading_at("r1", 3.0, "2026-01-01T00:00:03Z"))
            .await
            .0,
        202
    );
    assert_eq!(
        app.ingest(reading_at("r1", 0.5, "2026-01-01T00:00:00Z"))
            .await
            .0,
        202
    );
    let p = wait_value(&app, "r1", 3.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = projection(&app, "sensor_state", "r1").await.unwrap();
    assert_eq!(again["state"]["value"], 3.0);
    assert_eq!(again["last_event_id"], p["last_event_id"]);
}

#[tokio::test]
async fn unknown_event_types_are_skipped_sentinel() {
    let app = TestApp::spawn(ALL).await;
    app.wait_ready().await;
    assert_eq!(
        app.ingest(
            json!({"event_type": "sensor.calibrated", "aggregate_id": "s1", "payload": {"by": "x"}})
        )
        .await
        .0,
        202
    );
    assert_eq!(
        app.ingest(reading_at("s1", 7.0, "2026-01-01T00:00:00Z"))
            .await
            .0,
        202
    );
    wait_value(&app, "s1", 7.0).await;
    // The unknown type made no projection, no dead letter, and did not block the partition.
    let pool = app.pool().await;
    let n: i64 = count_rows(&pool, "eventhandler.projections").await;
    assert_eq!(n, 1);
    let d: i64 = count_rows(&pool, "eventhandler.dlq").await;
    assert_eq!(d, 0);
}

#[tokio::test]
async fn poison_goes_to_the_dlq_after_retries_and_replay_applies_it_once_fixed() {
    let app = TestApp::spawn_with(ALL, fast_retries).await;
    app.wait_ready().await;
    let topic = app.topic("sensor-events");
    // Undecodable bytes, and a decodable envelope whose payload the handler refuses.
    produce_raw(&topic, "p1", b"\x00not json at all").await;
    let bad = json!({"event_id": Uuid::now_v7(), "event_type": "sensor.reading", "aggregate_id": "p1",
        "event_time": "2026-01-01T00:00:00Z", "ingested_at": "2026-01-01T00:00:00Z",
        "payload": {"value": "hot", "unit": "c"}, "metadata": {"source": "http", "schema_version": 1}});
    produce_raw(&topic, "p1", bad.to_string().as_bytes()).await;
    // The consumer goes on with the next message on the same key.
    assert_eq!(
        app.ingest(reading_at("p2", 1.0, "2026-01-01T00:00:00Z"))
            .await
            .0,
        202
    );
    wait_value(&app, "p2", 1.0).await;
    let entries = eventually(Duration::from_secs(45), || async {
        let (_, v, _) = get(&app, "/api/v1/query/dlq?status=pending").await;
        let e = v["entries"].as_array()?.clone();
        (e.len() == 2).then_some(e)
    })
    .await;
    for e in &entries {
        assert_eq!(e["consumer"], app.config.eventhandler.consumer_group);
        assert_eq!(e["status"], "pending");
    }
    let handler_err = entries
        .iter()
        .find(|e| e["event_payload"].is_object())
        .unwrap();
    // The handler's refusal is retried on the schedule; bytes that are no envelope are not.
    assert_eq!(handler_err["retry_count"], 3);
    assert!(
        handler_err["error_message"]
            .as_str()
            .unwrap()
            .contains("value")
    );
    let raw = entries
        .iter()
        .find(|e| e["event_payload"].is_null())
        .unwrap();
    assert!(raw["raw_payload"].as_str().unwrap().contains("not json"));
    assert_eq!(raw["retry_count"], 0);
    assert!(projection(&app, "sensor_state", "p1").await.is_none());

    // Replay before the fix: still pending, error recorded.
    let id = handler_err["dlq_id"].as_str().unwrap();
    let run = |args: &[&str]| {
        cornjacket()
            .args(args)
            .env("CJ_DATABASE_URL", &app.db.url)
            .env("CJ_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let out = run(&["dlq", "replay", id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("still failing"));
    // An operator corrects the dead letter, then replays it.
    let pool = app.pool().await;
    sqlx::query("UPDATE eventhandler.dlq SET event_payload = jsonb_set(event_payload, '{payload,value}', '19.5') WHERE dlq_id = $1")
        .bind(Uuid::parse_str(id).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let out = run(&["dlq", "replay", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let p = projection(&app, "sensor_state", "p1")
        .await
        .expect("replay produced the projection");
    assert_eq!(p["state"]["value"], 19.5);
    // Discard the undecodable one; list shows the final states.
    let out = run(&["dlq", "discard", raw["dlq_id"].as_str().unwrap()]);
    assert!(out.status.success());
    let out = run(&["dlq", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("\"replayed\"") && listed.contains("\"discarded\""),
        "{listed}"
    );
    let (_, v, _) = get(&app, "/api/v1/query/dlq?status=pending").await;
    assert_eq!(v["total"], 0);
}

#[tokio::test]
async fn a_database_outage_blocks_without_dead_letters_then_catches_up() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert(
        "CJ_EVENTHANDLER_DATABASE_URL".into(),
        with_host(&db.url, &proxy.addr.to_string()),
    );
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    fast_retries(&mut env);
    let app = TestApp::start(db, prefix, env, ALL).await;
    app.wait_ready().await;
    assert_eq!(
        app.ingest(reading_at("o1", 1.0, "2026-01-01T00:00:00Z"))
            .await
            .0,
        202
    );
    wait_value(&app, "o1", 1.0).await;
    let health_url = app.url(Service::Eventhandler, "/health");

    proxy.cut();
    for i in 0..10 {
        let t = format!("2026-01-01T00:01:{i:02}Z");
        assert_eq!(
            app.ingest(reading_at(&format!("o{}", i % 3), 10.0 + i as f64, &t))
                .await
                .0,
            202
        );
    }
    let (s, h) = eventually(Duration::from_secs(30), || async {
        let r = app.http.get(&health_url).send().await.ok()?;
        let s = r.status().as_u16();
        let v: Value = r.json().await.ok()?;
        (s == 503).then_some((s, v))
    })
    .await;
    assert_eq!(s, 503);
    assert_eq!(h["status"], "unhealthy", "{h}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.restore();
    // Last writes per device: o0 ← 19 (i=9), o1 ← 17, o2 ← 18.
    wait_value(&app, "o0", 19.0).await;
    wait_value(&app, "o1", 17.0).await;
    wait_value(&app, "o2", 18.0).await;
    let pool = app.pool().await;
    let d: i64 = count_rows(&pool, "eventhandler.dlq").await;
    assert_eq!(d, 0, "an outage never fills the DLQ");
    eventually(Duration::from_secs(20), || async {
        let r = app.http.get(&health_url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn restarting_the_handler_mid_stream_loses_nothing() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let env = test_env(&db.url, &prefix);
    let same_db = || TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let front = TestApp::start(
        same_db(),
        prefix.clone(),
        env.clone(),
        &[Service::Ingestion, Service::Query],
    )
    .await;
    front.wait_ready().await;
    let mut handler = TestApp::start(
        same_db(),
        prefix.clone(),
        env.clone(),
        &[Service::Eventhandler],
    )
    .await;
    let send = |from: usize, to: usize| {
        let front = &front;
        async move {
            for i in from..to {
                let t = format!("2026-01-01T00:{:02}:{:02}Z", i / 60, i % 60);
                let (s, _) = front
                    .ingest(reading_at(&format!("m{}", i % 10), i as f64, &t))
                    .await;
                assert_eq!(s, 202);
            }
        }
    };
    send(0, 100).await;
    wait_value(&front, "m9", 99.0).await;
    send(100, 150).await;
    assert!(handler.stop().await, "handler stopped cleanly");
    send(150, 200).await;
    let _handler2 = TestApp::start(same_db(), prefix.clone(), env, &[Service::Eventhandler]).await;
    for d in 0..10 {
        wait_value(&front, &format!("m{d}"), (190 + d) as f64).await;
    }
    let pool = front.pool().await;
    let d: i64 = count_rows(&pool, "eventhandler.dlq").await;
    assert_eq!(d, 0);
}

#[tokio::test]
async fn pagination_walks_250_projections_exactly_once() {
    let app = TestApp::spawn(ALL).await;
    app.wait_ready().await;
    let events: Vec<Value> = (0..250)
        .map(|i| reading_at(&format!("pg-{i:03}"), i as f64, "2026-01-01T00:00:00Z"))
        .collect();
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(45), || async {
        let (_, v, _) = get(&app, "/api/v1/query/projections/sensor_state?limit=1").await;
        (v["total"] == 250).then_some(())
    })
    .await;
    // limit/offset
    let mut seen = Vec::new();
    for offset in (0..300).step_by(100) {
        let (s, v, _) = get(
            &app,
            &format!("/api/v1/query/projections/sensor_state?limit=100&offset={offset}"),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["limit"], 100);
        assert_eq!(v["offset"], offset);
        for p in v["projections"].as_array().unwrap() {
            seen.push(p["aggregate_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250);
    // cursor
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/api/v1/projections/sensor_state?limit=100&after={a}"),
            None => "/api/v1/projections/sensor_state?limit=100".to_string(),
        };
        let (_, v, _) = get(&app, &q).await;
        for p in v["projections"].as_array().unwrap() {
            seen.push(p["aggregate_id"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => after = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250);
}

#[tokio::test]
async fn query_errors_are_clear() {
    let app = TestApp::spawn(&[Service::Eventhandler, Service::Query]).await;
    let cases = [
        (
            "/api/v1/query/projections/nope/x",
            404,
            "unknown projection type",
        ),
        ("/api/v1/projections/nope", 404, "unknown projection type"),
        (
            "/api/v1/query/projections/sensor_state?limit=0",
            400,
            "limit",
        ),
        (
            "/api/v1/query/projections/sensor_state?limit=101",
            400,
            "limit",
        ),
        (
            "/api/v1/query/projections/sensor_state?offset=-1",
            400,
            "offset",
        ),
        (
            "/api/v1/query/projections/sensor_state?offset=5&after=x",
            400,
            "not both",
        ),
        (
            "/api/v1/query/projections/sensor_state?colour=red",
            400,
            "unknown query parameter",
        ),
        ("/api/v1/query/events?from=yesterday", 400, "RFC 3339"),
        (
            "/api/v1/query/events?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            400,
            "from",
        ),
        ("/api/v1/query/dlq?status=lost", 400, "status"),
    ];
    for (path, status, msg) in cases {
        let (s, v) = eventually(Duration::from_secs(30), || async {
            let (s, v, _) = get(&app, path).await;
            (s != 503).then_some((s, v))
        })
        .await;
        assert_eq!(s, status, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains(msg), "{path}: {v}");
    }
    let (s, v) = eventually(Duration::from_secs(30), || async {
        let (s, v, _) = get(&app, "/api/v1/query/projections/sensor_state/absent").await;
        (s != 503).then_some((s, v))
    })
    .await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("absent"));
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_health_stays_open() {
    let app = TestApp::spawn_with(&[Service::Query, Service::Actions], |e| {
        e.insert("CJ_API_RATE_LIMIT".into(), "1".into());
        e.insert("CJ_API_RATE_BURST".into(), "2".into());
    })
    .await;
    // Until the schemas it reads exist the query API answers 503 (outside the limit); wait on
    // /health, which is never limited, so the three requests below meet a ready service.
    let health = app.url(Service::Query, "/health");
    eventually(Duration::from_secs(30), || async {
        let r = app.http.get(&health).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    for (svc, path) in [
        (Service::Query, "/api/v1/query/events"),
        (Service::Actions, "/api/v1/actions/endpoints"),
    ] {
        let url = app.url(svc, path);
        // The burst passes; then, at 1/s, a 429 comes within a few more requests however slowly
        // a loaded machine answers them (three requests over more than a second would get a
        // refilled token).
        let mut statuses = Vec::new();
        let mut limited = None;
        for _ in 0..10 {
            let r = app.http.get(&url).send().await.unwrap();
            statuses.push(r.status().as_u16());
            if r.status() == 429 {
                limited = Some(r);
                break;
            }
        }
        assert!(
            statuses[..2].iter().all(|s| *s != 429),
            "{path}: {statuses:?}"
        );
        let r = limited.unwrap_or_else(|| panic!("{path}: never limited: {statuses:?}"));
        assert_eq!(r.status(), 429, "{path}: {statuses:?}");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("rate limit"),
            "{body}"
        );
    }
    for _ in 0..5 {
        let r = app
            .http
            .get(app.url(Service::Query, "/health"))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 429, "/health is not limited");
    }
}
