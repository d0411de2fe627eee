//! The operator console in a real headless Chromium (Debian's package; `make test` installs it),
//! against every service, the ai-inference sidecar, the database and the broker: readings from
//! `cornjacket simulate` with outliers, a rule on `ai.anomaly` calling an in-test receiver, and a
//! dead letter. The browser logs in with a token typed into the form, then each page must show
//! that data (device rows, a drawn chart with anomaly markers, the anomaly feed, the rule and its
//! test delivery, a live-tail row arriving without reload), Replay must replay the dead letter,
//! and no page may raise a JavaScript error or fail to load an asset. Screenshots of every page
//! go to `target/console-screenshots/` for a reviewer.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::page::{Page, ScreenshotParams};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::sidecar::Sidecar;
use crate::common::webhook::Receiver;
use crate::common::*;
use cornjacket::services::Service;

/// The sidecar helper mints its tokens with this secret; the platform verifies with it.
const SECRET: &str = "chain-test-secret-of-at-least-32-characters";
const CHROMIUM: &str = "/usr/bin/chromium";

fn token(scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "browser-operator", "scope": scope, "exp": now + 1800, "nbf": now - 10}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Collects what would show in the browser's console as an error: uncaught exceptions,
/// rejected promises, `console.error`, and assets that failed to load (a capturing `error`
/// listener sees those). Installed before any of the page's own scripts run.
const ERROR_TRAP: &str = r#"
window.__cjErrors = [];
window.addEventListener("error", (e) => {
  const t = e.target;
  if (t && t !== window && (t.src || t.href)) window.__cjErrors.push("failed to load " + (t.src || t.href));
  else window.__cjErrors.push(String(e.message || e));
}, true);
window.addEventListener("unhandledrejection", (e) => window.__cjErrors.push("unhandled rejection: " + String(e.reason)));
const cjConsoleError = console.error.bind(console);
console.error = (...a) => { window.__cjErrors.push("console.error: " + a.map(String).join(" ")); cjConsoleError(...a); };
"#;

struct Walk {
    page: Page,
    base: String,
    shots: PathBuf,
}

