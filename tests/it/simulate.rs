//! `cornjacket simulate` against the real platform: what it says it sent arrives, over HTTP and
//! over MQTT, with outliers after each device's warm-up; and a platform that is not running is
//! one clear message and a failing exit code.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::Value;

/// Runs the binary's `simulate` with the app's settings (and `extra`), to its end.
async fn simulate(env: &HashMap<String, String>, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::from(cornjacket());
    cmd.arg("simulate").args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("simulate ends")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn env_of(app: &TestApp) -> HashMap<String, String> {
    let mut env = test_env(&app.db.url, &app.prefix);
    env.insert("CJ_LOG_LEVEL".into(), "warn".into());
    env
}

/// Waits until the event store holds `n` readings of devices named `prefix…`, and returns them
/// as (device, temperature) in commit order.
async fn stored(app: &TestApp, prefix: &str, n: usize) -> Vec<(String, f64)> {
    let pool = app.pool().await;
    eventually(Duration::from_secs(30), || async {
        let rows: Vec<(String, Value)> = sqlx::query_as(
            "SELECT aggregate_id, payload FROM ingestion.event_store
              WHERE aggregate_id LIKE $1 || '%' ORDER BY event_id",
        )
        .bind(prefix)
        .fetch_all(&pool)
        .await
        .ok()?;
        (rows.len() >= n).then(|| {
            rows.into_iter()
                .map(|(d, p)| (d, p["values"]["temperature"].as_f64().unwrap()))
                .collect()
        })
    })
    .await
}

#[tokio::test]
async fn what_the_simulator_sends_over_http_arrives_with_outliers_after_the_warm_up() {
    let app = TestApp::spawn(&[Service::Ingestion, Service::Eventhandler]).await;
    app.wait_ready().await;
    let url = app.url(Service::Ingestion, "");
    let (ok, out) = simulate(
        &env_of(&app),
        &[
            "--url",
            &url,
            "--devices",
            "3",
            "--rate",
            "500",
            "--count",
            "180",
            "--outliers",
            "0.3",
            "--seed",
            "11",
            "--prefix",
            "simh-",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("done: 180 sent, 180 accepted, 0 refused, 0 failed"),
        "{out}"
    );
    let rows = stored(&app, "simh-", 180).await;
    assert_eq!(rows.len(), 180, "exactly what it sent");
    let mut by: HashMap<String, Vec<f64>> = HashMap::new();
    for (d, t) in rows {
        by.entry(d).or_default().push(t);
    }
    assert_eq!(by.len(), 3, "{:?}", by.keys());
    for (d, temps) in &by {
        assert_eq!(temps.len(), 60, "{d}: the devices take turns");
        // The warm-up is plain; afterwards some readings are further off than any of it.
        let w = cornjacket::simulate::WARMUP as usize;
        let mean = temps[..w].iter().sum::<f64>() / w as f64;
        let dev = |ts: &[f64]| ts.iter().map(|t| (t - mean).abs()).fold(0.0, f64::max);
        assert!(
            dev(&temps[w..]) > 2.0 * dev(&temps[..w]),
            "{d}: no outlier in {temps:?}"
        );
    }
    // The projection shows each device's multi-key state.
    let pool = app.pool().await;
    let n: i64 = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM eventhandler.projections
              WHERE projection_type = 'sensor_state' AND aggregate_id LIKE 'simh-%'
                AND state->'values' ? 'humidity'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (n == 3).then_some(n)
    })
    .await;
    assert_eq!(n, 3);
}

#[tokio::test]
async fn the_simulator_publishes_over_mqtt_where_the_platform_subscribes() {
    let root = unique("sim");
    let client_id = unique("cj-");
    let mqtt = |e: &mut HashMap<String, String>| {
        e.insert(
            "CJ_MQTT_URL".into(),
            format!("mqtt://127.0.0.1:{}", mqtt_port()),
        );
        e.insert(
            "CJ_MQTT_TOPIC".into(),
            format!("$share/{root}g/{root}/devices/+/events"),
        );
        e.insert(
            "CJ_MQTT_USERNAME".into(),
            std::env::var("CJ_TEST_MQTT_USERNAME").unwrap_or("cornjacket".into()),
        );
        e.insert(
            "CJ_MQTT_PASSWORD".into(),
            std::env::var("CJ_TEST_MQTT_PASSWORD").unwrap_or("cornjacket".into()),
        );
    };
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        mqtt(e);
        e.insert("CJ_MQTT_CLIENT_ID".into(), client_id.clone());
    })
    .await;
    // The subscriber is connected before anything is published (no retained messages).
    eventually(Duration::from_secs(30), || async {
        let v: Value = app
            .http
            .get(app.url(Service::Ingestion, "/health"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["checks"]["mqtt"]["connected"] == true).then_some(())
    })
    .await;
    let mut env = env_of(&app);
    mqtt(&mut env);
    let (ok, out) = simulate(
        &env,
        &[
            "--transport",
            "mqtt",
            "--devices",
            "2",
            "--rate",
            "400",
            "--count",
            "100",
            "--prefix",
            "simm-",
            "--seed",
            "3",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("done: 100 sent, 100 accepted, 0 refused"),
        "{out}"
    );
    let rows = stored(&app, "simm-", 100).await;
    assert_eq!(rows.len(), 100);
    assert_eq!(rows.iter().filter(|(d, _)| d == "simm-0002").count(), 50);
}

#[tokio::test]
async fn a_platform_that_is_not_running_is_one_clear_message() {
    let db = TestDb::new().await;
    let env = test_env(&db.url, &topic_prefix());
    let url = format!("http://127.0.0.1:{}", free_port());
    let (ok, out) = simulate(&env, &["--url", &url, "--count", "5"]).await;
    assert!(!ok);
    assert!(out.contains("is it running?"), "{out}");
    assert_eq!(
        out.matches("simulate: sim-").count(),
        1,
        "one failure, not five: {out}"
    );
    let (ok, out) = simulate(&env, &["--url", &url, "--rate", "0"]).await;
    assert!(!ok);
    assert!(out.contains("--rate 0"), "{out}");
}
