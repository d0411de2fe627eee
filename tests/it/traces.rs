//! Traces (SPEC §13): one event is one trace, from the HTTP request that carried it through the
//! outbox, the publish, each consumer and the webhook call — collected here by an in-memory
//! span exporter instead of OTLP, with the real database, broker and an in-test receiver.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::webhook::Receiver;
use crate::common::*;
use cornjacket::config::Config;
use cornjacket::infra::telemetry;
use cornjacket::services::Service;
use opentelemetry::trace::{SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_one_trace_from_the_request_to_the_webhook() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_resource(telemetry::resource())
        .build();
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let env = test_env(&db.url, &prefix);
    telemetry::init_with_traces(&Config::from_map(&env).unwrap(), Some(provider));
    assert!(telemetry::traces_on());
    let app = TestApp::start(
        db,
        prefix,
        env,
        &[Service::Ingestion, Service::Eventhandler, Service::Actions],
    )
    .await;
    app.wait_ready().await;
    let receiver = Receiver::ok().await;
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .json(&json!({"name": "traced", "event_type": "sensor.reading",
                      "webhook": {"url": receiver.url("/h")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(
            &json!({"event_type": "sensor.reading", "aggregate_id": "traced-1",
                      "payload": {"value": 1.5, "unit": "celsius"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let event_id = r.json::<Value>().await.unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The webhook continues the client's trace.
    let calls = receiver.wait_for(1, Duration::from_secs(40)).await;
    let sent = calls[0]
        .header("traceparent")
        .expect("traceparent on the webhook");
    assert_eq!(&sent[3..35], trace, "{sent}");
    // So does the stored event.
    let pool = app.pool().await;
    let stored: String = sqlx::query_scalar(
        "SELECT metadata->>'traceparent' FROM ingestion.event_store WHERE event_id = $1::uuid",
    )
    .bind(&event_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(&stored[3..35], trace, "{stored}");

    let want_id = TraceId::from_hex(trace).unwrap();
    let groups = [
        format!("{}event-handler", app.prefix),
        format!("{}action-orchestrator", app.prefix),
    ];
    // The event handler's span ends when its batch is applied; wait for everything.
    let spans = eventually(Duration::from_secs(30), || async {
        telemetry::flush_traces();
        let spans: Vec<_> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == want_id)
            .collect();
        let consumers: BTreeSet<String> = spans
            .iter()
            .filter(|s| s.name == "consume")
            .flat_map(|s| s.attributes.iter())
            .filter(|kv| kv.key.as_str() == "messaging.consumer.group.name")
            .map(|kv| kv.value.to_string())
            .collect();
        let has = |n: &str| spans.iter().any(|s| s.name == n);
        (has("POST /api/v1/ingest")
            && has("outbox.insert")
            && has("outbox.publish")
            && has("webhook.send")
            && groups.iter().all(|g| consumers.contains(g)))
        .then_some(spans)
    })
    .await;

    let http = spans
        .iter()
        .find(|s| s.name == "POST /api/v1/ingest")
        .unwrap();
    assert_eq!(http.span_kind, SpanKind::Server);
    assert_eq!(
        format!("{:016x}", http.parent_span_id),
        "00f067aa0ba902b7",
        "the request's span is the client's child"
    );
    let publish = spans.iter().find(|s| s.name == "outbox.publish").unwrap();
    assert!(
        publish
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "event_id" && kv.value.to_string() == event_id),
        "{publish:?}"
    );
    // The webhook's traceparent names the webhook span.
    let webhook = spans.iter().find(|s| s.name == "webhook.send").unwrap();
    assert_eq!(
        &sent[36..52],
        format!("{:016x}", webhook.span_context.span_id())
    );
}
