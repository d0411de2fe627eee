//! The operator console (port 8085) over HTTP, against the real services, database and broker:
//! its session cookie and CSRF rules, and its pages showing what was ingested, down to
//! replaying a dead letter through the consumer's API. (The browser-driven walk through the
//! same pages is in `console_browser`.)

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use cornjacket::services::Service;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

const SECRET: &str = "console-test-secret-that-is-long-enough-42";

fn token(scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "operator-1", "scope": scope, "exp": now + 600, "nbf": now - 10}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn app_auth(e: &mut HashMap<String, String>) {
    e.insert("CJ_AUTH_MODE".into(), "app".into());
    e.insert("CJ_JWT_SECRET".into(), SECRET.into());
}

/// A client that neither follows redirects nor keeps cookies: the test looks at each step.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The `cj_console=…` pair and the whole Set-Cookie line of a login answer.
fn session_cookie(r: &reqwest::Response) -> (String, String) {
    let line = r
        .headers()
        .get("set-cookie")
        .expect("login sets a cookie")
        .to_str()
        .unwrap()
        .to_string();
    (line.split(';').next().unwrap().to_string(), line)
}

fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf-token\" content=\"")
        .expect("csrf meta")
        + 27;
    html[at..at + 32].to_string()
}

/// An `application/x-www-form-urlencoded` body (reqwest is built without its `form` feature).
fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn login(app: &TestApp, c: &reqwest::Client, tok: &str) -> reqwest::Response {
    c.post(app.url(Service::Console, "/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", tok), ("next", "/console/devices")]))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_token_becomes_an_httponly_strict_cookie_and_every_refusal_is_the_right_one() {
    let app = TestApp::spawn_with(
        &[Service::Ingestion, Service::Query, Service::Console],
        app_auth,
    )
    .await;
    let c = raw_client();
    let url = |p: &str| app.url(Service::Console, p);

    // A person without a session is sent to the login form, keeping where they were going;
    // a script gets the platform's 401 JSON.
    let r = c
        .get(url("/console/devices?q=a"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/console/login?next=/console/devices%3Fq%3Da"
    );
    let r = c.get(url("/console/devices")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    // The form and the assets are open.
    assert_eq!(
        c.get(url("/console/login")).send().await.unwrap().status(),
        200
    );
    let css = c
        .get(url("/console/assets/console.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), 200);
    assert_eq!(css.headers()["content-type"], "text/css");

    // Refused tokens: garbage, a forged signature, one without query:read.
    for (bad, why) in [
        ("not a token;\r\nSet-Cookie: x=1", "not a token"),
        (&*format!("{}x", token("query:read")), "refused"),
        (&*token("ingest:write"), "lacks the scope query:read"),
    ] {
        let r = login(&app, &c, bad).await;
        assert_eq!(r.status(), 401, "{bad}");
        assert!(r.headers().get("set-cookie").is_none());
        assert!(r.text().await.unwrap().contains(why), "{why}");
    }

    // A reader: the cookie is HttpOnly, SameSite=Strict, scoped to /console, as long as the token.
    let r = login(&app, &c, &token("query:read")).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/devices");
    let (reader, line) = session_cookie(&r);
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(line.contains(attr), "{line}");
    }
    let page = c
        .get(url("/console/devices"))
        .header("cookie", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("operator-1"));
    // A reader sees no buttons, and a POST is refused for its scope before anything else.
    let csrf = csrf_of(&html);
    let id = Uuid::now_v7();
    let r = c
        .post(url(&format!("/console/dead-letters/tsdb/{id}/replay")))
        .header("cookie", &reader)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // An admin's POST without the CSRF token, with another session's, or from another site.
    let r = login(&app, &c, &token("query:read actions:admin dlq:admin")).await;
    let (admin, _) = session_cookie(&r);
    let html = c
        .get(url("/console/dead-letters"))
        .header("cookie", &admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let admin_csrf = csrf_of(&html);
    assert_ne!(admin_csrf, csrf);
    let post = |csrf: Option<&str>, site: Option<&str>| {
        let mut rq = c
            .post(url(&format!("/console/dead-letters/tsdb/{id}/replay")))
            .header("cookie", &admin);
        if let Some(t) = csrf {
            rq = rq.header("x-csrf-token", t);
        }
        if let Some(s) = site {
            rq = rq.header("sec-fetch-site", s);
        }
        rq.send()
    };
    for (csrf, site) in [
        (None, None),
        (Some(csrf.as_str()), None),
        (Some(admin_csrf.as_str()), Some("cross-site")),
    ] {
        let r = post(csrf, site).await.unwrap();
        assert_eq!(r.status(), 403, "{csrf:?} {site:?}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("CSRF"), "{v}");
    }
    // With it, the request reaches the DLQ API: no such dead letter there (no tsdb-writer runs,
    // so its API is not even up: a bad gateway, not a console fault).
    let r = post(Some(&admin_csrf), Some("same-origin")).await.unwrap();
    assert!(matches!(r.status().as_u16(), 404 | 502), "{}", r.status());

    // The cookie stands for the token on console paths only: never on an API.
    let api = c
        .get(app.url(Service::Query, "/api/v1/query/events"))
        .header("cookie", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    // ForwardAuth admits a logged-in browser on console paths (gateway mode's check).
    let verify = |uri: &'static str, cookie: String| {
        c.get(app.url(Service::Ingestion, "/internal/auth/verify"))
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-uri", uri)
            .header("cookie", cookie)
            .send()
    };
    assert_eq!(
        verify("/console/devices", reader.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        verify("/api/v1/query/events", reader.clone())
            .await
            .unwrap()
            .status(),
        401
    );
    // Without a session, a person opening the console behind the gateway is sent to the login
    // form (Traefik passes the answer on); a script, or an API path, gets the 401.
    let verify_anon = |uri: &'static str, accept: &'static str| {
        c.get(app.url(Service::Ingestion, "/internal/auth/verify"))
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-uri", uri)
            .header("accept", accept)
            .send()
    };
    let r = verify_anon("/console/devices?q=a b", "text/html,application/xhtml+xml")
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/console/login?next=/console/devices%3Fq%3Da%20b"
    );
    for (uri, accept) in [
        ("/console/devices", "application/json"),
        ("/api/v1/query/events", "text/html"),
    ] {
        assert_eq!(
            verify_anon(uri, accept).await.unwrap().status(),
            401,
            "{uri}"
        );
    }

    // `next` never leaves the console.
    let r = c
        .post(url("/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("token", token("query:read").as_str()),
            ("next", "//evil.example/console/"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/console/");
}

fn reading(device: &str, temperature: f64) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"values": {"temperature": temperature, "humidity": 40.0},
                       "units": {"temperature": "celsius", "humidity": "%"}}})
}

#[tokio::test]
async fn the_pages_show_what_was_ingested_and_a_dead_letter_is_replayed_from_its_page() {
    let app = TestApp::spawn_with(&Service::ALL, fast_consumer_retries).await;
    app.wait_ready().await;
    let c = raw_client();
    let get = |p: String| {
        let c = c.clone();
        let u = app.url(Service::Console, &p);
        async move {
            let r = c.get(u).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    for (i, d) in ["console-a", "console-b", "console-c"].iter().enumerate() {
        for k in 0..5 {
            let (status, body) = app
                .ingest(reading(d, 20.0 + i as f64 + k as f64 / 10.0))
                .await;
            assert_eq!(status, 202, "{body}");
        }
    }

    // Devices: every one with its last values and a sparkline; search narrows the list.
    let html = eventually(Duration::from_secs(30), || async {
        let (s, html) = get("/console/devices".into()).await;
        // Until the projection has folded the fifth reading of the last device.
        (s == 200
            && html.matches("class=\"device\"").count() == 3
            && html.contains("temperature 22.4 celsius")
            && html.contains("<polyline"))
        .then_some(html)
    })
    .await;
    assert!(
        html.contains("humidity 40 %, temperature 22.4 celsius"),
        "{html}"
    );
    let (_, found) = get("/console/devices?q=E-B".into()).await;
    assert_eq!(
        found.matches("class=\"device\"").count(),
        1,
        "search is case-insensitive"
    );
    assert!(found.contains("console-b"));
    let (_, none) = get("/console/devices?q=%25".into()).await;
    assert_eq!(none.matches("class=\"device\"").count(), 0, "% is literal");

    // Device detail: every key to chart, the last events; its series answers the chart.
    let (s, detail) = get("/console/devices/console-a".into()).await;
    assert_eq!(s, 200);
    assert!(
        detail.contains("<option value=\"humidity\">")
            && detail.contains("<option value=\"temperature\">")
    );
    assert_eq!(detail.matches("<td>sensor.reading</td>").count(), 5);
    let (s, series) =
        get("/console/devices/console-a/series?key=temperature&bucket=1m&agg=max&window=1h".into())
            .await;
    assert_eq!(s, 200, "{series}");
    let v: Value = serde_json::from_str(&series).unwrap();
    assert_eq!(
        v["values"].as_array().unwrap().last().unwrap().as_f64(),
        Some(20.4)
    );
    let (s, bad) = get("/console/devices/console-a/series?bucket=7m".into()).await;
    assert_eq!(s, 400, "{bad}");
    let (s, _) = get("/console/devices/nobody".into()).await;
    assert_eq!(s, 404);

    // Overview: the consumers' lag and every port's health arrive over the live stream.
    let overview = eventually(Duration::from_secs(30), || async {
        let r = c
            .get(app.url(Service::Console, "/console/live/overview"))
            .send()
            .await
            .ok()?;
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut r = r;
        let chunk = tokio::time::timeout(Duration::from_secs(5), r.chunk())
            .await
            .ok()?
            .ok()??;
        let text = String::from_utf8_lossy(&chunk).to_string();
        (text.starts_with("event: overview")
            && text.contains("tsdb-writer")
            && text.contains("event-handler"))
        .then_some(text)
    })
    .await;
    assert!(overview.contains("action-orchestrator"), "{overview}");

    // A reading the tsdb-writer refuses becomes a dead letter listed with its buttons.
    let (dlq_id, hot_id) = tsdb_dead_letter(&app, "console-a", false).await;
    let pool = app.pool().await;
    let (_, letters) = get("/console/dead-letters".into()).await;
    assert!(
        letters.contains(&format!("id=\"dl-{dlq_id}\"")),
        "{letters}"
    );
    assert!(letters.contains(&format!("/console/dead-letters/tsdb/{dlq_id}/replay")));
    let csrf = csrf_of(&letters);

    // Replayed while still wrong: the consumer's answer comes through; corrected, it is replayed.
    let replay = || {
        c.post(app.url(
            Service::Console,
            &format!("/console/dead-letters/tsdb/{dlq_id}/replay"),
        ))
        .header("x-csrf-token", &csrf)
        .send()
    };
    let r = replay().await.unwrap();
    let (status, body) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("still failing"), "{body}");
    fix_tsdb_dead_letter(&pool, dlq_id).await;
    let r = replay().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("replayed"));
    let value: f64 =
        sqlx::query_scalar("SELECT value FROM tsdb.sensor_readings WHERE event_id = $1")
            .bind(hot_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(value, 19.5);
    let (_, letters) = get("/console/dead-letters".into()).await;
    assert!(
        !letters.contains(&format!("dl-{dlq_id}")),
        "a replayed letter leaves the page"
    );
    assert_eq!(get("/console/docs/query.yaml".into()).await.0, 200);
}

#[tokio::test]
async fn webhooks_anomalies_and_the_live_tail_act_through_the_apis() {
    use crate::common::webhook::{Receiver, Reply, verify};
    let app = TestApp::spawn_with(
        &[
            Service::Ingestion,
            Service::Eventhandler,
            Service::Actions,
            Service::Console,
        ],
        // One retry: the delivery ends failed after two calls.
        |e| {
            e.insert("CJ_ACTIONS_RETRY_DELAYS".into(), "10ms".into());
        },
    )
    .await;
    app.wait_ready().await;
    let c = raw_client();
    let console = |p: &str| app.url(Service::Console, p);
    // The first two calls fail, every later one succeeds.
    let receiver = Receiver::start(
        vec![Reply::status(500), Reply::status(500)],
        Some(Reply::status(200)),
    )
    .await;
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .json(&json!({"name": "disk alerts", "event_type": "system.alert",
                      "condition": {"all": [{"path": "payload.level", "op": "in", "value": ["error"]},
                                            {"path": "payload.disk", "op": "exists"}]},
                      "webhook": {"url": receiver.url("/hook")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let rule: Value = r.json().await.unwrap();
    let rule_id = rule["rule_id"].as_str().unwrap().to_string();
    let secret = rule["webhook"]["secret"].as_str().unwrap().to_string();

    // The live tail opens before the event; the event arrives on it as a row.
    let mut tail = c
        .get(console("/console/live/tail?type=system.*"))
        .send()
        .await
        .unwrap();
    assert_eq!(tail.headers()["content-type"], "text/event-stream");
    let (status, body) = app
        .ingest(json!({"event_type": "system.alert", "aggregate_id": "host-1",
                       "payload": {"level": "error", "disk": "/var", "message": "disk almost full"}}))
        .await;
    assert_eq!(status, 202, "{body}");
    let row = tokio::time::timeout(Duration::from_secs(20), async {
        let mut text = String::new();
        while !text.contains("host-1") {
            let chunk = tail.chunk().await.unwrap().expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .expect("the envelope arrives on the tail");
    assert!(
        row.contains("event: envelope") && row.contains("system.alert"),
        "{row}"
    );
    let r = c
        .get(console("/console/live/tail?type=Bad%20Type"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The delivery fails; the page shows it with Retry.
    receiver.wait_for(2, Duration::from_secs(20)).await;
    let pool = app.pool().await;
    let delivery: Uuid = eventually(Duration::from_secs(20), || async {
        sqlx::query_scalar("SELECT delivery_id FROM actions.deliveries WHERE status = 'failed'")
            .fetch_optional(&pool)
            .await
            .ok()?
    })
    .await;
    let page = c
        .get(console("/console/webhooks?status=failed"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("payload.level in [&quot;error&quot;] and payload.disk exists")
            || page.contains("payload.level in [&#34;error&#34;] and payload.disk exists"),
        "the condition reads as written: {page}"
    );
    assert!(page.contains(&format!("/console/webhooks/deliveries/{delivery}/retry")));
    let csrf = csrf_of(&page);
    let post = |path: String| c.post(console(&path)).header("x-csrf-token", &csrf).send();
    let r = post(format!("/console/webhooks/deliveries/{delivery}/retry"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("queued again"));
    receiver.wait_for(3, Duration::from_secs(20)).await;

    // A test delivery: a signed webhook.test envelope through the same worker.
    let r = post(format!("/console/webhooks/rules/{rule_id}/test"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let calls = receiver.wait_for(4, Duration::from_secs(20)).await;
    let test = calls.last().unwrap();
    assert!(verify(&secret, test), "signed with the rule's secret");
    let env = test.json();
    assert_eq!(env["event_type"], "webhook.test");
    assert_eq!(env["aggregate_id"], rule_id.as_str());
    assert_eq!(env["metadata"]["source"], "platform");

    // Disabled, a rule cannot be tested (its deliveries would be cancelled); enabled, it can.
    let r = post(format!("/console/webhooks/rules/{rule_id}/disable"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .post(app.url(
            Service::Actions,
            &format!("/api/v1/actions/rules/{rule_id}/test"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "conflict");
    let r = post(format!("/console/webhooks/rules/{rule_id}/test"))
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "the API's refusal comes through");
    let r = post(format!("/console/webhooks/rules/{rule_id}/enable"))
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("enabled"));
    let r = post(format!("/console/webhooks/rules/{rule_id}/nonsense"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Anomalies: an ai.anomaly event (as the sidecar submits it) with the rule's outcome.
    let (status, _) = app
        .ingest(json!({"event_type": "ai.anomaly", "aggregate_id": "dev-9",
                       "payload": {"device_id": "dev-9", "key": "temperature", "value": 99.5,
                                   "score": 7.25, "threshold": 3.0, "source_event_id": Uuid::now_v7(),
                                   "model": "zscore@1"}}))
        .await;
    assert_eq!(status, 202);
    let html = eventually(Duration::from_secs(20), || async {
        let html = c
            .get(console("/console/anomalies"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        html.contains("class=\"anomaly\"").then_some(html)
    })
    .await;
    for want in ["dev-9", "temperature", "99.500", "7.25", "3.0", "no rule"] {
        assert!(html.contains(want), "{want}: {html}");
    }
}
