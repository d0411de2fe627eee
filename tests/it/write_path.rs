//! Write path (SPEC §5, §6) against real PostgreSQL and the real broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};
use uuid::Uuid;

fn reading(device: &str, value: f64) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": value, "unit": "celsius"}})
}

async fn store_count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ingestion.event_store")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn outbox_count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ingestion.outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn accepted_event_reaches_event_store_and_topic_with_key_and_headers() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest"))
        .header("traceparent", tp)
        .json(&reading("device-001", 72.5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "accepted");
    let id: Uuid = body["event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 7);

    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 1 && outbox_count(&pool).await == 0).then_some(())
    })
    .await;
    let (etype, agg, payload, meta): (String, String, Value, Value) = sqlx::query_as(
        "SELECT event_type, aggregate_id, payload, metadata FROM ingestion.event_store WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (etype.as_str(), agg.as_str()),
        ("sensor.reading", "device-001")
    );
    assert_eq!(payload, json!({"value": 72.5, "unit": "celsius"}));
    assert_eq!(meta["source"], "http");
    assert_eq!(meta["traceparent"], tp);

    let recs = read_topics(&[app.topic("sensor-events")], 1, Duration::from_secs(20)).await;
    assert_eq!(recs.len(), 1, "one record on sensor-events");
    let rec = &recs[0];
    assert_eq!(rec.key.as_deref(), Some("device-001"));
    assert_eq!(rec.headers["event_type"], "sensor.reading");
    assert_eq!(rec.headers["event_id"], id.to_string());
    assert_eq!(rec.headers["traceparent"], tp);
    assert_eq!(rec.payload["event_id"], id.to_string());
    assert_eq!(rec.payload["payload"]["value"], 72.5);
}

#[tokio::test]
async fn routing_sends_each_prefix_to_its_topic() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let user = json!({"event_type": "user.login", "aggregate_id": "u1",
                      "payload": {"user_id": "u1", "ip": "10.0.0.1"}});
    let alert = json!({"event_type": "system.alert", "aggregate_id": "c1",
                       "payload": {"level": "warn", "message": "hot"}});
    let other = json!({"event_type": "billing.invoice", "aggregate_id": "i1", "payload": {}});
    for b in [user, alert, other] {
        assert_eq!(app.ingest(b).await.0, 202);
    }
    let users = read_topics(&[app.topic("user-actions")], 1, Duration::from_secs(20)).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].headers["event_type"], "user.login");
    let system = read_topics(&[app.topic("system-events")], 2, Duration::from_secs(20)).await;
    let types: HashSet<_> = system
        .iter()
        .map(|r| r.headers["event_type"].clone())
        .collect();
    assert_eq!(
        types,
        HashSet::from(["system.alert".to_string(), "billing.invoice".to_string()])
    );
}

