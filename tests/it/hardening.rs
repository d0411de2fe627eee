//! [Hardening] of the write path against what clients send (SPEC §5, §6): event times the store
//! cannot hold, rows that can never move (the quarantine), per-aggregate order under concurrency,
//! idempotency that refuses a changed body, and a bounded batch parser. Real PostgreSQL, broker
//! and Mosquitto throughout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use cornjacket::config::Config;
use cornjacket::services::Service;
use cornjacket::services::ingestion::writer::shard_of;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

fn reading(agg: &str, v: f64) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": agg,
           "payload": {"value": v, "unit": "c"}})
}

async fn stored(pool: &PgPool) -> i64 {
    count_rows(pool, "ingestion.event_store").await
}

/// Aggregate ids that share one outbox shard (so one bad row could block them all).
fn same_shard(n: usize) -> Vec<String> {
    let want = shard_of("agg-0");
    (0..)
        .map(|i| format!("agg-{i}"))
        .filter(|a| shard_of(a) == want)
        .take(n)
        .collect()
}

/// An envelope as the writer stores it, to plant rows that bypassed validation (written by an
/// older version, or by hand).
fn envelope(agg: &str, v: f64) -> Value {
    let now = cornjacket::envelope::format_time(&wall_clock());
    json!({"event_id": Uuid::now_v7(), "event_type": "sensor.reading", "aggregate_id": agg,
           "event_time": now, "ingested_at": now, "payload": {"value": v, "unit": "c"},
           "metadata": {"source": "http", "schema_version": 1}})
}

#[tokio::test]
async fn event_times_the_store_cannot_hold_are_refused_naming_the_range() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    for t in [
        "0000-06-01T00:00:00Z",
        // A valid-looking year 1 that its offset pushes into year 0 in UTC.
        "0001-01-01T00:30:00+01:00",
    ] {
        let mut body = reading("old", 1.0);
        body["event_time"] = json!(t);
        let (status, v) = app.ingest(body).await;
        assert_eq!(status, 400, "{t}: {v}");
        let d = &v["details"][0];
        assert_eq!(d["field"], "event_time", "{t}: {v}");
        assert!(
            d["message"]
                .as_str()
                .unwrap()
                .contains("0001-01-01T00:00:00Z"),
            "{t}: the message names the accepted range: {v}"
        );
    }
    // The edge itself is accepted and moves.
    let mut body = reading("old", 2.0);
    body["event_time"] = json!("0001-01-01T00:00:00Z");
    let (status, v) = app.ingest(body).await;
    assert_eq!(status, 202, "{v}");
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (stored(&pool).await == 1).then_some(())
    })
    .await;
    let t: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT event_time FROM ingestion.event_store")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(t.to_rfc3339(), "0001-01-01T00:00:00+00:00");
    assert_eq!(count_rows(&pool, "ingestion.outbox").await, 0);
}

