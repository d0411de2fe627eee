//! One dead-letter contract for every consumer (SPEC §7, `infra::dlq`): the event handler's,
//! the tsdb-writer's and the action orchestrator's dead letters are listed, replayed and
//! discarded through the same API on each one's health port, and through the CLI, against real
//! PostgreSQL and the real broker.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};
use uuid::Uuid;

const CONSUMERS: &[Service] = &[Service::Eventhandler, Service::Tsdb, Service::Actions];

fn fast_retries(e: &mut HashMap<String, String>) {
    for k in [
        "CJ_EVENTHANDLER_RETRY_DELAYS",
        "CJ_TSDB_RETRY_DELAYS",
        "CJ_ACTIONS_CONSUMER_RETRY_DELAYS",
    ] {
        e.insert(k.into(), "0s,50ms".into());
    }
}

async fn call(app: &TestApp, method: &str, url: String) -> (u16, Value) {
    let req = match method {
        "post" => app.http.post(url),
        _ => app.http.get(url),
    };
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Each consumer's API is on its health port (the tests give each its own).
fn dlq_url(app: &TestApp, consumer: &str, rest: &str) -> String {
    let path = format!("/api/v1/dlq/{consumer}{rest}");
    match consumer {
        "actions" => app.health_url(Service::Actions, &path),
        "tsdb" => app.url(Service::Tsdb, &path),
        _ => app.url(Service::Eventhandler, &path),
    }
}

async fn entries(app: &TestApp, consumer: &str) -> Vec<Value> {
    let (status, v) = call(app, "get", dlq_url(app, consumer, "")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["consumer"], consumer);
    v["entries"].as_array().unwrap().clone()
}

fn reading(device: &str, value: Value) -> Value {
    json!({"event_id": Uuid::now_v7(), "event_type": "sensor.reading", "aggregate_id": device,
           "event_time": "2026-01-01T00:00:00Z", "ingested_at": "2026-01-01T00:00:00Z",
           "payload": {"value": value, "unit": "c"},
           "metadata": {"source": "http", "schema_version": 1}})
}

/// Until every consumer's table exists (the group reads from the earliest offset, so what is
/// produced before it subscribes still reaches it).
async fn wait_migrated(app: &TestApp, consumers: &[&str]) {
    for c in consumers {
        eventually(Duration::from_secs(30), || async {
            let r = app.http.get(dlq_url(app, c, "")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn every_consumers_dead_letters_are_listed_replayed_and_discarded_through_one_contract() {
    let app = TestApp::spawn_with(CONSUMERS, fast_retries).await;
    wait_migrated(&app, &["eventhandler", "tsdb", "actions"]).await;
    let topic = app.topic("sensor-events");
    // Bytes that are no envelope: every consumer of the topic dead-letters them. A reading
    // whose value is not a number: the event handler and the tsdb-writer refuse it.
    produce_raw(&topic, "dev-1", b"\x01 not an envelope").await;
    let hot = reading("dev-1", json!("hot"));
    produce_raw(&topic, "dev-1", hot.to_string().as_bytes()).await;

    let all = eventually(Duration::from_secs(60), || async {
        let (eh, ts, ac) = (
            entries(&app, "eventhandler").await,
            entries(&app, "tsdb").await,
            entries(&app, "actions").await,
        );
        (eh.len() == 2 && ts.len() == 2 && !ac.is_empty()).then_some((eh, ts, ac))
    })
    .await;
    let (eh, ts, ac) = all;
    for e in eh.iter().chain(&ts).chain(&ac) {
        assert_eq!(e["status"], "pending");
        assert_eq!(e["topic"], topic.as_str());
    }
    let refused = |es: &[Value]| {
        es.iter()
            .find(|e| e["event_payload"].is_object())
            .unwrap()
            .clone()
    };
    let (ts_hot, eh_hot) = (refused(&ts), refused(&eh));
    let ts_id = ts_hot["dlq_id"].as_str().unwrap().to_string();

    // Replayed before the fix: still failing, the new error recorded, still pending.
    let (status, v) = call(
        &app,
        "post",
        dlq_url(&app, "tsdb", &format!("/{ts_id}/replay")),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("still failing"),
        "{v}"
    );
    let (_, again) = call(&app, "get", dlq_url(&app, "tsdb", &format!("/{ts_id}"))).await;
    assert_eq!(again["status"], "pending");
    assert_eq!(
        again["retry_count"].as_i64(),
        Some(ts_hot["retry_count"].as_i64().unwrap() + 1)
    );

    // An operator corrects the stored event; the replay writes the reading, once.
    let pool = app.pool().await;
    for table in ["tsdb.dlq", "eventhandler.dlq"] {
        sqlx::query(&format!(
            "UPDATE {table} SET event_payload = jsonb_set(event_payload, '{{payload,value}}', '19.5')
             WHERE event_payload IS NOT NULL"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let (status, v) = call(
        &app,
        "post",
        dlq_url(&app, "tsdb", &format!("/{ts_id}/replay")),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "replayed");
    let value: f64 =
        sqlx::query_scalar("SELECT value FROM tsdb.sensor_readings WHERE event_id = $1")
            .bind(Uuid::parse_str(hot["event_id"].as_str().unwrap()).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(value, 19.5);
    let (status, _) = call(
        &app,
        "post",
        dlq_url(&app, "tsdb", &format!("/{ts_id}/replay")),
    )
    .await;
    assert_eq!(status, 409, "a replayed entry is not replayed twice");

    // The undecodable one cannot be replayed by any consumer; it is discarded, once.
    let ac_raw = ac.iter().find(|e| e["event_payload"].is_null()).unwrap();
    let ac_id = ac_raw["dlq_id"].as_str().unwrap();
    assert!(
        ac_raw["raw_payload"]
            .as_str()
            .unwrap()
            .contains("not an envelope")
    );
    let (status, v) = call(
        &app,
        "post",
        dlq_url(&app, "actions", &format!("/{ac_id}/replay")),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not JSON"), "{v}");
    let (status, v) = call(
        &app,
        "post",
        dlq_url(&app, "actions", &format!("/{ac_id}/discard")),
    )
    .await;
    assert_eq!((status, v["status"].as_str()), (200, Some("discarded")));
    let (status, _) = call(
        &app,
        "post",
        dlq_url(&app, "actions", &format!("/{ac_id}/discard")),
    )
    .await;
    assert_eq!(status, 409);
    let (status, v) = call(
        &app,
        "post",
        dlq_url(&app, "actions", &format!("/{}/discard", Uuid::now_v7())),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    // An entry of another consumer is not this one's.
    let (status, _) = call(
        &app,
        "get",
        dlq_url(&app, "eventhandler", &format!("/{ts_id}")),
    )
    .await;
    assert_eq!(status, 404);
    let (status, v) = call(
        &app,
        "get",
        app.url(Service::Eventhandler, "/api/v1/dlq/nobody"),
    )
    .await;
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("no consumer"), "{v}");
    let (status, v) = call(&app, "get", dlq_url(&app, "tsdb", "?status=lost")).await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = call(&app, "get", dlq_url(&app, "tsdb", "?colour=red")).await;
    assert_eq!(status, 400);

    // The CLI reaches every consumer's: the corrected event handler entry replays with --all,
    // and the listing shows each consumer's final states.
    let run = |args: &[&str]| {
        cornjacket()
            .args(args)
            .env("CJ_DATABASE_URL", &app.db.url)
            .env("CJ_KAFKA_TOPIC_PREFIX", &app.prefix)
            .env(
                "CJ_EVENTHANDLER_CONSUMER_GROUP",
                &app.config.eventhandler.consumer_group,
            )
            .env("CJ_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let out = run(&["dlq", "replay", eh_hot["dlq_id"].as_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let p = eventually(Duration::from_secs(10), || async {
        let v: Option<Value> = sqlx::query_scalar(
            "SELECT state FROM eventhandler.projections WHERE projection_type = 'sensor_state' AND aggregate_id = 'dev-1'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        v
    })
    .await;
    assert_eq!(p["value"], 19.5);
    let out = run(&["dlq", "list", "--consumer", "tsdb"]);
    assert!(out.status.success());
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "only the tsdb-writer's");
    assert!(
        listed
            .iter()
            .any(|e| e["status"] == "replayed" && e["dlq_id"] == ts_id.as_str())
    );
    let out = run(&["dlq", "list", "--status", "discarded"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(ac_id), "{listed}");
    let out = run(&["dlq", "list", "--status", "lost"]);
    assert!(!out.status.success());

    // The gauges count every consumer's entries, by status.
    let metrics = app
        .http
        .get(app.url(Service::Tsdb, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let tsdb_group = &app.config.tsdb.consumer_group;
    assert!(
        metrics.lines().any(|l| l.starts_with("cj_dlq_entries")
            && l.contains(&format!("consumer=\"{tsdb_group}\""))
            && l.contains("status=\"replayed\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_dlq_api_needs_the_dlq_admin_scope() {
    const SECRET: &str = "a-test-secret-that-is-at-least-32-chars";
    let app = TestApp::spawn_with(&[Service::Eventhandler], |e| {
        e.insert("CJ_AUTH_MODE".into(), "app".into());
        e.insert("CJ_JWT_SECRET".into(), SECRET.into());
    })
    .await;
    let url = app.url(Service::Eventhandler, "/api/v1/dlq/eventhandler");
    let token = |scope: &str| {
        cornjacket::infra::auth::mint(
            SECRET,
            "operator",
            &[scope.to_string()],
            Duration::from_secs(60),
            &app.config.auth,
        )
        .unwrap()
    };
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .get(&url)
        .bearer_auth(token("query:read"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // (503 until the event handler has migrated.)
    eventually(Duration::from_secs(30), || async {
        let r = app
            .http
            .get(&url)
            .bearer_auth(token("dlq:admin"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // Health and metrics on the same port stay open to orchestrators and scrapers.
    let r = app
        .http
        .get(app.url(Service::Eventhandler, "/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The sidecar's model runs only in Python: the CLI asks for the replay (`replaying`) and the
/// sidecar's replay worker performs it, through the same `dlq` commands as every other consumer.
#[tokio::test]
async fn the_sidecars_dead_letters_are_replayed_by_the_sidecar_through_the_same_commands() {
    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    let sidecar = crate::common::sidecar::Sidecar::start(&app, &brokers());
    sidecar.wait_healthy(&app.http).await;
    let bad = reading("dev-ai", json!("hot"));
    let event_id = Uuid::parse_str(bad["event_id"].as_str().unwrap()).unwrap();
    produce_raw(
        &app.topic("sensor-events"),
        "dev-ai",
        bad.to_string().as_bytes(),
    )
    .await;
    let pool = app.pool().await;
    let id: Uuid = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar("SELECT dlq_id FROM ai.dlq WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    let run = |args: &[&str]| {
        cornjacket()
            .args(args)
            .env("CJ_DATABASE_URL", &app.db.url)
            .env("CJ_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let id_text = id.to_string();
    let out = run(&["dlq", "replay", &id_text]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("still failing"), "{stdout}");
    sqlx::query(
        "UPDATE ai.dlq SET event_payload = jsonb_set(event_payload, '{payload,value}', '19.5')
         WHERE dlq_id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let out = run(&["dlq", "replay", &id_text]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("replayed (ai)"), "{stdout}");
    let out = run(&["dlq", "list", "--consumer", "ai", "--status", "replayed"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id_text));
}
