//! Bad input is a 4xx with the JSON error body on every route of the ingestion, query and action APIs and
//! their health ports, never a 5xx: property tests put arbitrary text (NUL, percent-encodings
//! that are not UTF-8, huge numbers, long and odd Unicode) in every path segment, query
//! parameter and body field, against real PostgreSQL and the real broker.

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// Cases per route: enough to meet every kind of text in every field, quick enough to run often.
const CASES: u32 = 64;

/// The seed when `PROPTEST_RNG_SEED` sets none, so a run is repeatable (`PROPTEST_RNG_SEED`
/// and `PROPTEST_CASES` explore further).
const SEED: u64 = 0x00c0_ffee;

// ---- What is sent ----

/// One request as it goes on the wire.
#[derive(Debug, Clone)]
struct Probe {
    method: &'static str,
    /// Path and query, already encoded.
    target: String,
    /// Content type (none: no header) and bytes.
    body: Option<(Option<String>, Vec<u8>)>,
}

fn get(target: String) -> Probe {
    Probe {
        method: "GET",
        target,
        body: None,
    }
}

/// How a text goes into a URL: `Exact` percent-encodes every byte, so the server decodes the
/// very text; `Raw` puts it as it is, so `%FF` and `%00` arrive as escapes of their own and
/// `&`, `=`, `/`, `#` or `?` cut it where they fall.
#[derive(Debug, Clone, Copy)]
enum Wire {
    Exact,
    Raw,
}

fn wire() -> impl Strategy<Value = Wire> {
    prop_oneof![Just(Wire::Exact), Just(Wire::Raw)]
}

fn put(text: &str, wire: Wire) -> String {
    match wire {
        Wire::Raw => text.to_string(),
        Wire::Exact => text
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect(),
    }
}

type Text = BoxedStrategy<String>;

/// Text meant to break something: the pieces are what tripped a parser or PostgreSQL before,
/// plus arbitrary characters (control characters and NUL included).
fn nasty() -> Text {
    let pieces: &[&str] = &[
        "\0",
        "%00",
        "%FF",
        "%C3%28",
        "%",
        "%zz",
        "%2F",
        "+",
        "&",
        "=",
        "#",
        "?",
        "/",
        "..",
        "\\",
        "'",
        "\"",
        " ",
        "\n",
        "é",
        "🦀",
        "\u{202e}",
        "\u{fffd}",
        "\u{10ffff}",
        "-1",
        "0",
        "99999999999999999999999",
        "9223372036854775807",
        "1e400",
        "NaN",
        "2026-01-01T00:00:00Z",
        "0000-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59.999999999-23:59",
        "1970-01-01T00:00:60Z",
        "00000000-0000-0000-0000-000000000000",
        "sensor_state",
        "system.*",
    ];
    let piece = prop_oneof![
        4 => prop::sample::select(pieces).prop_map(String::from),
        2 => any::<char>().prop_map(String::from),
        2 => "\\PC{0,12}",
        1 => Just("x".repeat(1500)),
    ];
    prop::collection::vec(piece, 0..4)
        .prop_map(|v| v.concat())
        .boxed()
}

fn one_of(xs: &'static [&'static str]) -> Text {
    prop::sample::select(xs).prop_map(String::from).boxed()
}

fn uuid() -> Text {
    any::<u128>()
        .prop_map(|n| uuid::Uuid::from_u128(n).to_string())
        .boxed()
}

fn time() -> Text {
    one_of(&[
        "2026-01-01T00:00:00Z",
        "2025-12-31T23:00:00+01:00",
        "1970-01-01T00:00:00.5Z",
    ])
}

fn number(max: u64) -> Text {
    (0..=max).prop_map(|n| n.to_string()).boxed()
}

