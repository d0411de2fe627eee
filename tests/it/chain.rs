//! The anomaly chain of SPEC §9 / ADR-0001 end to end, over real infrastructure: sensor readings
//! over HTTP → the outbox and the bus → the Python ai-inference sidecar flags an outlier and
//! submits `ai.anomaly` through the ingestion API → the action orchestrator's rule on
//! `ai.anomaly` → a signed webhook at an in-test receiver. Prints the latency of each outlier
//! (reading accepted → webhook received), median and p99.

use std::time::{Duration, Instant};

use crate::common::sidecar::Sidecar;
use crate::common::webhook::{Receiver, verify};
use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

fn reading(device: &str, value: f64) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": value, "unit": "celsius"}})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outlier_reading_becomes_a_signed_webhook() {
    let app = TestApp::spawn(&[Service::Ingestion, Service::Actions]).await;
    app.wait_ready().await;
    let sidecar = Sidecar::start(&app, &brokers());
    let receiver = Receiver::ok().await;
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .json(
            &json!({"name": "anomalies", "event_type": "ai.anomaly", "dedup_window_s": 0,
                      "webhook": {"url": receiver.url("/anomaly")}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let rule: Value = r.json().await.unwrap();
    let secret = rule["webhook"]["secret"].as_str().unwrap().to_string();
    sidecar.wait_healthy(&app.http).await;

    // Warm every device up with normal readings (deterministic, within ±0.5 of 20).
    const DEVICES: usize = 12;
    let normal: Vec<Value> = (0..40)
        .flat_map(|i| {
            (0..DEVICES).map(move |d| {
                reading(
                    &format!("chain-{d}"),
                    20.0 + ((i * 37 + d * 11) % 100) as f64 / 100.0 - 0.5,
                )
            })
        })
        .collect();
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest/batch"))
        .json(&json!({ "events": normal }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let pool = app.pool().await;
    eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ai.inference_results")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n as usize >= 40 * DEVICES).then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 0, "no normal reading fired");

    // One outlier per device, one at a time: accepted → webhook received.
    let mut latencies = Vec::new();
    for d in 0..DEVICES {
        let started = Instant::now();
        let (s, b) = app.ingest(reading(&format!("chain-{d}"), 80.0)).await;
        assert_eq!(s, 202, "{b}");
        let source = b["event_id"].as_str().unwrap().to_string();
        let calls = receiver.wait_for(d + 1, Duration::from_secs(30)).await;
        let call = &calls[d];
        latencies.push(call.at - started);
        assert!(verify(&secret, call), "signed with the rule's secret");
        let body = call.json();
        assert_eq!(body["event_type"], "ai.anomaly");
        assert_eq!(body["aggregate_id"], format!("chain-{d}"));
        assert_eq!(body["payload"]["source_event_id"], source.as_str());
        assert_eq!(body["payload"]["value"], 80.0);
        assert_eq!(body["metadata"]["source"], "ai", "{body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.count(),
        DEVICES,
        "one webhook per outlier, no more"
    );
    latencies.sort();
    eprintln!(
        "anomaly chain (reading accepted → webhook received), {} outliers: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}
