//! Devices that go quiet ([Telemetry]), against the real database and broker with two
//! platform instances sharing them, one of which restarts: a device that stops reporting gets
//! one `device.inactive` in the event store, one `device.active` when it reports again, in
//! its order; a device that keeps reporting gets neither; a device's own period (or `off`)
//! is set through the API.

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

fn reading(device: &str) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": 1.0, "unit": "c"}})
}

/// The device's events in the store, in publish (hence aggregate) order: (type, id).
async fn history(pool: &sqlx::PgPool, device: &str) -> Vec<(String, uuid::Uuid)> {
    sqlx::query_as(
        "SELECT event_type, event_id FROM ingestion.event_store
         WHERE aggregate_id = $1 AND publish_seq IS NOT NULL ORDER BY publish_seq",
    )
    .bind(device)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn types(h: &[(String, uuid::Uuid)]) -> Vec<&str> {
    h.iter().map(|(t, _)| t.as_str()).collect()
}

async fn start(db: &TestDb, prefix: &str) -> TestApp {
    let mut env = test_env(&db.url, prefix);
    env.insert("CJ_DEVICE_INACTIVITY_TIMEOUT".into(), "3s".into());
    env.insert("CJ_DEVICE_ACTIVITY_INTERVAL".into(), "100ms".into());
    let db = TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    };
    let app = TestApp::start(db, prefix.to_string(), env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    app
}

#[tokio::test]
async fn a_quiet_device_goes_inactive_and_back_exactly_once_across_instances_and_a_restart() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut a = start(&db, &prefix).await;
    let b = start(&db, &prefix).await;
    let pool = db.pool().await;

    // quiet reports once; chatty keeps reporting, half through each instance; never-1 reports
    // once but has no period of its own ("off").
    let put = |app: &TestApp, device: &str, body: Value| {
        let req = app
            .http
            .put(app.url(
                Service::Ingestion,
                &format!("/api/v1/devices/{device}/activity"),
            ))
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = put(&b, "never-1", json!({"inactivity_timeout": "off"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["inactivity_timeout"], "off");
    for bad in [
        json!({"inactivity_timeout": "0s"}),
        json!({"inactivity_timeout": 5}),
        json!({"inactivity_timeout": "1.5s"}),
        json!({"timeout": "5s"}),
        json!([]),
    ] {
        let (status, v) = put(&b, "never-1", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["code"], "validation_failed", "{bad}: {v}");
    }
    for d in ["quiet-1", "chatty-1", "never-1"] {
        assert_eq!(a.ingest(reading(d)).await.0, 202);
    }
    let chatter = {
        let (ua, ub, http) = (
            a.url(Service::Ingestion, "/api/v1/ingest"),
            b.url(Service::Ingestion, "/api/v1/ingest"),
            b.http.clone(),
        );
        tokio::spawn(async move {
            for i in 0.. {
                let url = if i % 2 == 0 { &ua } else { &ub };
                let _ = http.post(url).json(&reading("chatty-1")).send().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    eventually(Duration::from_secs(20), || async {
        (types(&history(&pool, "quiet-1").await) == ["sensor.reading", "device.inactive"])
            .then_some(())
    })
    .await;
    let (status, v) = {
        let r = b
            .http
            .get(b.url(Service::Ingestion, "/api/v1/devices/quiet-1/activity"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "inactive", "{v}");
    assert_eq!(v["inactivity_timeout_seconds"], 3, "{v}");

    // One instance restarts; the device reports again, through the other.
    assert!(a.stop().await, "instance a stopped cleanly");
    drop(a);
    let a = start(&db, &prefix).await;
    assert_eq!(b.ingest(reading("quiet-1")).await.0, 202);
    eventually(Duration::from_secs(20), || async {
        (types(&history(&pool, "quiet-1").await).len() >= 4).then_some(())
    })
    .await;
    // Then it goes quiet again, for longer than its period.
    eventually(Duration::from_secs(20), || async {
        (types(&history(&pool, "quiet-1").await).len() >= 5).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    chatter.abort();
    let h = history(&pool, "quiet-1").await;
    assert_eq!(
        types(&h),
        [
            "sensor.reading",
            "device.inactive",
            "sensor.reading",
            "device.active",
            "device.inactive"
        ]
    );
    let payload: Value =
        sqlx::query_scalar("SELECT payload FROM ingestion.event_store WHERE event_id = $1")
            .bind(h[3].1)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        payload["inactive_since"].is_string() && payload["last_seen"].is_string(),
        "{payload}"
    );
    let chatty = history(&pool, "chatty-1").await;
    assert!(chatty.len() > 10, "chatty kept reporting: {}", chatty.len());
    assert!(
        chatty.iter().all(|(t, _)| t == "sensor.reading"),
        "a device that keeps reporting never goes inactive: {:?}",
        types(&chatty)
    );
    assert_eq!(types(&history(&pool, "never-1").await), ["sensor.reading"]);
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ingestion.device_activity WHERE pending IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending, 0);
    drop((a, b));
}