#[tokio::test]
async fn every_error_status_has_its_json_body() {
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_INGESTION_MAX_BODY_BYTES".into(), "1024".into());
    })
    .await;
    app.wait_ready().await;
    let url = app.url(Service::Ingestion, "/api/v1/ingest");
    let send = |body: String, ctype: Option<&'static str>| {
        let mut r = app.http.post(&url).body(body);
        if let Some(c) = ctype {
            r = r.header("content-type", c);
        }
        r.send()
    };
    let cases: Vec<(String, Option<&str>, u16, &str)> = vec![
        (
            "{not json".into(),
            Some("application/json"),
            400,
            "invalid JSON",
        ),
        (
            json!({"event_type": "x"}).to_string(),
            Some("application/json"),
            400,
            "validation failed",
        ),
        (
            json!([1]).to_string(),
            Some("application/json"),
            400,
            "validation failed",
        ),
        (
            reading("d", 1.0).to_string(),
            Some("text/plain"),
            415,
            "unsupported media type",
        ),
        (
            reading("d", 1.0).to_string(),
            None,
            415,
            "unsupported media type",
        ),
        (
            json!({"event_type": "a.b", "aggregate_id": "a", "payload": {"x": "y".repeat(2000)}})
                .to_string(),
            Some("application/json"),
            413,
            "too large",
        ),
    ];
    for (body, ctype, status, msg) in cases {
        let r = send(body.clone(), ctype).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body:.80}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains(msg), "{v}");
        assert!(v["details"].is_array(), "{v}");
    }
    // Validation details name each bad field.
    let (s, v) = app
        .ingest(json!({"event_type": "BAD", "aggregate_id": "", "payload": {}}))
        .await;
    assert_eq!(s, 400);
    let fields: HashSet<&str> = v["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, HashSet::from(["event_type", "aggregate_id"]));
    // Unknown routes answer JSON 404.
    let r = app
        .http
        .get(app.url(Service::Ingestion, "/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Nothing reached the outbox.
    assert_eq!(outbox_count(&app.pool().await).await, 0);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_INGESTION_RATE_LIMIT".into(), "1".into());
        e.insert("CJ_INGESTION_RATE_BURST".into(), "2".into());
    })
    .await;
    app.wait_ready().await;
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = app
            .http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .json(&reading("d", i as f64))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].as_str().unwrap().contains("rate limit"));
        }
    }
    assert_eq!(&statuses[..2], &[202, 202]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

/// Behind a trusted proxy (Traefik in the deployments) each client has its own bucket, keyed
/// on the address the proxy appended to `X-Forwarded-For`; a client talking to the port directly
/// cannot pick its bucket with the header.
#[tokio::test]
async fn behind_a_trusted_proxy_the_limit_keys_on_the_forwarded_client() {
    let spawn = |trusted: Option<&'static str>| {
        TestApp::spawn_with(&[Service::Ingestion], move |e| {
            e.insert("CJ_INGESTION_RATE_LIMIT".into(), "1".into());
            e.insert("CJ_INGESTION_RATE_BURST".into(), "1".into());
            if let Some(t) = trusted {
                e.insert("CJ_TRUSTED_PROXIES".into(), t.into());
            }
        })
    };
    let send = |app: &TestApp, xff: &str| {
        app.http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .header("x-forwarded-for", xff)
            .json(&reading("xff", 1.0))
            .send()
    };
    // The test's requests come from 127.0.0.1: the proxy here.
    let app = spawn(Some("127.0.0.1")).await;
    app.wait_ready().await;
    for client in ["203.0.113.1", "203.0.113.2", "6.6.6.6, 203.0.113.3"] {
        assert_eq!(send(&app, client).await.unwrap().status(), 202, "{client}");
    }
    // The same client again is over its one-request burst; a forged left part changes nothing.
    assert_eq!(send(&app, "203.0.113.1").await.unwrap().status(), 429);
    assert_eq!(
        send(&app, "1.2.3.4, 203.0.113.2").await.unwrap().status(),
        429
    );

    // Not trusted: the header is ignored, every request is 127.0.0.1's.
    let app = spawn(None).await;
    app.wait_ready().await;
    assert_eq!(send(&app, "203.0.113.1").await.unwrap().status(), 202);
    assert_eq!(send(&app, "203.0.113.2").await.unwrap().status(), 429);
}