impl Walk {
    async fn goto(&self, path: &str) {
        self.page
            .goto(format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// The value of `expr` in the page; `null` while the page is between documents.
    async fn js(&self, expr: &str) -> Value {
        match self.page.evaluate(expr).await {
            Ok(v) => v.value().cloned().unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Waits until `expr` is truthy in the page; panics with `what` and the page's text.
    async fn until(&self, what: &str, expr: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.js(expr).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.js("document.body.innerText").await;
                panic!("{what}: `{expr}` never held; the page shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn no_errors(&self, name: &str) {
        let errors = self
            .js("JSON.stringify(window.__cjErrors || ['no error trap'])")
            .await;
        assert_eq!(errors, json!("[]"), "{name}: JavaScript errors");
    }

    async fn shot(&self, name: &str) {
        self.page
            .save_screenshot(
                ScreenshotParams::builder().full_page(true).build(),
                self.shots.join(format!("{name}.png")),
            )
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        self.no_errors(name).await;
    }

    async fn click(&self, selector: &str) {
        self.page
            .find_element(selector)
            .await
            .unwrap_or_else(|e| panic!("no {selector}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }
}

async fn launch() -> (Browser, tokio::task::JoinHandle<()>, tempfile::TempDir) {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `make test` installs Debian's chromium (scripts/infra.sh test-tools)"
    );
    let profile = tempfile::tempdir().unwrap();
    // As root in a container, without the sandbox; the network flags keep Chromium from
    // reaching for Google's hosts, which this machine's closed network refuses.
    let config = BrowserConfig::builder()
        .chrome_executable(CHROMIUM)
        .no_sandbox()
        .user_data_dir(profile.path())
        .window_size(1366, 900)
        .viewport(None)
        .launch_timeout(Duration::from_secs(60))
        .request_timeout(Duration::from_secs(60))
        .args([
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .build()
        .unwrap();
    let (browser, mut handler) = Browser::launch(config).await.expect("Chromium starts");
    let pump = tokio::spawn(async move { while handler.next().await.is_some() {} });
    (browser, pump, profile)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_walks_every_page_in_a_real_browser() {
    let app = TestApp::spawn_with(&Service::ALL, |e| {
        e.insert("CJ_AUTH_MODE".into(), "app".into());
        e.insert("CJ_JWT_SECRET".into(), SECRET.into());
        fast_consumer_retries(e);
    })
    .await;
    app.wait_ready().await;
    let sidecar = Sidecar::start(&app, &brokers());
    sidecar.wait_healthy(&app.http).await;
    let admin = token("ingest:write query:read actions:admin dlq:admin");
    let pool = app.pool().await;

    // A rule on anomalies, calling an in-test receiver.
    let receiver = Receiver::ok().await;
    let r = app
        .http
        .post(app.url(Service::Actions, "/api/v1/actions/rules"))
        .bearer_auth(&admin)
        .json(
            &json!({"name": "strong anomalies", "event_type": "ai.anomaly",
                      "condition": {"path": "payload.score", "op": ">", "value": 3},
                      "webhook": {"url": receiver.url("/hook")}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // Readings with outliers, as a first run gets them.
    let mut env = test_env(&app.db.url, &app.prefix);
    env.insert("CJ_AUTH_MODE".into(), "app".into());
    env.insert("CJ_JWT_SECRET".into(), SECRET.into());
    let mut sim = tokio::process::Command::from(cornjacket());
    sim.env_clear().envs(&env).args([
        "simulate",
        "--url",
        &app.url(Service::Ingestion, ""),
        "--devices",
        "2",
        "--rate",
        "200",
        "--count",
        "120",
        "--outliers",
        "0.3",
        "--seed",
        "5",
        "--prefix",
        "web-",
    ]);
    let out = sim.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("120 accepted"), "{text}");
    // The sidecar scores them and reports anomalies; the rule delivers some.
    eventually(Duration::from_secs(90), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM actions.deliveries WHERE event_type = 'ai.anomaly' AND status = 'delivered'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (n > 0).then_some(())
    })
    .await;

    // A dead letter: a reading the tsdb-writer refuses, corrected so a replay succeeds.
    let (dlq_id, hot_id) = tsdb_dead_letter(&app, "web-0001", true).await;

    let (mut browser, pump, _profile) = launch().await;
    let page = browser.new_page("about:blank").await.unwrap();
    page.add_init_script(ERROR_TRAP).await.unwrap();
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let w = Walk {
        page,
        base: format!("http://{}", app.addrs[&Service::Console]),
        shots,
    };

    // Not logged in: the login form; the token typed into it opens the console.
    w.goto("/console/devices").await;
    w.until(
        "the login form",
        "location.pathname === '/console/login'",
        Duration::from_secs(10),
    )
    .await;
    w.shot("login").await;
    w.page
        .find_element("input[name=token]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str(&admin)
        .await
        .unwrap();
    w.click("form button[type=submit]").await;
    w.until(
        "logged in",
        "location.pathname === '/console/devices'",
        Duration::from_secs(20),
    )
    .await;

    // Devices: both simulated devices with a value and a sparkline.
    w.until(
        "two device rows",
        "document.querySelectorAll('tr.device').length === 2",
        Duration::from_secs(20),
    )
    .await;
    w.until(
        "a sparkline",
        "document.querySelector('svg.spark polyline')",
        Duration::from_secs(5),
    )
    .await;
    let rows = w.js("document.querySelector('#devices').innerText").await;
    assert!(rows.as_str().unwrap().contains("temperature"), "{rows}");
    w.shot("devices").await;

    // Device detail: the chart of temperature drawn by uPlot, with anomaly markers.
    w.goto("/console/devices/web-0001").await;
    w.js("(() => { const k = document.querySelector('#chart-controls [name=key]'); k.value = 'temperature'; k.dispatchEvent(new Event('change', {bubbles: true})); return true; })()").await;
    w.until("a drawn chart", "document.querySelector('#chart canvas') && Number(document.querySelector('#chart').dataset.points) > 0", Duration::from_secs(20)).await;
    w.until(
        "anomaly markers",
        "Number(document.querySelector('#chart').dataset.anomalies) > 0",
        Duration::from_secs(20),
    )
    .await;
    w.shot("device").await;

    // Anomalies: the feed, with the rule's deliveries.
    w.goto("/console/anomalies").await;
    w.until(
        "an anomaly row",
        "document.querySelectorAll('tr.anomaly').length > 0",
        Duration::from_secs(10),
    )
    .await;
    w.until(
        "a fired rule",
        "document.querySelector('#anomalies').innerText.includes('delivered')",
        Duration::from_secs(10),
    )
    .await;
    w.shot("anomalies").await;

    // Webhooks: the rule, readable; a test delivery reaches the receiver.
    w.goto("/console/webhooks").await;
    let rule = w.js("document.querySelector('tr.rule').innerText").await;
    assert!(
        rule.as_str().unwrap().contains("payload.score > 3"),
        "{rule}"
    );
    w.until(
        "a delivered delivery",
        "document.querySelector('tr.delivery[data-status=delivered]')",
        Duration::from_secs(5),
    )
    .await;
    let before = receiver.count();
    w.click("tr.rule button.test").await;
    w.until(
        "the test delivery recorded",
        "document.querySelector('tr.rule').innerText.includes('test delivery')",
        Duration::from_secs(10),
    )
    .await;
    let calls = receiver.wait_for(before + 1, Duration::from_secs(20)).await;
    assert!(
        calls
            .iter()
            .any(|c| c.json()["event_type"] == "webhook.test"),
        "the receiver got the test event"
    );
    w.shot("webhooks").await;

    // Live tail: a reading ingested after the page opened arrives without a reload.
    w.goto("/console/tail?type=sensor.*").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest"))
        .bearer_auth(&admin)
        .json(
            &json!({"event_type": "sensor.reading", "aggregate_id": "web-tail",
                      "payload": {"value": 1.5, "unit": "celsius"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    w.until(
        "the new envelope",
        "Number(document.querySelector('#tail tbody').dataset.updates) > 0 && document.querySelector('#tail tbody').innerText.includes('web-tail')",
        Duration::from_secs(20),
    )
    .await;
    w.shot("tail").await;

    // Overview: its live region updates without a reload.
    w.goto("/console/").await;
    w.until(
        "a live update",
        "Number(document.querySelector('#overview').dataset.updates) > 0",
        Duration::from_secs(20),
    )
    .await;
    let overview = w.js("document.querySelector('#overview').innerText").await;
    assert!(
        overview.as_str().unwrap().contains("tsdb-writer"),
        "{overview}"
    );
    w.shot("overview").await;

    // Dead letters: Replay replays it.
    w.goto("/console/dead-letters").await;
    let row = format!("#dl-{dlq_id}");
    w.until(
        "the dead letter",
        &format!("document.querySelector('{row}')"),
        Duration::from_secs(5),
    )
    .await;
    w.shot("dead-letters").await;
    w.click(&format!("{row} button.replay")).await;
    w.until(
        "replayed",
        &format!("document.querySelector('{row}').innerText.includes('replayed')"),
        Duration::from_secs(20),
    )
    .await;
    let value: f64 =
        sqlx::query_scalar("SELECT value FROM tsdb.sensor_readings WHERE event_id = $1")
            .bind(hot_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(value, 19.5);

    // API docs: Swagger UI renders a document.
    w.goto("/console/docs").await;
    w.until("Swagger UI", "document.querySelector('#swagger-ui .opblock') && document.querySelector('#swagger-ui').innerText.includes('Cornjacket Ingestion API')", Duration::from_secs(20)).await;
    w.shot("docs").await;

    browser.close().await.unwrap();
    let _ = browser.wait().await;
    pump.abort();
    drop(sidecar);
}
