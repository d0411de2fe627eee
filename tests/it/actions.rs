//! The action orchestrator (SPEC §10) against real PostgreSQL, the real broker and in-test HTTP
//! receivers: rules, signed webhooks, retries, timeouts, the rate limit, dedup, the circuit
//! breaker, and a restart with deliveries pending.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::webhook::{Receiver, Reply, signatures, verify};
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

/// A rule on `system.alert` for the aggregates starting with `prefix`, without dedup.
async fn prefix_rule(app: &TestApp, name: &str, prefix: &str, url: &str) -> Value {
    create_rule(
        app,
        json!({"name": name, "event_type": "system.alert", "dedup_window_s": 0,
               "condition": {"path": "aggregate_id", "op": "starts_with", "value": prefix},
               "webhook": {"url": url}}),
    )
    .await
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
    // The schedule spread by ±20% (jitter).
    let g1 = calls[1].at - calls[0].at;
    let g2 = calls[2].at - calls[1].at;
    // Never early. (A retry may be late on a loaded machine — the first was once 1.46 s late
    // in a full `make test` — so comparing the two gaps measured the machine, not the
    // schedule; the second's lower bound is above the first's upper one, which is the growth.)
    assert!(g1 >= Duration::from_millis(230), "first gap {g1:?}");
    assert!(g2 >= Duration::from_millis(1190), "second gap {g2:?}");

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
    let slow = Receiver::slow(Duration::from_secs(3)).await;
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
    let rf = prefix_rule(&app, "f", "f", &failing.url("/h")).await;
    let rh = prefix_rule(&app, "h", "h", &healthy.url("/h")).await;
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

    // After the cool-down, with no new traffic: the oldest short-circuited delivery is the
    // trial call, which succeeds and closes the breaker; then the other one is sent too. Only
    // the delivery that ran out of retries before the breaker opened stays failed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let ds = wait_deliveries(&app, rf_id, 3, &["failed", "delivered"]).await;
    let failed: Vec<_> = ds.iter().filter(|d| d["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{ds:?}");
    let calls = failing.wait_for(5, Duration::from_secs(10)).await;
    let after: Vec<_> = calls[3..].iter().map(|c| c.header("webhook-id")).collect();
    assert_eq!(
        after.iter().collect::<HashSet<_>>().len(),
        2,
        "the two short-circuited deliveries, once each: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failing.count(), 5, "nothing sent twice");
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

async fn get_json(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(Service::Actions, path))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

async fn post_json(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url(Service::Actions, path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

#[tokio::test]
async fn every_attempt_is_recorded_redacted_and_retry_after_is_honoured() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms,50ms".into());
    })
    .await;
    let receiver = Receiver::start(
        vec![Reply::status(503).with_retry_after("2").with_body(
            r#"{"error":"busy","password":"hunter2","echo":"Bearer abcdefgh12345678"}"#,
        )],
        None,
    )
    .await;
    let rule = create_rule(
        &app,
        json!({"name": "busy", "event_type": "system.alert",
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    send(&app, alert("busy-1", "error")).await;
    let ds = wait_deliveries(&app, rule["rule_id"].as_str().unwrap(), 1, &["delivered"]).await;
    let calls = receiver.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 asked for two seconds, the retry came after {gap:?} (schedule: 50ms)"
    );
    let id = ds[0]["delivery_id"].as_str().unwrap();
    let (s, v) = get_json(&app, &format!("/api/v1/actions/deliveries/{id}/attempts")).await;
    assert_eq!(s, 200, "{v}");
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{v}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["status_code"], 503);
    assert_eq!(attempts[0]["retry_after_s"], 2.0);
    let excerpt = attempts[0]["response_excerpt"].as_str().unwrap();
    assert!(excerpt.contains("busy"), "{excerpt}");
    assert!(
        !excerpt.contains("hunter2") && !excerpt.contains("abcdefgh12345678"),
        "credentials masked: {excerpt}"
    );
    assert!(attempts[0]["duration_ms"].as_i64().unwrap() >= 0);
    assert!(attempts[0]["started_at"].is_string());
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[1]["status_code"], 200);
    assert!(attempts[1]["error"].is_null());

    let (s, v) = get_json(
        &app,
        "/api/v1/actions/deliveries/00000000-0000-7000-8000-000000000000/attempts",
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (s, _) = get_json(&app, "/api/v1/actions/deliveries/nope/attempts").await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn gone_disables_the_rule_visibly_until_it_is_enabled_again() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms,50ms".into());
    })
    .await;
    let receiver = Receiver::start(vec![Reply::status(410)], None).await;
    let rule = create_rule(
        &app,
        json!({"name": "gone", "event_type": "system.alert", "dedup_window_s": 0,
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    send(&app, alert("g-1", "error")).await;
    let ds = wait_deliveries(&app, rule_id, 1, &["failed"]).await;
    assert_eq!(ds[0]["attempts"], 1, "410 is not retried: {}", ds[0]);
    assert_eq!(ds[0]["last_status_code"], 410);
    let (_, r) = get_json(&app, &format!("/api/v1/actions/rules/{rule_id}")).await;
    assert_eq!(r["enabled"], false, "{r}");
    assert!(
        r["disabled_reason"].as_str().unwrap().contains("410"),
        "{r}"
    );
    assert!(r["disabled_at"].is_string());
    // The endpoint's breaker is not the place for it: the endpoint answered.
    let (_, e) = get_json(&app, "/api/v1/actions/endpoints").await;
    let e = e["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == receiver.url("/h").as_str())
        .cloned();
    assert!(
        e.as_ref().is_none_or(|e| e["consecutive_failures"] == 0),
        "{e:?}"
    );

    // Disabled: the next event fires nothing.
    send(&app, alert("g-2", "error")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        deliveries(&app, &format!("rule_id={rule_id}")).await.len(),
        1
    );

    // Enabled again through the API: the reason goes, the next event is delivered.
    let r: Value = app
        .http
        .patch(app.url(
            Service::Actions,
            &format!("/api/v1/actions/rules/{rule_id}"),
        ))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["enabled"], true, "{r}");
    assert!(r["disabled_reason"].is_null(), "{r}");
    send(&app, alert("g-3", "error")).await;
    let ds = wait_deliveries(&app, rule_id, 2, &["failed", "delivered"]).await;
    assert!(ds.iter().any(|d| d["status"] == "delivered"), "{ds:?}");
}

#[tokio::test]
async fn recovery_resends_what_failed_once_each_even_when_run_twice() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms".into());
        e.insert("CJ_ACTIONS_BREAKER_THRESHOLD".into(), "1000".into());
    })
    .await;
    // Down for the first ten calls (five deliveries, two attempts each), then up.
    let receiver = Receiver::start(vec![Reply::status(500); 10], None).await;
    let other = Receiver::start(vec![], Some(Reply::status(500))).await;
    let rule = prefix_rule(&app, "down", "r-", &receiver.url("/h")).await;
    let other_rule = prefix_rule(&app, "other", "o-", &other.url("/h")).await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    let since = wall_clock() - chrono::Duration::seconds(5);
    app.ingest_batch(
        (0..5)
            .map(|i| alert(&format!("r-{i}"), "error"))
            .chain([alert("o-1", "error")])
            .collect(),
    )
    .await;
    wait_deliveries(&app, rule_id, 5, &["failed"]).await;
    wait_deliveries(
        &app,
        other_rule["rule_id"].as_str().unwrap(),
        1,
        &["failed"],
    )
    .await;
    assert_eq!(receiver.count(), 10);

    // Through the CLI (`cornjacket actions recover`), then at once again through the API:
    // nothing more is queued, nothing is sent twice.
    let since_text = cornjacket::envelope::format_time(&since);
    let out = cornjacket()
        .args([
            "actions",
            "recover",
            "--since",
            &since_text,
            "--rule",
            rule_id,
        ])
        .env("CJ_DATABASE_URL", &app.db.url)
        .env("CJ_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("requeued 5 deliveries"), "{stdout}");
    let body = json!({"since": since_text, "rule_id": rule_id});
    let (s, v) = post_json(&app, "/api/v1/actions/recover", body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["requeued"], 0, "{v}");
    let ds = wait_deliveries(&app, rule_id, 5, &["delivered"]).await;
    for d in &ds {
        assert_eq!(d["attempts"], 3, "attempts keep counting: {d}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = receiver.calls();
    assert_eq!(calls.len(), 15, "each recovered delivery sent once");
    let resent: HashSet<_> = calls[10..].iter().map(|c| c.header("webhook-id")).collect();
    assert_eq!(resent.len(), 5);
    // Another rule's failure was not touched.
    assert_eq!(
        deliveries(
            &app,
            &format!("rule_id={}", other_rule["rule_id"].as_str().unwrap())
        )
        .await[0]["status"],
        "failed"
    );

    for (body, field) in [
        (json!({"since": "yesterday"}), "since"),
        (
            json!({"since": "2026-01-01T00:00:00Z", "rule_id": "x"}),
            "rule_id",
        ),
    ] {
        let (s, v) = post_json(&app, "/api/v1/actions/recover", body).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"], "the request is invalid");
        assert!(v.to_string().contains(field), "{v}");
    }
    let (s, v) = post_json(&app, "/api/v1/actions/recover", json!({"rule_id": rule_id})).await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test]
async fn a_rotated_secret_signs_alongside_the_old_one_until_the_grace_ends() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::ok().await;
    let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let rule = create_rule(
        &app,
        json!({"name": "rotating", "event_type": "system.alert", "dedup_window_s": 0,
               "webhook": {"url": receiver.url("/h"), "secret": old}}),
    )
    .await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    let path = format!("/api/v1/actions/rules/{rule_id}/rotate-secret");
    let (s, v) = post_json(&app, &path, json!({"grace_s": 3})).await;
    assert_eq!(s, 200, "{v}");
    let new = v["webhook"]["secret"].as_str().unwrap().to_string();
    assert!(new.starts_with("whsec_") && new != old, "{v}");
    assert!(
        v["webhook"]["previous_secret_expires_at"].is_string(),
        "{v}"
    );
    // A read shows when the overlap ends, never a secret.
    let (_, r) = get_json(&app, &format!("/api/v1/actions/rules/{rule_id}")).await;
    assert!(r["webhook"].get("secret").is_none(), "{r}");
    assert!(!r.to_string().contains(&new[6..]) && !r.to_string().contains(&old[6..]));

    send(&app, alert("rot-1", "error")).await;
    let calls = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(signatures(&calls[0]).len(), 2, "{:?}", calls[0].headers);
    // By the fixture's verifier and by the reference implementation (`standardwebhooks`).
    let reference = |secret: &str, c: &crate::common::webhook::Call| {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&c.body, &c.headers)
            .is_ok()
    };
    assert!(verify(old, &calls[0]), "the old secret still verifies");
    assert!(verify(&new, &calls[0]), "the new secret verifies");
    assert!(reference(old, &calls[0]) && reference(&new, &calls[0]));

    tokio::time::sleep(Duration::from_secs(3)).await;
    send(&app, alert("rot-2", "error")).await;
    let calls = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(signatures(&calls[1]).len(), 1, "{:?}", calls[1].headers);
    assert!(verify(&new, &calls[1]));
    assert!(
        !verify(old, &calls[1]),
        "after the grace the old secret no longer verifies"
    );

    for (body, field) in [
        (json!({"secret": "nope"}), "secret"),
        (json!({"grace_s": -1}), "grace_s"),
        (json!({"grace_s": 1e9}), "grace_s"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let (s, v) = post_json(&app, &path, body).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"], "the request is invalid");
        assert!(v.to_string().contains(field), "{v}");
    }
    let (s, _) = post_json(
        &app,
        "/api/v1/actions/rules/00000000-0000-7000-8000-000000000000/rotate-secret",
        json!({}),
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn a_deep_backlog_behind_a_slow_endpoint_does_not_hold_back_another_rules_webhook() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RATE_LIMIT".into(), "10/1s".into());
        e.insert("CJ_ACTIONS_WORKERS".into(), "4".into());
    })
    .await;
    let slow = Receiver::slow(Duration::from_millis(300)).await;
    let catch_all = create_rule(
        &app,
        json!({"name": "everything", "event_type": "*", "dedup_window_s": 0,
               "webhook": {"url": slow.url("/all")}}),
    )
    .await;
    app.ingest_batch(
        (0..300)
            .map(|i| alert(&format!("bulk-{i}"), "info"))
            .collect(),
    )
    .await;
    let catch_all_id = catch_all["rule_id"].as_str().unwrap();
    eventually(Duration::from_secs(30), || async {
        (deliveries(&app, &format!("rule_id={catch_all_id}&limit=500"))
            .await
            .len()
            == 300)
            .then_some(())
    })
    .await;
    slow.wait_for(5, Duration::from_secs(10)).await;

    let fast = Receiver::ok().await;
    create_rule(
        &app,
        json!({"name": "pager", "event_type": "system.alert",
               "condition": {"path": "aggregate_id", "op": "==", "value": "urgent"},
               "webhook": {"url": fast.url("/page")}}),
    )
    .await;
    let sent = std::time::Instant::now();
    send(&app, alert("urgent", "error")).await;
    fast.wait_for(1, Duration::from_secs(20)).await;
    let waited = sent.elapsed();
    let pending = deliveries(
        &app,
        &format!("rule_id={catch_all_id}&status=pending&limit=500"),
    )
    .await
    .len();
    // At 10 a second, the backlog ahead of it would have taken half a minute.
    assert!(
        pending > 100,
        "the backlog was still there ({pending} pending) when the new rule's webhook went"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the new rule's webhook waited {waited:?} behind another rule's backlog"
    );
}

#[tokio::test]
async fn health_is_degraded_while_due_deliveries_do_not_move() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_STALL_AFTER".into(), "1s".into());
        e.insert("CJ_ACTIONS_RATE_LIMIT".into(), "0".into());
    })
    .await;
    let receiver = Receiver::ok().await;
    let rule = create_rule(
        &app,
        json!({"name": "stuck", "event_type": "system.alert", "dedup_window_s": 0,
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    send(&app, alert("s-1", "error")).await;
    wait_deliveries(&app, rule_id, 1, &["delivered"]).await;
    let health = || async {
        let v: Value = app
            .http
            .get(app.health_url(Service::Actions, "/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
    };
    assert_eq!(health().await["checks"]["deliveries"]["status"], "healthy");

    // A stuck instance: it holds a due delivery's row and never lets go. The worker skips it
    // (SKIP LOCKED) and nothing else moves.
    let pool = app.db.pool().await;
    let mut stuck = pool.begin().await.unwrap();
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO actions.deliveries
             (delivery_id, rule_id, event_id, event_type, aggregate_id, event_at, endpoint, body,
              status, next_attempt_at)
         SELECT $1, rule_id, $2, 'system.alert', 's-2', now(), webhook_url, '{}', 'pending',
                now() + interval '2 seconds'
         FROM actions.rules WHERE rule_id = $3",
    )
    .bind(id)
    .bind(uuid::Uuid::now_v7())
    .bind(uuid::Uuid::parse_str(rule_id).unwrap())
    .execute(&mut *stuck)
    .await
    .unwrap();
    let mut other = pool.begin().await.unwrap();
    // Committed, then locked by a transaction that stays open, before it is due.
    stuck.commit().await.unwrap();
    sqlx::query("SELECT 1 FROM actions.deliveries WHERE delivery_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *other)
        .await
        .unwrap();
    let v = eventually(Duration::from_secs(20), || async {
        let v = health().await;
        (v["checks"]["deliveries"]["status"] == "degraded").then_some(v)
    })
    .await;
    assert_eq!(v["status"], "degraded", "{v}");
    assert!(
        v["checks"]["deliveries"]["error"]
            .as_str()
            .unwrap()
            .contains("none moved"),
        "{v}"
    );
    // Let go: it is delivered and health recovers.
    other.rollback().await.unwrap();
    wait_deliveries(&app, rule_id, 2, &["delivered"]).await;
    eventually(Duration::from_secs(20), || async {
        (health().await["checks"]["deliveries"]["status"] == "healthy").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_delivery_parked_by_the_breaker_still_deduplicates_and_is_the_one_sent() {
    let app = spawn(|e| {
        e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "50ms,50ms".into());
        e.insert("CJ_ACTIONS_BREAKER_THRESHOLD".into(), "1".into());
        e.insert("CJ_ACTIONS_BREAKER_COOLDOWN".into(), "2s".into());
    })
    .await;
    let receiver = Receiver::start(vec![Reply::status(500)], None).await;
    let rule = create_rule(
        &app,
        json!({"name": "dedup", "event_type": "system.alert", "dedup_window_s": 60,
               "webhook": {"url": receiver.url("/h")}}),
    )
    .await;
    let rule_id = rule["rule_id"].as_str().unwrap();
    // Fails once: the breaker opens and the retry is parked.
    let first = send(&app, alert("pump-9", "error")).await;
    wait_deliveries(&app, rule_id, 1, &["circuit_open"]).await;
    // The same news within the window: deduplicated against the parked one, which will be sent.
    send(&app, alert("pump-9", "error")).await;
    let ds = wait_deliveries(&app, rule_id, 2, &["circuit_open", "deduplicated"]).await;
    assert_eq!(
        ds.iter().filter(|d| d["status"] == "deduplicated").count(),
        1,
        "{ds:?}"
    );
    // After the cool-down the parked one is the trial and is delivered; the duplicate never goes.
    let ds = wait_deliveries(&app, rule_id, 2, &["delivered", "deduplicated"]).await;
    let delivered: Vec<_> = ds.iter().filter(|d| d["status"] == "delivered").collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["event_id"], first.as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.count(),
        2,
        "the first event twice (failed, then delivered), the second never"
    );
}