/// A query string: each named parameter absent, plausible or nasty (so a nasty one often comes
/// with valid others and reaches the database), and sometimes an unknown one.
fn query(params: Vec<(&'static str, Text)>) -> Text {
    let each: Vec<BoxedStrategy<Option<String>>> = params
        .into_iter()
        .map(|(name, plausible)| {
            prop::option::of((prop_oneof![plausible, nasty()], wire()))
                .prop_map(move |v| v.map(|(v, w)| format!("{name}={}", put(&v, w))))
                .boxed()
        })
        .collect();
    let unknown = prop::option::weighted(0.15, (nasty(), wire(), nasty(), wire()))
        .prop_map(|o| o.map(|(k, kw, v, vw)| format!("{}={}", put(&k, kw), put(&v, vw))));
    (each, unknown)
        .prop_map(|(each, unknown)| {
            let parts: Vec<String> = each.into_iter().flatten().chain(unknown).collect();
            if parts.is_empty() {
                String::new()
            } else {
                format!("?{}", parts.join("&"))
            }
        })
        .boxed()
}

/// A path segment: plausible or nasty, exact or raw.
fn segment(plausible: Text) -> Text {
    (prop_oneof![plausible, nasty()], wire())
        .prop_map(|(s, w)| put(&s, w))
        .boxed()
}

fn any_method() -> BoxedStrategy<&'static str> {
    prop::sample::select(&["GET", "POST", "PUT", "PATCH", "DELETE"][..]).boxed()
}

// ---- What comes back ----

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Sends a probe; `None` when it cannot be sent at all (a URL or header the client refuses).
async fn send(app: &TestApp, addr: std::net::SocketAddr, p: &Probe) -> Option<Answer> {
    let url = reqwest::Url::parse(&format!("http://{addr}{}", p.target)).ok()?;
    let method = reqwest::Method::from_bytes(p.method.as_bytes()).expect("method");
    let mut req = app.http.request(method, url);
    if let Some((ct, body)) = &p.body {
        if let Some(ct) = ct {
            req = req.header("content-type", ct.as_str());
        }
        req = req.body(body.clone());
    }
    let req = req.build().ok()?;
    let r = app.http.execute(req).await.expect("the service answers");
    Some(Answer {
        status: r.status().as_u16(),
        content_type: r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: r.bytes().await.expect("body").to_vec(),
    })
}

/// Never a 5xx; a 4xx is `{"error": <text>, "code": <a documented code>, "details": [...]}`,
/// the code the one of its status (or a more specific one of the same family); a 2xx with a body is JSON
/// (except the Prometheus text of `/metrics`).
fn judge(p: &Probe, a: &Answer) -> Result<(), TestCaseError> {
    let shown = String::from_utf8_lossy(&a.body);
    let what = format!("{} {} answered {}: {shown}", p.method, p.target, a.status);
    // A health report's 503 is about a dependency, not about the request.
    let health_report = p.target.starts_with("/health") && a.status == 503;
    prop_assert!(a.status < 500 || health_report, "{what}");
    let is_json = a.content_type.starts_with("application/json");
    if a.status >= 400 && !health_report {
        prop_assert!(is_json, "content-type '{}': {what}", a.content_type);
        let v: Value = serde_json::from_slice(&a.body)
            .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {what}")))?;
        prop_assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()) && v["details"].is_array(),
            "not the error body: {what}"
        );
        let code = v["code"].as_str().unwrap_or_default();
        prop_assert!(
            cornjacket::infra::http::CODES.contains(&code),
            "code '{code}' is not a documented one: {what}"
        );
        let by_status = cornjacket::infra::http::code_of(
            axum::http::StatusCode::from_u16(a.status).unwrap(),
            &v["details"],
        );
        prop_assert!(
            code == by_status
                || (a.status == 409 && code == "idempotency_conflict")
                // A batch none of whose events is valid: the fields are per event.
                || (a.status == 400 && code == "validation_failed"),
            "code '{code}' for a {}: {what}",
            a.status
        );
    } else if !a.body.is_empty() && !p.target.starts_with("/metrics") {
        prop_assert!(is_json, "content-type '{}': {what}", a.content_type);
        prop_assert!(
            serde_json::from_slice::<Value>(&a.body).is_ok(),
            "not JSON: {what}"
        );
    }
    Ok(())
}

