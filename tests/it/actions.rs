//! The action orchestrator (SPEC §10) against real PostgreSQL, the real broker and in-test HTTP
//! receivers: rules, signed webhooks, retries, timeouts, the rate limit, dedup, the circuit
//! breaker, and a restart with deliveries pending.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::webhook::{Receiver, Reply, verify};
use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

const SERVICES: &[Service] = &[Service::Ingestion, Service::Actions];

async fn spawn(tweak: impl FnOnce(&mut std::collections::HashMap<String, String>)) -> TestApp {
    let app = TestApp::spawn_with(SERVICES, tweak).await;
    app.wait_ready().await;
    wait_actions_ready(&app).await;
    app
}

async fn wait_actions_ready(app: &TestApp) {
    let url = app.health_url(Service::Actions, "/health");
    eventually(Duration::from_secs(30), || async {
        let v: Value = app.http.get(&url).send().await.ok()?.json().await.ok()?;
        (v["checks"]["database"]["status"] == "healthy"
            && v["checks"]["consumer"]["group"].is_string())
        .then_some(())
    })
    .await;
}

async fn create_rule(app: &TestApp, rule: Value) -> Value {
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

async fn deliveries(app: &TestApp, query: &str) -> Vec<Value> {
    let v: Value = app
        .http
        .get(app.url(
            Service::Actions,
            &format!("/api/v1/actions/deliveries?{query}"),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["deliveries"].as_array().cloned().unwrap_or_default()
}

/// Waits until the rule's deliveries are all in one of `final_states`, `n` of them.
async fn wait_deliveries(
    app: &TestApp,
    rule_id: &str,
    n: usize,
    final_states: &[&str],
) -> Vec<Value> {
    eventually(Duration::from_secs(40), || async {
        let ds = deliveries(app, &format!("rule_id={rule_id}&limit=500")).await;
        (ds.len() == n
            && ds
                .iter()
                .all(|d| final_states.contains(&d["status"].as_str().unwrap_or(""))))
        .then_some(ds)
    })
    .await
}

fn alert(aggregate: &str, level: &str) -> Value {
    json!({"event_type": "system.alert", "aggregate_id": aggregate,
           "payload": {"level": level, "message": "disk almost full"}})
}

async fn send(app: &TestApp, event: Value) -> String {
    let (s, b) = app.ingest(event).await;
    assert_eq!(s, 202, "{b}");
    b["event_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_matching_alert_arrives_signed_and_a_non_matching_one_sends_nothing() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::ok().await;
    let rule = create_rule(
        &app,
        json!({"name": "page on errors", "event_type": "system.*",
               "condition": {"path": "payload.level", "op": "in", "value": ["error", "critical"]},
               "webhook": {"url": receiver.url("/hooks/alerts"),
                           "headers": {"x-team": "sre"}}}),
    )
    .await;
    let secret = rule["webhook"]["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{rule}");
    let rule_id = rule["rule_id"].as_str().unwrap();

    // Same aggregate, so the non-matching event is consumed before the matching one.
    let ignored = send(&app, alert("host-1", "info")).await;
    let fired = send(&app, alert("host-1", "error")).await;
    let calls = receiver.wait_for(1, Duration::from_secs(30)).await;
    let call = &calls[0];
    assert!(
        verify(&secret, call),
        "Standard Webhooks signature verifies"
    );
    assert!(
        !verify(&format!("whsec_{}", "A".repeat(44)), call),
        "a wrong secret does not"
    );
    let body = call.json();
    assert_eq!(body["event_id"], fired.as_str());
    assert_eq!(body["payload"]["level"], "error");
    assert_eq!(
        call.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(call.header("x-team").as_deref(), Some("sre"));
    let tp = call.header("traceparent").expect("traceparent");
    assert_eq!(tp.len(), 55, "{tp}");

    let ds = wait_deliveries(&app, rule_id, 1, &["delivered"]).await;
    assert_eq!(ds[0]["event_id"], fired.as_str());
    assert_eq!(
        call.header("webhook-id").as_deref(),
        ds[0]["delivery_id"].as_str()
    );
    assert_eq!(ds[0]["attempts"], 1);
    assert_eq!(ds[0]["last_status_code"], 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 1);
    assert!(
        deliveries(&app, &format!("event_id={ignored}"))
            .await
            .is_empty()
    );

    // The secret is shown once: reads of the rule never carry it.
    let got: Value = app
        .http
        .get(app.url(
            Service::Actions,
            &format!("/api/v1/actions/rules/{rule_id}"),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(got["webhook"].get("secret").is_none(), "{got}");
    assert_eq!(got["name"], "page on errors");
}

#[tokio::test]
async fn failures_are_retried_with_growing_gaps_then_delivered_or_failed() {
    let app = spawn(|e| {
        e.insert(
            "CJ_ACTIONS_RETRY_DELAYS".into(),
            "300ms,1500ms,2500ms".into(),
        );
        e.insert("CJ_ACTIONS_BREAKER_THRESHOLD".into(), "100".into());
    })
    .await;
    let flaky = Receiver::start(vec![Reply::status(500), Reply::status(502)], None).await;
    let broken = Receiver::start(vec![], Some(Reply::status(503))).await;
    let r1 = create_rule(
        &app,
        json!({"name": "flaky", "event_type": "system.alert",
               "condition": {"path": "aggregate_id", "op": "==", "value": "flaky"},
               "webhook": {"url": flaky.url("/h")}}),
    )
    .await;
    let r2 = create_rule(
        &app,
        json!({"name": "broken", "event_type": "system.alert",
               "condition": {"path": "aggregate_id", "op": "==", "value": "broken"},
               "webhook": {"url": broken.url("/h")}}),
    )
    .await;
    send(&app, alert("flaky", "error")).await;
    send(&app, alert("broken", "error")).await;

    let ds = wait_deliveries(&app, r1["rule_id"].as_str().unwrap(), 1, &["delivered"]).await;
    assert_eq!(ds[0]["attempts"], 3);
    let calls = flaky.calls();
    assert_eq!(calls.len(), 3, "exactly three calls");
    let ids: HashSet<_> = calls.iter().map(|c| c.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "one webhook-id across retries");
    let g1 = calls[1].at - calls[0].at;
    let g2 = calls[2].at - calls[1].at;
    assert!(g1 >= Duration::from_millis(290), "first gap {g1:?}");
    assert!(g2 >= Duration::from_millis(1490), "second gap {g2:?}");
    assert!(g2 > g1, "gaps grow: {g1:?} then {g2:?}");

    let ds = wait_deliveries(&app, r2["rule_id"].as_str().unwrap(), 1, &["failed"]).await;
    assert_eq!(ds[0]["attempts"], 4, "one attempt and three retries");
    assert_eq!(ds[0]["last_status_code"], 503);
    assert!(
        ds[0]["last_error"].as_str().unwrap().contains("HTTP 503"),
        "{}",
        ds[0]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broken.count(), 4);
}

#[tokio::test]
async fn a_receiver_slower_than_the_timeout_counts_as_a_failure() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "100ms".into());
    })
    .await;
    let slow = Receiver::start(
        vec![],
        Some(Reply {
            status: 200,
            delay: Duration::from_secs(3),
        }),
    )
    .await;
    let rule = create_rule(
        &app,
        json!({"name": "slow", "event_type": "system.alert",
               "webhook": {"url": slow.url("/h"), "timeout_s": 0.3}}),
    )
    .await;
    send(&app, alert("s", "error")).await;
    let ds = wait_deliveries(&app, rule["rule_id"].as_str().unwrap(), 1, &["failed"]).await;
    assert_eq!(ds[0]["attempts"], 2);
    assert!(ds[0]["last_status_code"].is_null());
    assert!(
        ds[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer within"),
        "{}",
        ds[0]
    );
}

#[tokio::test]
async fn the_rate_limit_delays_deliveries_and_loses_none() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RATE_LIMIT".into(), "3/6s".into());
    })
    .await;
    let receiver = Receiver::ok().await;
    let rule = create_rule(
        &app,
        json!({"name": "all alerts", "event_type": "system.alert",
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    // One request, so the six events are recorded together and meet a full bucket.
    let events: Vec<Value> = (0..6).map(|i| alert(&format!("rl-{i}"), "warn")).collect();
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let first = receiver.wait_for(3, Duration::from_secs(30)).await;
    // One token comes back every 2 s: three sends now, the rest spaced by the bucket. (The
    // receiver's clock sees the calls up to a scheduling delay late, hence the 1 s margin.)
    let calls = receiver.wait_for(6, Duration::from_secs(20)).await;
    for i in 0..3 {
        let gap = calls[i + 3].at - calls[i].at;
        assert!(
            gap >= Duration::from_millis(1000),
            "calls {i} and {} are {gap:?} apart: more than 3 per bucket",
            i + 3
        );
    }
    assert!(
        first[2].at - first[0].at < Duration::from_millis(1500),
        "the first three went without waiting"
    );
    let ds = wait_deliveries(&app, rule["rule_id"].as_str().unwrap(), 6, &["delivered"]).await;
    assert_eq!(ds.len(), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 6, "none sent twice");
}

#[tokio::test]
async fn a_second_event_for_the_same_aggregate_within_the_window_is_deduplicated() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::ok().await;
    let rule = create_rule(
        &app,
        json!({"name": "dedup", "event_type": "system.alert", "dedup_window_s": 60,
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    let first = send(&app, alert("pump-1", "error")).await;
    send(&app, alert("pump-1", "error")).await;
    send(&app, alert("pump-2", "error")).await;
    let ds = wait_deliveries(&app, rule_id, 3, &["delivered", "deduplicated"]).await;
    let by_status = |s: &str| ds.iter().filter(|d| d["status"] == s).count();
    assert_eq!(by_status("delivered"), 2);
    assert_eq!(by_status("deduplicated"), 1);
    let delivered: HashSet<&str> = ds
        .iter()
        .filter(|d| d["status"] == "delivered")
        .map(|d| d["aggregate_id"].as_str().unwrap())
        .collect();
    assert_eq!(delivered, HashSet::from(["pump-1", "pump-2"]));
    assert!(
        ds.iter()
            .any(|d| d["status"] == "delivered" && d["event_id"] == first.as_str())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 2);
}

#[tokio::test]
async fn the_breaker_opens_short_circuits_then_lets_one_trial_through() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms".into());
        e.insert("CJ_ACTIONS_BREAKER_THRESHOLD".into(), "3".into());
        e.insert("CJ_ACTIONS_BREAKER_COOLDOWN".into(), "2s".into());
    })
    .await;
    // Fails three times, then recovers.
    let failing = Receiver::start(vec![Reply::status(500); 3], None).await;
    let healthy = Receiver::ok().await;
    let rf = create_rule(
        &app,
        json!({"name": "f", "event_type": "system.alert", "dedup_window_s": 0,
               "condition": {"path": "aggregate_id", "op": "starts_with", "value": "f"},
               "webhook": {"url": failing.url("/h")}}),
    )
    .await;
    let rh = create_rule(
        &app,
        json!({"name": "h", "event_type": "system.alert", "dedup_window_s": 0,
               "condition": {"path": "aggregate_id", "op": "starts_with", "value": "h"},
               "webhook": {"url": healthy.url("/h")}}),
    )
    .await;
    let rf_id = rf["rule_id"].as_str().unwrap();
    let endpoint = |app: &TestApp| {
        let url = app.url(Service::Actions, "/api/v1/actions/endpoints");
        let http = app.http.clone();
        let want = failing.url("/h");
        async move {
            let v: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            v["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["endpoint"] == want.as_str())
                .cloned()
        }
    };

    send(&app, alert("f", "error")).await; // two failed attempts
    wait_deliveries(&app, rf_id, 1, &["failed"]).await;
    send(&app, alert("f", "error")).await; // third failure opens; its retry short-circuits
    let ds = wait_deliveries(&app, rf_id, 2, &["failed", "circuit_open"]).await;
    assert!(ds.iter().any(|d| d["status"] == "circuit_open"), "{ds:?}");
    assert_eq!(failing.count(), 3);
    let e = endpoint(&app).await.expect("endpoint listed");
    assert_eq!(e["state"], "open", "{e}");
    assert_eq!(e["consecutive_failures"], 3);
    assert!(e["open_until"].is_string());

    send(&app, alert("f", "error")).await;
    let ds = wait_deliveries(&app, rf_id, 3, &["failed", "circuit_open"]).await;
    assert_eq!(
        ds.iter().filter(|d| d["status"] == "circuit_open").count(),
        2
    );
    assert_eq!(failing.count(), 3, "no call while open");

    // Another rule's healthy endpoint is unaffected.
    send(&app, alert("h", "error")).await;
    wait_deliveries(&app, rh["rule_id"].as_str().unwrap(), 1, &["delivered"]).await;
    assert_eq!(healthy.count(), 1);

    // After the cool-down: one trial call, which succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(endpoint(&app).await.unwrap()["state"], "half_open");
    send(&app, alert("f", "error")).await;
    wait_deliveries(&app, rf_id, 4, &["failed", "circuit_open", "delivered"]).await;
    assert_eq!(failing.count(), 4, "exactly one trial call");
    let e = endpoint(&app).await.unwrap();
    assert_eq!(e["state"], "closed", "{e}");
    assert_eq!(e["consecutive_failures"], 0);
}

#[tokio::test]
async fn a_restart_with_deliveries_pending_loses_none_and_repeats_none() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert("CJ_ACTIONS_RATE_LIMIT".into(), "2/2s".into());
    let same_db = || TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let mut app = TestApp::start(same_db(), prefix.clone(), env.clone(), SERVICES).await;
    app.wait_ready().await;
    wait_actions_ready(&app).await;
    let receiver = Receiver::ok().await;
    let rule = create_rule(
        &app,
        json!({"name": "restart", "event_type": "system.alert",
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    for i in 0..6 {
        send(&app, alert(&format!("r-{i}"), "error")).await;
    }
    receiver.wait_for(2, Duration::from_secs(30)).await;
    assert!(app.stop().await, "stopped cleanly with deliveries pending");
    let before = receiver.count();
    assert!(
        before < 6,
        "some deliveries were still pending ({before} sent)"
    );

    let app = TestApp::start(same_db(), prefix, env, SERVICES).await;
    let calls = receiver.wait_for(6, Duration::from_secs(40)).await;
    let ds = wait_deliveries(&app, rule["rule_id"].as_str().unwrap(), 6, &["delivered"]).await;
    assert_eq!(ds.len(), 6);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_after = receiver.calls();
    assert_eq!(calls_after.len(), 6, "nothing sent twice: {}", calls.len());
    let ids: HashSet<_> = calls_after.iter().map(|c| c.header("webhook-id")).collect();
    assert_eq!(ids.len(), 6);
}

#[tokio::test]
async fn rules_api_validates_and_supports_crud() {
    let app = spawn(|_| {}).await;
    let url = app.url(Service::Actions, "/api/v1/actions/rules");
    let bad = app
        .http
        .post(&url)
        .json(&json!({"name": "x", "event_type": "Nope", "colour": 1,
                      "webhook": {"url": "file:///etc/passwd"},
                      "condition": {"path": "payload.a", "op": "~", "value": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    let fields: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    for f in ["event_type", "colour", "webhook.url", "condition.op"] {
        assert!(fields.contains(&f), "{f} in {body}");
    }
    let r = app.http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let huge = json!({"name": "x".repeat(70 * 1024)});
    let r = app.http.post(&url).json(&huge).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("larger than"),
        "{body}"
    );
    let r = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let secret = format!("whsec_{}", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let created = create_rule(
        &app,
        json!({"name": "r", "event_type": "ai.anomaly",
               "webhook": {"url": "https://hooks.example.com/x", "secret": secret, "timeout_s": 5}}),
    )
    .await;
    assert!(
        created["webhook"].get("secret").is_none()
            || created["webhook"]["secret"] == secret.as_str()
    );
    let id = created["rule_id"].as_str().unwrap();
    let one = format!("{url}/{id}");
    let patched: Value = app
        .http
        .patch(&one)
        .json(&json!({"enabled": false, "webhook": {"timeout_s": 2}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["enabled"], false, "{patched}");
    assert_eq!(patched["webhook"]["timeout_s"], 2.0);
    assert_eq!(patched["webhook"]["url"], "https://hooks.example.com/x");
    let r = app
        .http
        .put(&one)
        .json(&json!({"name": "r2", "event_type": "ai.*",
                      "webhook": {"url": "http://127.0.0.1:1/y"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = app
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["rules"][0]["name"], "r2");
    assert_eq!(list["rules"][0]["event_type"], "ai.*");
    assert_eq!(app.http.delete(&one).send().await.unwrap().status(), 204);
    assert_eq!(app.http.delete(&one).send().await.unwrap().status(), 404);
    assert_eq!(app.http.get(&one).send().await.unwrap().status(), 404);
    let r = app
        .http
        .get(format!("{url}/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .http
        .get(app.url(Service::Actions, "/api/v1/actions/deliveries?status=lost"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS".into(), "false".into());
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms".into());
    })
    .await;
    let receiver = Receiver::ok().await;
    let port = receiver.addr.port();
    let literal = create_rule(
        &app,
        json!({"name": "literal", "event_type": "system.alert",
               "condition": {"path": "aggregate_id", "op": "==", "value": "a"},
               "webhook": {"url": format!("http://127.0.0.1:{port}/h")}}),
    )
    .await;
    let named = create_rule(
        &app,
        json!({"name": "named", "event_type": "system.alert",
               "condition": {"path": "aggregate_id", "op": "==", "value": "b"},
               "webhook": {"url": format!("http://localhost:{port}/h")}}),
    )
    .await;
    send(&app, alert("a", "error")).await;
    send(&app, alert("b", "error")).await;
    for (rule, why) in [
        (&literal, "is not a public address"),
        (&named, "resolves to no public address"),
    ] {
        let ds = wait_deliveries(&app, rule["rule_id"].as_str().unwrap(), 1, &["failed"]).await;
        let err = ds[0]["last_error"].as_str().unwrap();
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(receiver.count(), 0, "no call reached the loopback receiver");
}

#[tokio::test]
async fn a_replay_records_no_delivery_twice_and_fires_no_newer_rule() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::ok().await;
    let old = create_rule(
        &app,
        json!({"name": "old", "event_type": "system.alert", "dedup_window_s": 0,
               "webhook": {"url": receiver.url("/old")}}),
    )
    .await;
    for i in 0..3 {
        send(&app, alert(&format!("rp-{i}"), "error")).await;
    }
    wait_deliveries(&app, old["rule_id"].as_str().unwrap(), 3, &["delivered"]).await;
    // A rule created after the events: live events would fire it, a replay of old ones must not.
    let newer = create_rule(
        &app,
        json!({"name": "newer", "event_type": "system.alert", "dedup_window_s": 0,
               "webhook": {"url": receiver.url("/newer")}}),
    )
    .await;
    let out = cli_ok(
        &app,
        &[
            "replay",
            "--since",
            "2000-01-01T00:00:00Z",
            "--type",
            "system.alert",
        ],
    );
    assert!(out.contains("3 event(s) republished"), "{out}");
    // A live event after the replay, on the same topic: once it is delivered by both rules, the
    // replayed ones before it have been consumed.
    let live = send(&app, alert("rp-live", "error")).await;
    wait_deliveries(&app, newer["rule_id"].as_str().unwrap(), 1, &["delivered"]).await;
    let ds = wait_deliveries(&app, old["rule_id"].as_str().unwrap(), 4, &["delivered"]).await;
    assert!(ds.iter().any(|d| d["event_id"] == live.as_str()));
    let newer_ds = deliveries(
        &app,
        &format!("rule_id={}", newer["rule_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(newer_ds.len(), 1, "{newer_ds:?}");
    assert_eq!(newer_ds[0]["event_id"], live.as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.count(), 5, "3 + 1 to the old rule, 1 to the newer");
}