#[tokio::test]
async fn a_row_that_can_never_move_is_quarantined_alone_and_its_shard_goes_on() {
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        // Small enough that a planted row is too big for the bus (the door refuses such bodies).
        e.insert("CJ_KAFKA_MESSAGE_MAX_BYTES".into(), "20000".into());
        e.insert("CJ_INGESTION_MAX_BODY_BYTES".into(), "8192".into());
        e.insert("CJ_OUTBOX_BATCH_SIZE".into(), "50".into());
    })
    .await;
    app.wait_ready().await;
    let pool = app.pool().await;
    let aggs = same_shard(2);
    let (a, b) = (&aggs[0], &aggs[1]);

    // One transaction, so the processor sees the shard as it will be: good rows around three
    // that can never move, each for another reason.
    let good = [
        envelope(a, 1.0),
        envelope(a, 2.0),
        envelope(b, 3.0),
        envelope(b, 4.0),
    ];
    let mut bad_time = envelope(a, 9.0);
    bad_time["event_time"] = json!("0000-12-31T23:00:00.000000Z");
    let mut bad_id = envelope(b, 9.0);
    bad_id["event_id"] = json!("not-a-uuid");
    let mut too_big = envelope(a, 9.0);
    too_big["payload"]["blob"] = json!("x".repeat(30_000));
    let planted = [
        good[0].clone(),
        bad_time.clone(),
        good[1].clone(),
        bad_id.clone(),
        good[2].clone(),
        too_big.clone(),
        good[3].clone(),
    ];
    let mut tx = pool.begin().await.unwrap();
    for p in &planted {
        sqlx::query(
            "INSERT INTO ingestion.outbox (shard, event_id, event_payload) VALUES ($1, $2, $3)",
        )
        .bind(shard_of(a))
        .bind(
            p["event_id"]
                .as_str()
                .and_then(|s| s.parse::<Uuid>().ok())
                .unwrap_or_else(Uuid::now_v7),
        )
        .bind(p)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    // Later events of the same aggregates, through the door.
    for (agg, v) in [(a, 5.0), (b, 6.0)] {
        let (status, body) = app.ingest(reading(agg, v)).await;
        assert_eq!(status, 202, "{body}");
    }

    eventually(Duration::from_secs(30), || async {
        (stored(&pool).await == 6).then_some(())
    })
    .await;
    assert_eq!(count_rows(&pool, "ingestion.outbox").await, 0);
    let q: Vec<(String, i32)> =
        sqlx::query_as("SELECT error, retry_count FROM ingestion.outbox_quarantine ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(q.len(), 3, "{q:?}");
    assert!(q[0].0.contains("event_time"), "{q:?}");
    assert!(q[1].0.contains("uuid"), "the database's refusal: {q:?}");
    assert!(
        q[1].1 >= 2,
        "the failed batch counted as an attempt too: {q:?}"
    );
    assert!(q[2].0.to_lowercase().contains("too large"), "{q:?}");

    // Each aggregate's events reached its partition in order, around the quarantined rows.
    let topic = app.topic("sensor-events");
    let (ka, kb) = (a.clone(), b.clone());
    let recs = read_topics_until(
        &brokers(),
        std::slice::from_ref(&topic),
        Duration::from_secs(20),
        move |r| {
            let last = |k: &str, v: f64| {
                r.iter().any(|x| {
                    x.key.as_deref() == Some(k) && x.payload["payload"]["value"] == json!(v)
                })
            };
            last(&ka, 5.0) && last(&kb, 6.0)
        },
    )
    .await;
    for (agg, want) in [(a, vec![1.0, 2.0, 5.0]), (b, vec![3.0, 4.0, 6.0])] {
        let mut values: Vec<(i64, f64)> = recs
            .iter()
            .filter(|r| r.key.as_deref() == Some(agg.as_str()))
            .map(|r| (r.offset, r.payload["payload"]["value"].as_f64().unwrap()))
            .collect();
        values.sort_by_key(|(o, _)| *o);
        values.dedup_by_key(|(_, v)| *v);
        assert_eq!(values.iter().map(|(_, v)| *v).collect::<Vec<_>>(), want);
    }

    // Visible to operators: health, metrics, CLI, API.
    let health: Value = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["checks"]["outbox"]["status"], "degraded", "{health}");
    assert_eq!(health["checks"]["outbox"]["quarantined"], 3, "{health}");
    let m = scrape(&app, Service::Ingestion).await;
    assert_eq!(metric(&m, "cj_outbox_quarantined", &[]), 3.0);
    let listed = cli_ok(&app, &["outbox", "quarantine", "list"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    let api: Value = app
        .http
        .get(app.url(Service::Ingestion, "/api/v1/outbox/quarantine"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = api["quarantined"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{api}");
    let seq_of = |i: usize| rows[i]["seq"].as_i64().unwrap();
    assert_eq!(rows[1]["aggregate_id"], json!(b));

    // An operator repairs the row with the bad id and re-queues it: it moves, after the rest.
    sqlx::query(
        "UPDATE ingestion.outbox_quarantine
         SET event_payload = jsonb_set(event_payload, '{event_id}', to_jsonb($2::text))
         WHERE seq = $1",
    )
    .bind(seq_of(1))
    .bind(Uuid::now_v7().to_string())
    .execute(&pool)
    .await
    .unwrap();
    let r = app
        .http
        .post(app.url(
            Service::Ingestion,
            &format!("/api/v1/outbox/quarantine/{}/requeue", seq_of(1)),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(20), || async {
        (stored(&pool).await == 7).then_some(())
    })
    .await;
    // The other two are discarded, one through the CLI, one through the API.
    cli_ok(
        &app,
        &["outbox", "quarantine", "discard", &seq_of(0).to_string()],
    );
    let url = app.url(
        Service::Ingestion,
        &format!("/api/v1/outbox/quarantine/{}", seq_of(2)),
    );
    assert_eq!(app.http.delete(&url).send().await.unwrap().status(), 200);
    let again = app.http.delete(&url).send().await.unwrap();
    assert_eq!(again.status(), 404);
    assert!(again.json::<Value>().await.unwrap()["error"].is_string());
    let bad = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/outbox/quarantine/x%00/requeue"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(quarantined(&pool).await, 0);
    let health: Value = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["checks"]["outbox"]["status"], "healthy", "{health}");
}

async fn quarantined(pool: &PgPool) -> i64 {
    count_rows(pool, "ingestion.outbox_quarantine").await
}

#[tokio::test]
async fn the_processor_never_passes_an_uncommitted_lower_row_of_a_shard() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let pool = app.pool().await;
    // Event 1 of an aggregate is being written by a transaction that has not committed yet
    // (another ingestion replica, slow to commit), through the writer's own statement.
    let mut slow = PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    let first = envelope("ordered", 1.0);
    sqlx::query("SELECT ingestion.append(ARRAY[$1]::int2[], ARRAY[$2]::uuid[], ARRAY[$3], ARRAY[$4]::bytea[], false)")
        .bind(shard_of("ordered"))
        .bind(first["event_id"].as_str().unwrap().parse::<Uuid>().unwrap())
        .bind(first.to_string())
        .bind(vec![0u8; 32])
        .execute(&mut slow)
        .await
        .unwrap();
    // Event 2 arrives through this replica meanwhile.
    let second = {
        let (http, url) = (
            app.http.clone(),
            app.url(Service::Ingestion, "/api/v1/ingest"),
        );
        tokio::spawn(async move {
            http.post(url)
                .json(&reading("ordered", 2.0))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Event 2 cannot overtake: it is not even committed while event 1 is open.
    assert!(
        !second.is_finished(),
        "event 2 was answered before event 1 committed"
    );
    assert_eq!(stored(&pool).await, 0);
    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    assert_eq!(second.await.unwrap(), 202);
    let topic = app.topic("sensor-events");
    let recs = read_topics(std::slice::from_ref(&topic), 2, Duration::from_secs(20)).await;
    let mut by_offset: Vec<(i64, f64)> = recs
        .iter()
        .map(|r| (r.offset, r.payload["payload"]["value"].as_f64().unwrap()))
        .collect();
    by_offset.sort_by_key(|(o, _)| *o);
    assert_eq!(
        by_offset.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        vec![1.0, 2.0]
    );
}

#[tokio::test]
async fn a_device_pipelining_thousands_of_publishes_keeps_their_order_on_the_partition() {
    pipelined_publishes_stay_in_order(3000, false).await;
}

/// Commits fail while the device keeps publishing (the database connection is cut and comes
/// back): the failed messages are retried, and nothing the device sent later may overtake them.
#[tokio::test]
async fn a_device_pipelining_through_a_database_outage_keeps_their_order() {
    pipelined_publishes_stay_in_order(1500, true).await;
}

async fn pipelined_publishes_stay_in_order(n: usize, outage: bool) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let port = mqtt_port();
    let root = unique("ord");
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    env.insert("CJ_MQTT_URL".into(), format!("mqtt://127.0.0.1:{port}"));
    env.insert(
        "CJ_MQTT_TOPIC".into(),
        format!("$share/{root}g/{root}/devices/+/events"),
    );
    env.insert("CJ_MQTT_CLIENT_ID".into(), unique("platform-"));
    env.insert("CJ_MQTT_USERNAME".into(), "cornjacket".into());
    env.insert("CJ_MQTT_PASSWORD".into(), "cornjacket".into());
    env.insert("CJ_DB_ACQUIRE_TIMEOUT".into(), "1s".into());
    let app = TestApp::start(db, prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    eventually(Duration::from_secs(20), || async {
        let v: Value = app
            .http
            .get(app.url(Service::Ingestion, "/health"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["checks"]["mqtt"]["status"] == "healthy").then_some(())
    })
    .await;

    let mut o = MqttOptions::new(unique("dev-"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_credentials("cornjacket", "cornjacket");
    o.set_inflight(200);
    let (client, mut ev) = AsyncClient::new(o, 10_000);
    let topic = format!("{root}/devices/pipelined/events");
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let body = json!({"event_type": "sensor.reading",
                              "payload": {"value": i as f64, "unit": "c"}});
            client
                .publish(&topic, QoS::AtLeastOnce, false, body.to_string())
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let mut cut_at: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < n {
        assert!(Instant::now() < deadline, "only {acked} of {n} PUBACKs");
        if outage && cut_at.is_none() && acked >= n / 5 {
            // Mid-stream: every connection to the database drops, new ones are refused.
            proxy.cut();
            cut_at = Some(Instant::now());
        }
        match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("device connection failed: {e}"),
        }
    }
    let _client = sender.await.unwrap();
    if let Some(t) = cut_at {
        // The broker acknowledged everything to the device; the platform's commits keep
        // failing for a while (the rest waits in the broker's queue for the platform).
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(t.elapsed())).await;
        proxy.restore();
    }
    assert!(
        !outage || cut_at.is_some(),
        "the outage happened mid-stream"
    );

    let topic = app.topic("sensor-events");
    let recs = read_topics_until(
        &brokers(),
        std::slice::from_ref(&topic),
        Duration::from_secs(90),
        move |r| {
            r.iter()
                .filter(|r| r.key.as_deref() == Some("pipelined"))
                .count()
                >= n
        },
    )
    .await;
    let mut by_offset: Vec<(i64, i64)> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some("pipelined"))
        .map(|r| {
            (
                r.offset,
                r.payload["payload"]["value"].as_f64().unwrap() as i64,
            )
        })
        .collect();
    by_offset.sort_by_key(|(o, _)| *o);
    let values: Vec<i64> = by_offset.iter().map(|(_, v)| *v).collect();
    // QoS 1 may redeliver (a duplicate right after its original); it may never reorder.
    let mut seen = -1;
    for (i, v) in values.iter().enumerate() {
        assert!(
            *v == seen || *v == seen + 1,
            "value {v} at position {i} after {seen}: the partition is out of order: {:?}",
            &by_offset[i.saturating_sub(5)..(i + 40).min(by_offset.len())]
        );
        seen = *v;
    }
    assert_eq!(seen, n as i64 - 1, "every publish reached the partition");
}

#[tokio::test]
async fn a_reused_event_id_with_another_body_is_a_conflict_and_a_retry_is_not() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let pool = app.pool().await;
    let id = Uuid::now_v7();
    let mut body = reading("idem", 1.0);
    body["event_id"] = json!(id);
    let (s, v) = app.ingest(body.clone()).await;
    assert_eq!((s, v["event_id"].clone()), (202, json!(id)));
    // The same event again, fields in another order: a retry.
    let reordered = json!({"payload": {"unit": "c", "value": 1.0}, "event_id": id,
                           "aggregate_id": "idem", "event_type": "sensor.reading"});
    let (s, v) = app.ingest(reordered).await;
    assert_eq!((s, v["event_id"].clone()), (202, json!(id)));
    // The same id for something else: refused, never a 202 that drops it.
    body["payload"]["value"] = json!(2.0);
    let (s, v) = app.ingest(body.clone()).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(&id.to_string()),
        "{v}"
    );
    // In a batch, each item is answered on its own.
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
        .json(&json!({"events": [body, reading("idem", 3.0)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["results"][0]["status"], "rejected", "{v}");
    assert_eq!(v["results"][1]["status"], "accepted", "{v}");
    eventually(Duration::from_secs(20), || async {
        (stored(&pool).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_event_id_the_platform_generated_is_never_stored_twice() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let pool = app.pool().await;
    let (s, v) = app.ingest(reading("gen", 1.0)).await;
    assert_eq!(s, 202);
    let id = v["event_id"].as_str().unwrap().to_string();
    // Moved out of the outbox into the event store (another ingest day would not conflict
    // there: the store's key is (event_id, ingested_at)).
    eventually(Duration::from_secs(20), || async {
        (stored(&pool).await == 1 && count_rows(&pool, "ingestion.outbox").await == 0).then_some(())
    })
    .await;
    // The client retries with the id it was given: the same event.
    let mut retry = reading("gen", 1.0);
    retry["event_id"] = json!(id);
    let (s, v) = app.ingest(retry.clone()).await;
    assert_eq!((s, v["event_id"].as_str()), (202, Some(id.as_str())));
    // ... or reuses it for something else.
    retry["payload"]["value"] = json!(7.0);
    let (s, v) = app.ingest(retry).await;
    assert_eq!(s, 409, "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored(&pool).await, 1);
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingestion.event_store WHERE event_id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn idempotency_keys_belong_to_the_authenticated_subject() {
    const SECRET: &str = "hardening-test-secret-at-least-32-bytes!";
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_AUTH_MODE".into(), "app".into());
        e.insert("CJ_JWT_SECRET".into(), SECRET.into());
    })
    .await;
    app.wait_ready().await;
    let token = |sub: &str| {
        cornjacket::infra::auth::mint(
            SECRET,
            sub,
            &["ingest:write".to_string()],
            Duration::from_secs(600),
            &app.config.auth,
        )
        .unwrap()
    };
    let post = |tok: String| {
        app.http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .bearer_auth(tok)
            .header("idempotency-key", "order-1")
            .json(&reading("tenant-dev", 1.0))
            .send()
    };
    let alice: Value = post(token("alice")).await.unwrap().json().await.unwrap();
    let bob = post(token("bob")).await.unwrap();
    assert_eq!(bob.status(), 202);
    let bob: Value = bob.json().await.unwrap();
    assert_ne!(
        alice["event_id"], bob["event_id"],
        "one tenant's key never answers for another's"
    );
    let alice_again: Value = post(token("alice")).await.unwrap().json().await.unwrap();
    assert_eq!(alice["event_id"], alice_again["event_id"]);
    let pool = app.pool().await;
    eventually(Duration::from_secs(20), || async {
        (stored(&pool).await == 2).then_some(())
    })
    .await;
}

/// Peak resident memory of this test process (each nextest test runs in its own process).
fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

#[tokio::test]
async fn a_batch_of_millions_of_tiny_items_is_refused_without_building_them() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    // Just under the 16 MiB batch body limit: ~5.6 million empty objects.
    let limit = 16 * 1024 * 1024;
    let mut body = String::with_capacity(limit);
    body.push_str("{\"events\":[{}");
    while body.len() < limit - 8 {
        body.push_str(",{}");
    }
    body.push_str("]}");
    let body = axum::body::Bytes::from(body);
    let before = peak_rss_mb();
    let sends = (0..4).map(|_| {
        app.http
            .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    });
    for r in futures::future::join_all(sends).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("1000"), "{v}");
    }
    let grew = peak_rss_mb() - before;
    // Four bodies of 16 MiB are held as bytes (64 MiB, plus the client's copies); building the
    // items would take gigabytes.
    assert!(grew < 250.0, "peak RSS grew by {grew:.0} MB");
}

#[test]
fn a_body_limit_the_bus_cannot_carry_is_a_startup_error_naming_both_settings() {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(
        "CJ_DATABASE_URL".into(),
        "postgres://u:p@127.0.0.1:5432/db".into(),
    );
    env.insert("CJ_INGESTION_MAX_BODY_BYTES".into(), "2000000".into());
    let e = Config::from_map(&env).unwrap_err().to_string();
    assert!(e.contains("CJ_INGESTION_MAX_BODY_BYTES"), "{e}");
    assert!(e.contains("CJ_KAFKA_MESSAGE_MAX_BYTES"), "{e}");
    env.insert("CJ_KAFKA_MESSAGE_MAX_BYTES".into(), "3000000".into());
    assert!(Config::from_map(&env).is_ok());
}
