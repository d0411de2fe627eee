//! The OpenAPI documents in api/openapi/ agree with the routes the code serves (SPEC §8).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use cornjacket::infra::dlq;
use cornjacket::services::{Service, actions, ingestion, query};
use serde_json::Value;

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

fn documented(file: &str) -> BTreeSet<(String, String)> {
    let path = format!("{}/api/openapi/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{file} is OpenAPI 3"
    );
    let mut out = BTreeSet::new();
    for (p, item) in doc["paths"].as_mapping().expect("paths") {
        for m in METHODS {
            if item.get(*m).is_some() {
                out.insert((m.to_string(), p.as_str().unwrap().to_string()));
            }
        }
    }
    out
}

fn routes(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

/// A service's routes with the `/health`, `/readyz`, `/livez` and `/metrics` every service
/// serves.
fn in_code(service_routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    let mut all = routes(service_routes);
    all.extend(routes(&[
        ("get", "/health"),
        ("get", "/readyz"),
        ("get", "/livez"),
        ("get", "/metrics"),
    ]));
    all
}

#[test]
fn documents_list_exactly_the_routes_in_code() {
    assert_eq!(documented("ingestion.yaml"), in_code(ingestion::ROUTES));
    assert_eq!(documented("query.yaml"), in_code(&query::routes()));
    assert_eq!(documented("actions.yaml"), in_code(actions::ROUTES));
    // Served beside each consumer's /health and /metrics, which its service's file documents.
    assert_eq!(documented("dlq.yaml"), routes(dlq::api::ROUTES));
}

async fn send(app: &TestApp, method: &str, url: &str) -> (u16, Value) {
    let body = serde_json::json!({});
    let req = match method {
        "post" => app.http.post(url).json(&body),
        "put" => app.http.put(url).json(&body),
        "patch" => app.http.patch(url).json(&body),
        "delete" => app.http.delete(url),
        _ => app.http.get(url),
    };
    let r = req.timeout(Duration::from_secs(10)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Every documented route is really served: a request never falls through to the router's
/// "no such route" answer.
#[tokio::test]
async fn every_documented_route_is_served() {
    let app = TestApp::spawn(&[
        Service::Ingestion,
        Service::Query,
        Service::Actions,
        Service::Eventhandler,
        Service::Tsdb,
    ])
    .await;
    for (file, svc) in [
        ("ingestion.yaml", Service::Ingestion),
        ("query.yaml", Service::Query),
        ("actions.yaml", Service::Actions),
    ] {
        for (method, path) in documented(file) {
            let concrete = path
                .replace("{type}", "sensor_state")
                .replace("{aggregate_id}", "x")
                .replace("{device_id}", "x")
                .replace("{rule_id}", &uuid::Uuid::now_v7().to_string())
                .replace("{delivery_id}", &uuid::Uuid::now_v7().to_string());
            // The action orchestrator's health and metrics are on its separate port (8083).
            let url = if svc == Service::Actions && !path.starts_with("/api/") {
                app.health_url(svc, &concrete)
            } else {
                app.url(svc, &concrete)
            };
            let (status, body) = send(&app, &method, &url).await;
            assert!(
                !(status == 404 && body["error"] == "no such route"),
                "{method} {path} is documented but not served"
            );
        }
    }
    // The DLQ API on the consumers' health ports: the event handler's, the tsdb-writer's (on
    // 8084 the event handler's server answers for both; here every port is 0, so it has its own)
    // and the action orchestrator's. "no consumer" would mean the port does not serve it.
    let tsdb = match app.addrs.get(&Service::Tsdb) {
        Some(_) => app.url(Service::Tsdb, ""),
        None => app.url(Service::Eventhandler, ""),
    };
    for (consumer, url) in [
        ("eventhandler", app.url(Service::Eventhandler, "")),
        ("tsdb", tsdb),
        ("actions", app.health_url(Service::Actions, "")),
    ] {
        for (method, path) in documented("dlq.yaml") {
            let concrete = path
                .replace("{consumer}", consumer)
                .replace("{dlq_id}", &uuid::Uuid::now_v7().to_string());
            let (status, body) = send(&app, &method, &format!("{url}{concrete}")).await;
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                !(status == 404 && (error == "no such route" || error.starts_with("no consumer"))),
                "{method} {concrete} is documented but not served on {url}: {status} {body}"
            );
        }
    }
    // And the fallback really is what an undocumented route gets.
    let r = app
        .http
        .get(app.url(Service::Query, "/api/v1/query/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no such route");
}