#[tokio::test]
async fn the_events_alias_behaves_like_ingest() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/events"))
        .json(&reading("alias-dev", 1.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let bad = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/events"))
        .json(&json!({"event_type": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn batch_accepts_valid_items_and_reports_each() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let url = app.url(Service::Ingestion, "/api/v1/ingest/batch");
    let body = json!({"events": [reading("b1", 1.0), {"event_type": "x"}, reading("b2", 2.0)]});
    let r = app.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["rejected"], 1);
    assert_eq!(v["results"][0]["status"], "accepted");
    assert_eq!(v["results"][1]["status"], "rejected");
    assert!(v["results"][1]["details"].is_array());
    assert_eq!(v["results"][2]["status"], "accepted");
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 2).then_some(())
    })
    .await;

    let all_bad = app
        .http
        .post(&url)
        .json(&json!({"events": [{"x": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(all_bad.status(), 400);
    let too_many: Vec<Value> = (0..1001).map(|i| reading("m", i as f64)).collect();
    let r = app
        .http
        .post(&url)
        .json(&json!({"events": too_many}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = app
        .http
        .post(&url)
        .json(&json!({"nope": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn the_same_event_id_posted_100_times_concurrently_is_one_event() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let id = Uuid::now_v7();
    let mut body = reading("idem", 5.0);
    body["event_id"] = json!(id);
    let futs = (0..100).map(|_| app.ingest(body.clone()));
    let answers = futures::future::join_all(futs).await;
    for (s, v) in &answers {
        assert_eq!(*s, 202);
        assert_eq!(v["event_id"], id.to_string());
    }
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 1 && outbox_count(&pool).await == 0).then_some(())
    })
    .await;
    // A repeat after the event left the outbox is still a no-op.
    assert_eq!(app.ingest(body.clone()).await.0, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(outbox_count(&pool).await, 0);
    assert_eq!(store_count(&pool).await, 1);
    let recs = read_topics(&[app.topic("sensor-events")], 2, Duration::from_secs(5)).await;
    assert_eq!(recs.len(), 1, "published once");
}

#[tokio::test]
async fn idempotency_key_header_returns_the_first_event_id() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let post = |key: &'static str, v: f64| {
        app.http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .header("idempotency-key", key)
            .json(&reading("ik", v))
            .send()
    };
    // Twenty concurrent retries of one request: one event, one answer.
    let answers = futures::future::join_all((0..20).map(|_| post("key-1", 1.0))).await;
    let mut ids = HashSet::new();
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        ids.insert(v["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "every repeat answers the first event_id");
    // The same key for something else is refused, never silently answered with the old event.
    let reused = post("key-1", 2.0).await.unwrap();
    assert_eq!(reused.status(), 409);
    let v: Value = reused.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{v}"
    );
    let other: Value = post("key-2", 1.0).await.unwrap().json().await.unwrap();
    assert!(!ids.contains(other["event_id"].as_str().unwrap()));
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn notify_wakes_another_processes_processor_long_before_the_watchdog() {
    // The writer wakes its own process's processor directly; a processor in another process can
    // only hear of new rows through NOTIFY. So: write through an instance without a processor,
    // publish from another one, both with a 60 s watchdog.
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert("CJ_OUTBOX_POLL_INTERVAL".into(), "60s".into());
    let mut writer_env = env.clone();
    writer_env.insert("CJ_OUTBOX_ENABLED".into(), "false".into());
    let same_db = || TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let writer = TestApp::start(same_db(), prefix.clone(), writer_env, &[Service::Ingestion]).await;
    let processor = TestApp::start(same_db(), prefix.clone(), env, &[Service::Ingestion]).await;
    writer.wait_ready().await;
    processor.wait_ready().await;
    // Let the processor's workers reach their idle wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pool = writer.pool().await;
    assert_eq!(writer.ingest(reading("n1", 1.0)).await.0, 202);
    eventually(Duration::from_secs(5), || async {
        (store_count(&pool).await == 1).then_some(())
    })
    .await;

    // Kill the LISTEN connection: the processor reconnects and keeps being woken.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed >= 1, "a LISTEN connection existed");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // NOTIFYs are paced (one per 5 ms at most); a later write still wakes the processor.
    assert_eq!(writer.ingest(reading("n2", 2.0)).await.0, 202);
    eventually(Duration::from_secs(8), || async {
        (store_count(&pool).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn database_outage_answers_503_then_recovers_without_restart() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    env.insert("CJ_INGESTION_REQUEST_TIMEOUT".into(), "3s".into());
    let app = TestApp::start(db, prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    // Before the cut it works; the short acquire timeout can refuse the very first connection on
    // a loaded machine, so allow a few tries.
    eventually(Duration::from_secs(20), || async {
        (app.ingest(reading("o1", 1.0)).await.0 == 202).then_some(())
    })
    .await;

    proxy.cut();
    let started = std::time::Instant::now();
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest"))
        .json(&reading("o2", 2.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(10), "no hang");
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("unavailable"));
    let h = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 503);

    proxy.restore();
    let (s, _) = eventually(Duration::from_secs(20), || async {
        let (s, v) = app.ingest(reading("o3", 3.0)).await;
        (s == 202).then_some((s, v))
    })
    .await;
    assert_eq!(s, 202);
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn broker_outage_keeps_accepting_and_publishes_everything_after_recovery() {
    let mut broker = OwnBroker::start();
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_KAFKA_BROKERS".into(), broker.brokers());
        e.insert("CJ_KAFKA_MESSAGE_TIMEOUT".into(), "2s".into());
        e.insert("CJ_OUTBOX_MAX_RETRIES".into(), "1".into());
        e.insert("CJ_LOG_LEVEL".into(), "info,librdkafka=warn".into());
    })
    .await;
    app.wait_ready().await;
    let pool = app.pool().await;
    assert_eq!(app.ingest(reading("b0", 0.0)).await.0, 202);
    eventually(Duration::from_secs(20), || async {
        (store_count(&pool).await == 1).then_some(())
    })
    .await;

    broker.stop();
    let mut ids = Vec::new();
    for i in 1..=20 {
        let (s, v) = app.ingest(reading(&format!("b{}", i % 4), i as f64)).await;
        assert_eq!(s, 202, "ingestion keeps answering 202 with the broker down");
        ids.push(v["event_id"].as_str().unwrap().to_string());
    }
    eventually(Duration::from_secs(30), || async {
        let max: Option<i32> = sqlx::query_scalar("SELECT max(retry_count) FROM ingestion.outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        (max.unwrap_or(0) >= 2).then_some(())
    })
    .await;
    assert_eq!(outbox_count(&pool).await, 20);
    let h: Value = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "degraded", "{h}");

    broker.restart(); // in-memory: empty, topics gone; the processor recreates them
    eventually(Duration::from_secs(60), || async {
        (outbox_count(&pool).await == 0).then_some(())
    })
    .await;
    assert_eq!(store_count(&pool).await, 21);
    // b0 went down with the broker before any consumer read it, so the bus recovery republishes
    // it first, then the 20 that waited in the outbox.
    let recs = read_topics_from(
        &broker.brokers(),
        &[app.topic("sensor-events")],
        21,
        Duration::from_secs(20),
    )
    .await;
    let got: Vec<String> = recs.iter().map(|r| r.headers["event_id"].clone()).collect();
    let unique_ids: HashSet<&String> = got.iter().collect();
    assert_eq!(unique_ids.len(), 21, "b0 and all 20 published");
    for id in &ids {
        assert!(got.contains(id), "{id} published");
    }
    assert_eq!(got.len(), 21, "each exactly once");
    let republished = recs
        .iter()
        .filter(|r| r.headers.contains_key("cj-redelivery"))
        .count();
    assert_eq!(republished, 1, "only b0 is a redelivery");
}

#[tokio::test]
async fn two_processors_on_one_database_publish_each_event_once_in_aggregate_order() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let env = test_env(&db.url, &prefix);
    let db2 = TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let a = TestApp::start(db, prefix.clone(), env.clone(), &[Service::Ingestion]).await;
    let b = TestApp::start(db2, prefix.clone(), env, &[Service::Ingestion]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    // 8 aggregates × 50 events, sent in sequence per aggregate, alternating instances.
    let devices: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
    let tasks = devices.iter().map(|d| {
        let (a, b) = (&a, &b);
        async move {
            for i in 0..50 {
                let app = if i % 2 == 0 { a } else { b };
                let (s, _) = app.ingest(reading(d, i as f64)).await;
                assert_eq!(s, 202);
            }
        }
    });
    futures::future::join_all(tasks).await;
    let pool = a.pool().await;
    eventually(Duration::from_secs(60), || async {
        (store_count(&pool).await == 400 && outbox_count(&pool).await == 0).then_some(())
    })
    .await;
    let recs = read_topics(&[a.topic("sensor-events")], 400, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), 400, "every event published exactly once");
    let mut by_partition: HashMap<(String, i32), Vec<&BusRecord>> = HashMap::new();
    for r in &recs {
        by_partition
            .entry((r.topic.clone(), r.partition))
            .or_default()
            .push(r);
    }
    let mut seen: HashMap<String, Vec<f64>> = HashMap::new();
    for (_, mut rs) in by_partition {
        rs.sort_by_key(|r| r.offset);
        for r in rs {
            let agg = r.key.clone().unwrap();
            seen.entry(agg)
                .or_default()
                .push(r.payload["payload"]["value"].as_f64().unwrap());
        }
    }
    for d in &devices {
        let want: Vec<f64> = (0..50).map(|i| i as f64).collect();
        assert_eq!(seen[d], want, "{d} in order on its partition");
    }
}
