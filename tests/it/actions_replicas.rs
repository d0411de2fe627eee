//! Action orchestrators as their own processes: three on one database and one consumer group,
//! with a global rate limit and a breaker — the limit is shared (not three limits), every
//! delivery reaches a healthy receiver exactly once, and a failing receiver opens one breaker that
//! all three obey; and one whose environment names a proxy, which its webhooks do not use.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::webhook::{Receiver, Reply};
use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

struct Orchestrator {
    child: Child,
    api: u16,
    health: u16,
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn orchestrator(env: &HashMap<String, String>) -> Orchestrator {
    let (api, health) = (free_port(), free_port());
    let child = cornjacket()
        .args(["serve", "--services", "actions"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .env("CJ_ACTIONS_PORT", api.to_string())
        .env("CJ_ACTIONS_HEALTH_PORT", health.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cornjacket");
    Orchestrator { child, api, health }
}

/// `cj_webhook_attempts_total` summed over outcomes, from one process's /metrics.
async fn attempts_made(http: &reqwest::Client, o: &Orchestrator) -> f64 {
    let text = http
        .get(format!("http://127.0.0.1:{}/metrics", o.health))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("cj_webhook_attempts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn three_orchestrators_share_the_limit_deliver_once_and_obey_one_breaker() {
    // Ingestion (and its outbox processor) in this process; the orchestrators in three others.
    let app = TestApp::spawn_with(&[Service::Ingestion], |_| {}).await;
    app.wait_ready().await;
    let mut env = test_env(&app.db.url, &app.prefix);
    for (k, v) in [
        ("CJ_ACTIONS_RATE_LIMIT", "10/1s"),
        ("CJ_ACTIONS_BREAKER_THRESHOLD", "3"),
        ("CJ_ACTIONS_BREAKER_COOLDOWN", "10m"),
        ("CJ_ACTIONS_RETRY_DELAYS", "100ms,100ms"),
        // Many workers and short claims: the setting under which a worker waiting for a slot
        // used to outlive its claim, have it taken over and waste the slot.
        ("CJ_ACTIONS_WORKERS", "16"),
        ("CJ_ACTIONS_CLAIM_TIMEOUT", "500ms"),
        ("CJ_ACTIONS_WEBHOOK_TIMEOUT", "2s"),
    ] {
        env.insert(k.into(), v.into());
    }
    let procs: Vec<Orchestrator> = (0..3).map(|_| orchestrator(&env)).collect();
    for o in &procs {
        let url = format!("http://127.0.0.1:{}/health", o.health);
        eventually(Duration::from_secs(60), || async {
            let v: Value = app.http.get(&url).send().await.ok()?.json().await.ok()?;
            (v["checks"]["database"]["status"] == "healthy"
                && v["checks"]["consumer"]["group"].is_string())
            .then_some(())
        })
        .await;
    }

    let healthy = Receiver::ok().await;
    let failing = Receiver::start(vec![], Some(Reply::status(500))).await;
    let api = format!("http://127.0.0.1:{}/api/v1/actions/rules", procs[0].api);
    for (name, prefix, url) in [
        ("healthy", "h-", healthy.url("/h")),
        ("failing", "f-", failing.url("/f")),
    ] {
        let r = app
            .http
            .post(&api)
            .json(
                &json!({"name": name, "event_type": "system.alert", "dedup_window_s": 0,
                   "condition": {"path": "aggregate_id", "op": "starts_with", "value": prefix},
                   "webhook": {"url": url}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let events: Vec<Value> = (0..60)
        .map(|i| format!("h-{i}"))
        .chain((0..6).map(|i| format!("f-{i}")))
        .map(|a| {
            json!({"event_type": "system.alert", "aggregate_id": a,
                   "payload": {"level": "error", "message": "replicas"}})
        })
        .collect();
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Every delivery to the healthy receiver, exactly once — and at the pace of the limit, not
    // a trickle: 66 calls at 10/s after a burst of 10 take about 6 s; wasted slots would take
    // several times that.
    let started = std::time::Instant::now();
    let calls = healthy.wait_for(60, Duration::from_secs(20)).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_after = healthy.calls();
    assert_eq!(calls_after.len(), 60, "a delivery was sent twice");
    let ids: HashSet<_> = calls.iter().map(|c| c.header("webhook-id")).collect();
    assert_eq!(ids.len(), 60);
    eprintln!("60 healthy deliveries in {took:?}");

    // One limit across the three: after the burst of 10, one call per 100 ms, so n calls
    // cannot span less than (n - 10) × 100 ms; three separate limits would send three bursts
    // at once and then 30 a second, about a third of that. A lower bound on the whole span
    // holds on a loaded machine too (lateness only lengthens it), where counting the calls in
    // a sliding window did not: late first sends arrived bunched with the paced ones (30 calls
    // within 1.06 s in one full `make test`).
    let mut at: Vec<_> = calls_after
        .iter()
        .chain(failing.calls().iter())
        .map(|c| c.at)
        .collect();
    at.sort();
    let n = at.len() as u64;
    let span = at[at.len() - 1] - at[0];
    let floor = Duration::from_millis((n - 10) * 100 * 9 / 10);
    assert!(
        span >= floor,
        "{n} calls within {span:?}, under the shared limit's {floor:?}: the rate limit was not shared"
    );

    // One breaker: after it opened, no process called the failing receiver again, and what
    // was left for it was short-circuited, not sent.
    let n = failing.count();
    assert!(
        (3..=10).contains(&n),
        "{n} calls to the failing receiver (threshold 3, at most a burst in flight)"
    );
    let pool = app.db.pool().await;
    let (state, failures): (String, i32) = sqlx::query_as(
        "SELECT state, consecutive_failures FROM actions.endpoint_health WHERE endpoint = $1",
    )
    .bind(failing.url("/f"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(state, "open");
    assert_eq!(
        failures as usize, n,
        "every failure counted in the one shared breaker"
    );
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT d.status FROM actions.deliveries d JOIN actions.rules r USING (rule_id)
         WHERE r.name = 'failing'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(statuses.len(), 6);
    assert!(statuses.iter().any(|s| s == "circuit_open"), "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| s == "circuit_open" || s == "failed" || s == "pending"),
        "{statuses:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(failing.count(), n, "a call while the breaker was open");

    // The work moved between the processes.
    let mut made = Vec::new();
    for o in &procs {
        made.push(attempts_made(&app.http, o).await);
    }
    assert_eq!(made.iter().sum::<f64>() as usize, 60 + n, "{made:?}");
    assert!(
        made.iter().filter(|m| **m > 0.0).count() >= 2,
        "one process did all the work: {made:?}"
    );
}

#[tokio::test]
async fn webhooks_ignore_a_proxy_from_the_environment() {
    let app = TestApp::spawn_with(&[Service::Ingestion], |_| {}).await;
    app.wait_ready().await;
    // The proxy a shell or a container happens to export: signed payloads must not go there.
    let proxy = Receiver::ok().await;
    let mut env = test_env(&app.db.url, &app.prefix);
    for k in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"] {
        env.insert(k.into(), proxy.url(""));
    }
    let o = orchestrator(&env);
    let url = format!("http://127.0.0.1:{}/health", o.health);
    eventually(Duration::from_secs(60), || async {
        let v: Value = app.http.get(&url).send().await.ok()?.json().await.ok()?;
        (v["checks"]["consumer"]["group"].is_string()).then_some(())
    })
    .await;
    let receiver = Receiver::ok().await;
    let r = app
        .http
        .post(format!("http://127.0.0.1:{}/api/v1/actions/rules", o.api))
        .json(&json!({"name": "direct", "event_type": "system.alert",
                      "webhook": {"url": receiver.url("/h")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (s, b) = app
        .ingest(json!({"event_type": "system.alert", "aggregate_id": "p-1",
                       "payload": {"level": "error", "message": "proxy"}}))
        .await;
    assert_eq!(s, 202, "{b}");
    receiver.wait_for(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.count(),
        0,
        "the webhook went through the environment's proxy"
    );
}
