//! The OpenAPI documents in api/openapi/ agree with the routes the code serves (SPEC §8).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use cornjacket::infra::dlq;
use cornjacket::infra::http::{CODES, code_of};
use cornjacket::services::{Service, actions, ingestion, query};
use serde_json::Value;

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

const DOCUMENTS: &[&str] = &["ingestion.yaml", "query.yaml", "actions.yaml", "dlq.yaml"];

fn load(file: &str) -> serde_yaml::Value {
    let path = format!("{}/api/openapi/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{file} is OpenAPI 3"
    );
    doc
}

fn documented(file: &str) -> BTreeSet<(String, String)> {
    let doc = load(file);
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

/// Follows local `$ref`s (`#/components/...`) to the node they name.
fn resolve<'a>(
    doc: &'a serde_yaml::Value,
    mut node: &'a serde_yaml::Value,
) -> &'a serde_yaml::Value {
    while let Some(r) = node.get("$ref").and_then(|r| r.as_str()) {
        let pointer = r
            .strip_prefix("#/")
            .unwrap_or_else(|| panic!("{r}: only local references"));
        node = pointer.split('/').fold(doc, |n, part| &n[part]);
        assert!(!node.is_null(), "{r} names nothing");
    }
    node
}

/// Every example of a response of every operation: (where, status, body), `$ref`s to
/// components/responses and components/examples resolved.
fn response_examples(doc: &serde_yaml::Value) -> Vec<(String, u16, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths") {
        for m in METHODS {
            let Some(responses) = item.get(*m).and_then(|op| op.get("responses")) else {
                continue;
            };
            for (status, response) in responses.as_mapping().expect("responses") {
                // `2XX`, `default`: ranges, not one status.
                let Some(status) = status.as_str().and_then(|s| s.parse::<u16>().ok()) else {
                    continue;
                };
                let response = resolve(doc, response);
                let Some(content) = response.get("content").and_then(|c| c.as_mapping()) else {
                    continue;
                };
                for (media_type, media) in content {
                    let at = |name: &str| {
                        format!(
                            "{m} {} {status} {} {name}",
                            path.as_str().unwrap(),
                            media_type.as_str().unwrap()
                        )
                    };
                    if let Some(e) = media.get("example") {
                        out.push((at("example"), status, serde_json::to_value(e).unwrap()));
                    }
                    for (name, e) in media
                        .get("examples")
                        .and_then(|e| e.as_mapping())
                        .into_iter()
                        .flatten()
                    {
                        let value = &resolve(doc, e)["value"];
                        out.push((
                            at(name.as_str().unwrap()),
                            status,
                            serde_json::to_value(value).unwrap(),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The documents' `ErrorCode` is the code's list, and every error example carries the code the
/// code would answer it with (SPEC §8): clients branch on `code`, so the documents must not lie
/// about it.
#[test]
fn documented_error_codes_are_the_codes_in_code() {
    let codes: Vec<String> = CODES.iter().map(|c| c.to_string()).collect();
    for file in DOCUMENTS {
        let doc = load(file);
        let schemas = &doc["components"]["schemas"];
        let listed: Vec<String> = serde_yaml::from_value(schemas["ErrorCode"]["enum"].clone())
            .unwrap_or_else(|e| panic!("{file}: ErrorCode enum: {e}"));
        assert_eq!(
            listed, codes,
            "{file}: ErrorCode is exactly infra::http::CODES"
        );
        let required: Vec<String> =
            serde_yaml::from_value(schemas["Error"]["required"].clone()).unwrap_or_default();
        assert!(
            required.iter().any(|r| r == "code"),
            "{file}: Error requires code"
        );
        assert_eq!(
            schemas["Error"]["properties"]["code"]["$ref"].as_str(),
            Some("#/components/schemas/ErrorCode"),
            "{file}: Error.code is an ErrorCode"
        );

        let mut errors = 0;
        for (at, status, body) in response_examples(&doc) {
            // A batch's rejected items, whatever the batch's status.
            for item in body["results"].as_array().into_iter().flatten() {
                if item["status"] != "rejected" {
                    continue;
                }
                let code = item["code"].as_str().unwrap_or_else(|| {
                    panic!("{file}: {at}: a rejected item without code: {item}")
                });
                let fields = item["details"].as_array().is_some_and(|d| !d.is_empty());
                let expected: &[&str] = if fields {
                    &["validation_failed"]
                } else {
                    &["idempotency_conflict", "unavailable"]
                };
                assert!(
                    expected.contains(&code),
                    "{file}: {at}: item code {code} for {item}"
                );
            }
            if status < 400 {
                continue;
            }
            // A failing health check answers 503 with the health report, not an error body.
            if body.get("checks").is_some() {
                continue;
            }
            errors += 1;
            let code = body["code"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: {at}: an error example without code: {body}"));
            assert!(
                CODES.contains(&code),
                "{file}: {at}: {code} is not in CODES"
            );
            let http_status = axum::http::StatusCode::from_u16(status).unwrap();
            let expected = code_of(http_status, &body["details"]);
            // The ingestion's idempotency conflicts have a code of their own, and a batch
            // of which no event is valid has empty details of its own but failed validation.
            let allowed = code == expected
                || (*file == "ingestion.yaml" && status == 409 && code == "idempotency_conflict")
                || (status == 400 && code == "validation_failed" && body.get("results").is_some());
            assert!(
                allowed,
                "{file}: {at}: code {code}, but the status and details give {expected}: {body}"
            );
        }
        assert!(errors > 10, "{file}: only {errors} error examples found");
    }
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
