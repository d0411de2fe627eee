//! End-to-end runner against an already running stack (`make e2e-skeleton` against `make run`,
//! `make e2e-fullstack` through Traefik). Ignored in `make test`, which starts its own services;
//! the make targets run it with `--ignored` and base URLs from the environment:
//! `CJ_E2E_INGEST_URL`, `CJ_E2E_QUERY_URL`, `CJ_E2E_TOKEN` (omit when auth is off).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn base(var: &str, default: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .trim_end_matches('/')
        .to_string()
}

struct Stack {
    ingest: String,
    query: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Stack {
    fn from_env() -> Self {
        Self {
            ingest: base("CJ_E2E_INGEST_URL", "http://127.0.0.1:8080"),
            query: base("CJ_E2E_QUERY_URL", "http://127.0.0.1:8081"),
            token: std::env::var("CJ_E2E_TOKEN").ok().filter(|t| !t.is_empty()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
}

#[tokio::test]
#[ignore = "needs a running stack: make e2e-skeleton / make e2e-fullstack"]
async fn an_ingested_reading_becomes_queryable() {
    let s = Stack::from_env();
    let device = format!("e2e-{}", uuid::Uuid::now_v7().simple());
    let r = s
        .auth(s.http.post(format!("{}/api/v1/ingest", s.ingest)))
        .json(
            &json!({"event_type": "sensor.reading", "aggregate_id": device,
                      "payload": {"value": 21.5, "unit": "celsius"}}),
        )
        .send()
        .await
        .expect("ingestion reachable");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let event_id = r.json::<Value>().await.unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();

    let url = format!("{}/api/v1/query/projections/sensor_state/{device}", s.query);
    let deadline = Instant::now() + Duration::from_secs(30);
    let projection = loop {
        let r = s
            .auth(s.http.get(&url))
            .send()
            .await
            .expect("query reachable");
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "projection did not appear within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(projection["state"]["value"], 21.5);
    assert_eq!(projection["last_event_id"], event_id);

    let log = s
        .auth(s.http.get(format!(
            "{}/api/v1/query/events?aggregate_id={device}",
            s.query
        )))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(log["events"][0]["event_id"], event_id);
}

#[tokio::test]
#[ignore = "needs a running stack: make e2e-skeleton / make e2e-fullstack"]
async fn bad_input_and_missing_credentials_get_clear_errors() {
    let s = Stack::from_env();
    let r = s
        .auth(s.http.post(format!("{}/api/v1/ingest", s.ingest)))
        .json(&json!({"event_type": "Not Valid", "aggregate_id": "x", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["details"][0]["field"], "event_type");
    if s.token.is_some() {
        let r = s
            .http
            .post(format!("{}/api/v1/ingest", s.ingest))
            .json(&json!({"event_type": "a.b", "aggregate_id": "x", "payload": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "no token, no entry");
    }
}