/// Runs `CASES` probes of one route against a service port.
fn drive(
    rt: &Runtime,
    app: &TestApp,
    addr: std::net::SocketAddr,
    route: &str,
    probes: impl Strategy<Value = Probe>,
) {
    let defaults = Config::default();
    let seed = match defaults.rng_seed {
        RngSeed::Fixed(s) => s,
        RngSeed::Random => SEED,
    };
    let mut runner = TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES").map_or(CASES, |_| defaults.cases),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..defaults
    });
    // What the cases met, printed so a run shows the routes were really exercised.
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<String, u32>::new());
    let result = runner.run(&probes, |p| {
        let a = rt.block_on(send(app, addr, &p));
        let key = a
            .as_ref()
            .map_or("unsendable".into(), |a| a.status.to_string());
        *seen.lock().unwrap().entry(key).or_default() += 1;
        a.map_or(Ok(()), |a| judge(&p, &a))
    });
    if let Err(e) = result {
        panic!("{route}: {e}");
    }
    eprintln!("{route}: {:?}", seen.into_inner().unwrap());
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---- The query service ----

/// The query service with every read model it reads migrated: the event store, projections,
/// readings, and the AI sidecar's tables (created from its migration, as the sidecar would).
async fn query_app() -> TestApp {
    let app = TestApp::spawn(&[
        Service::Ingestion,
        Service::Eventhandler,
        Service::Tsdb,
        Service::Query,
    ])
    .await;
    let pool = app.pool().await;
    let dir = format!("{}/ai-inference/migrations", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        name[1..name.find("__").unwrap()].parse::<u32>().unwrap()
    });
    let ai: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS ai; {ai}"))
        .execute(&pool)
        .await
        .expect("ai tables");
    for path in [
        "/api/v1/query/events",
        "/api/v1/query/projections/sensor_state",
        "/api/v1/query/timeseries/x",
        "/api/v1/query/anomalies",
        "/api/v1/query/dlq",
    ] {
        let url = app.url(Service::Query, path);
        eventually(Duration::from_secs(60), || async {
            let r = app.http.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }
    app
}

async fn expect(app: &TestApp, svc: Service, p: Probe, status: u16, says: &str) -> Value {
    let a = send(app, app.addrs[&svc], &p).await.expect("sendable");
    judge(&p, &a).unwrap_or_else(|e| panic!("{e}"));
    let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    assert_eq!(a.status, status, "{} {}: {v}", p.method, p.target);
    if !says.is_empty() {
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(says)),
            "{} {}: {v} does not say '{says}'",
            p.method,
            p.target
        );
    }
    v
}

#[tokio::test]
async fn the_reported_query_cases_are_4xx_json() {
    let app = query_app().await;
    let q = |t: &str| get(t.to_string());
    let nul = "NUL character";
    for (probe, status, says) in [
        (q("/api/v1/query/events?event_type=%00x"), 400, nul),
        (q("/api/v1/query/dlq?consumer=x%00"), 400, nul),
        (q("/api/v1/query/events?after=garbage"), 400, "event_id"),
        (
            q("/api/v1/query/projections/sensor_state?after=%00garbage"),
            400,
            nul,
        ),
        (
            q("/api/v1/query/projections/sensor_state?after="),
            400,
            "next_cursor",
        ),
        (
            q(&format!(
                "/api/v1/query/projections/sensor_state?after={}",
                "x".repeat(257)
            )),
            400,
            "next_cursor",
        ),
        (
            q("/api/v1/projections/sensor_state?after=a%07b"),
            400,
            "next_cursor",
        ),
        // Text that is a possible aggregate_id is a cursor: the page after it.
        (
            q("/api/v1/query/projections/sensor_state?after=garbage"),
            200,
            "",
        ),
        (q("/api/v1/query/projections/sensor_state/%00"), 400, nul),
        (
            q("/api/v1/query/projections/sensor_state/%FF"),
            400,
            "UTF-8",
        ),
        (q("/api/v1/query/timeseries/dev%00"), 400, nul),
        (q("/api/v1/query/anomalies?device_id=%00"), 400, nul),
        (q("/api/v1/query/events?aggregate_id=%FF"), 400, "UTF-8"),
        (q("/api/v1/query/events?%FF=1"), 400, "UTF-8"),
        (
            Probe {
                method: "POST",
                ..q("/api/v1/query/events")
            },
            405,
            "method",
        ),
    ] {
        expect(&app, Service::Query, probe, status, says).await;
    }
}

#[test]
fn query_routes_answer_bad_input_with_4xx_json() {
    let rt = runtime();
    let app = rt.block_on(query_app());
    let addr = app.addrs[&Service::Query];
    let ptype = || segment(one_of(&["sensor_state", "user_session"]));
    let prefix = || one_of(&["/api/v1/query/projections", "/api/v1/projections"]);

    drive(
        &rt,
        &app,
        addr,
        "GET projections/{type}/{aggregate_id}",
        (prefix(), ptype(), segment(one_of(&["dev-1", "u-1"])))
            .prop_map(|(pre, t, a)| get(format!("{pre}/{t}/{a}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET projections/{type}",
        (
            prefix(),
            ptype(),
            query(vec![
                ("limit", number(120)),
                ("offset", number(10)),
                ("after", one_of(&["dev-1", "a"])),
            ]),
        )
            .prop_map(|(pre, t, q)| get(format!("{pre}/{t}{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET events",
        query(vec![
            ("aggregate_id", one_of(&["dev-1"])),
            ("event_type", one_of(&["sensor.reading", "user.login"])),
            ("from", time()),
            ("to", time()),
            ("limit", number(1200)),
            ("after", uuid()),
        ])
        .prop_map(|q| get(format!("/api/v1/query/events{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET dlq",
        query(vec![
            (
                "consumer",
                one_of(&["event-handler", "tsdb-writer", "ai-inference"]),
            ),
            ("status", one_of(&["pending", "replayed", "discarded"])),
            ("limit", number(600)),
            ("offset", number(10)),
        ])
        .prop_map(|q| get(format!("/api/v1/query/dlq{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET timeseries/{device_id}",
        (
            segment(one_of(&["dev-1"])),
            query(vec![
                ("from", time()),
                ("to", time()),
                ("bucket", one_of(&["1s", "1m", "1h", "1d", "90s"])),
                ("agg", one_of(&["avg", "min", "max", "count", "last"])),
            ]),
        )
            .prop_map(|(d, q)| get(format!("/api/v1/query/timeseries/{d}{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET anomalies",
        query(vec![
            ("device_id", one_of(&["dev-1"])),
            ("since", time()),
            ("limit", number(1200)),
            ("include_normal", one_of(&["true", "false"])),
        ])
        .prop_map(|q| get(format!("/api/v1/query/anomalies{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "any method on any route",
        (
            any_method(),
            prop::sample::select(
                &[
                    "/api/v1/query/events",
                    "/api/v1/query/dlq",
                    "/api/v1/query/anomalies",
                    "/api/v1/query/timeseries/x",
                    "/api/v1/query/projections/sensor_state",
                    "/api/v1/query/projections/sensor_state/x",
                    "/health",
                    "/metrics",
                ][..],
            ),
            query(vec![]),
        )
            .prop_map(|(method, path, q)| Probe {
                method,
                ..get(format!("{path}{q}"))
            }),
    );
    // The event handler's port, which also reports the tsdb-writer of this process.
    drive(
        &rt,
        &app,
        app.addrs[&Service::Eventhandler],
        "event handler health port",
        (
            any_method(),
            prop::sample::select(&["/health", "/metrics"][..]),
            query(vec![]),
        )
            .prop_map(|(method, path, q)| Probe {
                method,
                ..get(format!("{path}{q}"))
            }),
    );
}

// ---- The action API ----

async fn actions_app() -> (TestApp, String) {
    let app = TestApp::spawn(&[Service::Actions]).await;
    let url = app.health_url(Service::Actions, "/health");
    eventually(Duration::from_secs(30), || async {
        let v: Value = app.http.get(&url).send().await.ok()?.json().await.ok()?;
        (v["checks"]["database"]["status"] == "healthy"
            && v["checks"]["consumer"]["group"].is_string())
        .then_some(())
    })
    .await;
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .json(&base_rule())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let id = v["rule_id"].as_str().unwrap().to_string();
    (app, id)
}

fn base_rule() -> Value {
    json!({"name": "probe", "event_type": "system.*", "enabled": true, "dedup_window_s": 0,
           "condition": {"path": "payload.x", "op": "==", "value": 1},
           "webhook": {"url": "http://127.0.0.1:9/hook", "headers": {"x-probe": "1"},
                       "timeout_s": 5}})
}

fn json_body(v: &Value) -> Option<(Option<String>, Vec<u8>)> {
    Some((
        Some("application/json".into()),
        serde_json::to_vec(v).unwrap(),
    ))
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => prop::num::f64::NORMAL.prop_map(Value::from),
        3 => nasty().prop_map(Value::String),
    ]
    .boxed()
}

fn json_any() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((nasty(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// Mostly text, sometimes any JSON.
fn field_value() -> BoxedStrategy<Value> {
    prop_oneof![3 => nasty().prop_map(Value::String), 1 => json_any()].boxed()
}

/// A place in a rule document and what to put there.
fn edit() -> BoxedStrategy<(Vec<String>, Value)> {
    let at = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    prop_oneof![
        field_value().prop_map(move |v| (at(&["name"]), v)),
        field_value().prop_map(move |v| (at(&["event_type"]), v)),
        field_value().prop_map(move |v| (at(&["enabled"]), v)),
        field_value().prop_map(move |v| (at(&["dedup_window_s"]), v)),
        json_any().prop_map(move |v| (at(&["condition"]), v)),
        field_value().prop_map(move |v| (at(&["condition", "path"]), v)),
        field_value().prop_map(move |v| (at(&["condition", "op"]), v)),
        field_value().prop_map(move |v| (at(&["condition", "value"]), v)),
        json_any().prop_map(move |v| (at(&["webhook"]), v)),
        prop_oneof![
            nasty().prop_map(|s| json!(format!("http://127.0.0.1:9/{s}"))),
            nasty().prop_map(|s| json!(format!("https://{s}/hook"))),
            field_value(),
        ]
        .prop_map(move |v| (at(&["webhook", "url"]), v)),
        field_value().prop_map(move |v| (at(&["webhook", "secret"]), v)),
        field_value().prop_map(move |v| (at(&["webhook", "timeout_s"]), v)),
        (nasty(), field_value())
            .prop_map(|(k, v)| (vec!["webhook".into(), "headers".into(), k], v)),
        (nasty(), json_any()).prop_map(|(k, v)| (vec![k], v)),
    ]
    .boxed()
}

/// Sets `path` in `doc`, making objects of whatever is in the way.
fn set(doc: &mut Value, path: &[String], v: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = doc;
    for k in parents {
        if !at.is_object() {
            *at = json!({});
        }
        at = at
            .as_object_mut()
            .unwrap()
            .entry(k.clone())
            .or_insert(json!({}));
    }
    if !at.is_object() {
        *at = json!({});
    }
    at.as_object_mut().unwrap().insert(last.clone(), v);
}

fn edited(start: Value) -> BoxedStrategy<Option<(Option<String>, Vec<u8>)>> {
    prop::collection::vec(edit(), 1..3)
        .prop_map(move |edits| {
            let mut doc = start.clone();
            for (path, v) in edits {
                set(&mut doc, &path, v);
            }
            json_body(&doc)
        })
        .boxed()
}

/// A rule document with a field or two changed, or a body that is no rule at all.
fn rule_body() -> BoxedStrategy<Option<(Option<String>, Vec<u8>)>> {
    let raw: &[&[u8]] = &[
        br#"{"name": "\ud800", "event_type": "*", "webhook": {"url": "http://h/"}}"#,
        br#"{"name": "a\u0000", "event_type": "*", "webhook": {"url": "http://h/"}}"#,
        br#"{"name": "n", "event_type": "*", "webhook": {"url": "http://h/"}, "dedup_window_s": 1e400}"#,
        b"{\"name\": \"\xff\"}",
        b"",
        b"null",
    ];
    prop_oneof![
        8 => edited(base_rule()),
        1 => json_any().prop_map(|v| json_body(&v)),
        1 => prop::sample::select(raw).prop_map(|b| Some((Some("application/json".into()), b.to_vec()))),
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| Some((Some("application/json".into()), b))),
        1 => prop::option::of(prop_oneof![
                one_of(&["text/plain", "application/json; charset=utf-8",
                         "application/problem+json", "application/jsonx", ""]),
                nasty(),
            ])
            .prop_map(|ct| Some((ct, serde_json::to_vec(&base_rule()).unwrap()))),
        1 => Just(None),
    ]
    .boxed()
}

/// A rule or delivery id: an existing one, any UUID, or text.
fn id(existing: &str) -> Text {
    let existing = existing.to_string();
    segment(prop_oneof![Just(existing), uuid()].boxed())
}

#[tokio::test]
async fn the_reported_action_cases_are_4xx_json() {
    let (app, rule_id) = actions_app().await;
    let post = |body: Value| Probe {
        method: "POST",
        target: "/api/v1/actions/rules".into(),
        body: json_body(&body),
    };
    let mut nul_name = base_rule();
    nul_name["name"] = json!("a\u{0}b");
    let mut nul_condition = base_rule();
    nul_condition["condition"]["value"] = json!("\u{0}");
    let mut nul_header = base_rule();
    nul_header["webhook"]["headers"] = json!({"x-ok": "1", "x-key\u{0}": "v"});
    // 1401 bytes as written, over 4000 once percent-encoded as it is stored.
    let mut long_url = base_rule();
    long_url["webhook"]["url"] = json!(format!("http://127.0.0.1:9/{}", "é".repeat(700)));
    for (body, field) in [
        (nul_name, "name"),
        (nul_condition, "condition.value"),
        (nul_header, "webhook.headers.x-key\u{0}"),
        (long_url, "webhook.url"),
    ] {
        let v = expect(&app, Service::Actions, post(body), 400, "invalid").await;
        assert_eq!(v["details"][0]["field"], field, "{v}");
    }
    let patch = Probe {
        method: "PATCH",
        target: format!("/api/v1/actions/rules/{rule_id}"),
        body: json_body(&json!({"webhook": {"headers": {"x-probe": "\u{0}"}}})),
    };
    let v = expect(&app, Service::Actions, patch, 400, "invalid").await;
    assert_eq!(v["details"][0]["field"], "webhook.headers.x-probe", "{v}");
    let a = |t: &str| get(t.to_string());
    let mut huge = base_rule();
    huge["name"] = json!("x".repeat(100_000));
    for (probe, status, says) in [
        (post(huge), 413, "larger"),
        (a("/api/v1/actions/rules/%FF"), 400, "UTF-8"),
        (a("/api/v1/actions/rules/%00"), 400, "NUL character"),
        (a("/api/v1/actions/rules?limit=%FF"), 400, "UTF-8"),
        (
            a("/api/v1/actions/deliveries?status=%00"),
            400,
            "NUL character",
        ),
        (
            Probe {
                method: "POST",
                ..a("/api/v1/actions/deliveries/%C3%28/retry")
            },
            400,
            "UTF-8",
        ),
        (
            Probe {
                method: "DELETE",
                ..a("/api/v1/actions/endpoints")
            },
            405,
            "method",
        ),
    ] {
        expect(&app, Service::Actions, probe, status, says).await;
    }
    // The rule the patch was refused for is as it was.
    let r: Value = app
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
    assert_eq!(r["name"], "probe", "{r}");
}

#[test]
fn action_routes_answer_bad_input_with_4xx_json() {
    let rt = runtime();
    let (app, rule_id) = rt.block_on(actions_app());
    let addr = app.addrs[&Service::Actions];
    let rules = "/api/v1/actions/rules";

    drive(
        &rt,
        &app,
        addr,
        "POST rules",
        rule_body().prop_map(move |body| Probe {
            method: "POST",
            target: rules.into(),
            body,
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET rules",
        query(vec![("limit", number(600)), ("offset", number(10))])
            .prop_map(move |q| get(format!("{rules}{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET rules/{rule_id}",
        id(&rule_id).prop_map(move |id| get(format!("{rules}/{id}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "PUT rules/{rule_id}",
        (id(&rule_id), rule_body()).prop_map(move |(id, body)| Probe {
            method: "PUT",
            target: format!("{rules}/{id}"),
            body,
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "PATCH rules/{rule_id}",
        (
            id(&rule_id),
            prop_oneof![3 => edited(json!({})), 1 => rule_body()],
        )
            .prop_map(move |(id, body)| Probe {
                method: "PATCH",
                target: format!("{rules}/{id}"),
                body,
            }),
    );
    // Not the existing rule: the other routes keep finding it.
    drive(
        &rt,
        &app,
        addr,
        "DELETE rules/{rule_id}",
        segment(uuid()).prop_map(move |id| Probe {
            method: "DELETE",
            ..get(format!("{rules}/{id}"))
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET deliveries",
        query(vec![
            ("rule_id", Just(rule_id.clone()).boxed()),
            (
                "status",
                one_of(&["pending", "delivered", "failed", "circuit_open"]),
            ),
            ("event_id", uuid()),
            ("limit", number(600)),
        ])
        .prop_map(|q| get(format!("/api/v1/actions/deliveries{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET deliveries/{delivery_id}",
        segment(uuid()).prop_map(|id| get(format!("/api/v1/actions/deliveries/{id}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "POST deliveries/{delivery_id}/retry",
        segment(uuid()).prop_map(|id| Probe {
            method: "POST",
            ..get(format!("/api/v1/actions/deliveries/{id}/retry"))
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "any method on any route",
        (
            any_method(),
            prop::sample::select(
                &[
                    "/api/v1/actions/endpoints",
                    "/api/v1/actions/deliveries",
                    "/api/v1/actions/rules",
                ][..],
            ),
            query(vec![]),
        )
            .prop_map(|(method, path, q)| Probe {
                method,
                ..get(format!("{path}{q}"))
            }),
    );
    drive(
        &rt,
        &app,
        app.health_addrs[&Service::Actions],
        "health port",
        (
            any_method(),
            prop::sample::select(&["/health", "/metrics"][..]),
            query(vec![]),
        )
            .prop_map(|(method, path, q)| Probe {
                method,
                ..get(format!("{path}{q}"))
            }),
    );
}

// ---- The ingestion service ----

fn base_event() -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": "probe-1",
           "payload": {"value": 1.5, "unit": "c"}})
}

/// A place in an event document and what to put there.
fn event_edit() -> BoxedStrategy<(Vec<String>, Value)> {
    let at = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    prop_oneof![
        field_value().prop_map(move |v| (at(&["event_type"]), v)),
        field_value().prop_map(move |v| (at(&["aggregate_id"]), v)),
        json_any().prop_map(move |v| (at(&["payload"]), v)),
        field_value().prop_map(move |v| (at(&["payload", "value"]), v)),
        field_value().prop_map(move |v| (at(&["payload", "unit"]), v)),
        prop_oneof![time().prop_map(Value::String), field_value()]
            .prop_map(move |v| (at(&["event_time"]), v)),
        prop_oneof![uuid().prop_map(Value::String), field_value()]
            .prop_map(move |v| (at(&["event_id"]), v)),
        field_value().prop_map(move |v| (at(&["trace_id"]), v)),
        (nasty(), json_any()).prop_map(|(k, v)| (vec!["payload".into(), k], v)),
        (nasty(), json_any()).prop_map(|(k, v)| (vec![k], v)),
    ]
    .boxed()
}

fn event_doc() -> BoxedStrategy<Value> {
    prop::collection::vec(event_edit(), 1..3)
        .prop_map(|edits| {
            let mut doc = base_event();
            for (path, v) in edits {
                set(&mut doc, &path, v);
            }
            doc
        })
        .boxed()
}

/// An event with a field or two changed, or a body that is no event at all.
fn event_body() -> BoxedStrategy<Option<(Option<String>, Vec<u8>)>> {
    let raw: &[&[u8]] = &[
        br#"{"event_type": "a.b", "aggregate_id": "\ud800", "payload": {}}"#,
        br#"{"event_type": "a.b", "aggregate_id": "x", "payload": {"k": "\u0000"}}"#,
        br#"{"event_type": "a.b", "aggregate_id": "x", "payload": {"v": 1e400}}"#,
        b"{\"event_type\": \"\xff\"}",
        b"",
        b"null",
    ];
    prop_oneof![
        8 => event_doc().prop_map(|v| json_body(&v)),
        1 => json_any().prop_map(|v| json_body(&v)),
        1 => prop::sample::select(raw).prop_map(|b| Some((Some("application/json".into()), b.to_vec()))),
        1 => prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| Some((Some("application/json".into()), b))),
        1 => prop::option::of(prop_oneof![
                one_of(&["text/plain", "application/json; charset=utf-8",
                         "application/cloudevents+json", "application/jsonx", ""]),
                nasty(),
            ])
            .prop_map(|ct| Some((ct, serde_json::to_vec(&base_event()).unwrap()))),
        1 => Just(None),
    ]
    .boxed()
}

/// A batch of edited events, or something that is not a batch.
fn batch_body() -> BoxedStrategy<Option<(Option<String>, Vec<u8>)>> {
    prop_oneof![
        6 => prop::collection::vec(event_doc(), 0..5)
            .prop_map(|events| json_body(&json!({ "events": events }))),
        1 => json_any().prop_map(|v| json_body(&json!({ "events": v }))),
        1 => (nasty(), json_any()).prop_map(|(k, v)| json_body(&json!({ k: v }))),
        1 => event_body(),
    ]
    .boxed()
}

#[test]
fn ingestion_routes_answer_bad_input_with_4xx_json() {
    let rt = runtime();
    let app = rt.block_on(async {
        let app = TestApp::spawn(&[Service::Ingestion]).await;
        app.wait_ready().await;
        app
    });
    let addr = app.addrs[&Service::Ingestion];
    for path in ["/api/v1/ingest", "/api/v1/events"] {
        drive(
            &rt,
            &app,
            addr,
            &format!("POST {path}"),
            event_body().prop_map(move |body| Probe {
                method: "POST",
                target: path.into(),
                body,
            }),
        );
    }
    drive(
        &rt,
        &app,
        addr,
        "POST /api/v1/ingest/batch",
        batch_body().prop_map(|body| Probe {
            method: "POST",
            target: "/api/v1/ingest/batch".into(),
            body,
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "GET outbox/quarantine",
        query(vec![("limit", number(20_000))])
            .prop_map(|q| get(format!("/api/v1/outbox/quarantine{q}"))),
    );
    drive(
        &rt,
        &app,
        addr,
        "POST outbox/quarantine/{seq}/requeue",
        segment(number(u64::MAX)).prop_map(|seq| Probe {
            method: "POST",
            ..get(format!("/api/v1/outbox/quarantine/{seq}/requeue"))
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "DELETE outbox/quarantine/{seq}",
        segment(number(u64::MAX)).prop_map(|seq| Probe {
            method: "DELETE",
            ..get(format!("/api/v1/outbox/quarantine/{seq}"))
        }),
    );
    drive(
        &rt,
        &app,
        addr,
        "any method on any route",
        (
            any_method(),
            prop::sample::select(
                &[
                    "/api/v1/ingest",
                    "/api/v1/ingest/batch",
                    "/api/v1/outbox/quarantine",
                    "/health",
                    "/metrics",
                    "/internal/auth/verify",
                ][..],
            ),
            query(vec![]),
        )
            .prop_map(|(method, path, q)| Probe {
                method,
                ..get(format!("{path}{q}"))
            }),
    );
}
