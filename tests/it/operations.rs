//! Replay and rebuild (SPEC §13, ADR-0001) against the real database and broker.

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use serde_json::json;

type Snapshot = Vec<(String, String, String, String, String)>;

async fn snapshot(pool: &sqlx::PgPool) -> Snapshot {
    sqlx::query_as(
        "SELECT projection_type, aggregate_id, state::text, last_event_id::text, last_event_timestamp::text
         FROM eventhandler.projections ORDER BY projection_type, aggregate_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn rebuild_restores_identical_states_and_replay_changes_nothing() {
    let app = TestApp::spawn(&[Service::Ingestion, Service::Eventhandler, Service::Query]).await;
    app.wait_ready().await;
    for i in 0..30 {
        let t = format!("2026-01-01T00:00:{i:02}Z");
        let body = json!({"event_type": "sensor.reading", "aggregate_id": format!("d{}", i % 5),
                          "payload": {"value": i as f64 + 0.25, "unit": "c"}, "event_time": t});
        assert_eq!(app.ingest(body).await.0, 202);
    }
    assert_eq!(
        app.ingest(json!({"event_type": "user.login", "aggregate_id": "u1",
                          "payload": {"user_id": "u1", "ip": "::1"}}))
            .await
            .0,
        202
    );
    let pool = app.pool().await;
    let before = eventually(Duration::from_secs(45), || async {
        let s = snapshot(&pool).await;
        // Every device's last reading, and every event stored: shards move independently, so
        // one device's last projection can land before another's reading is stored.
        let done = s.len() == 6
            && (0..5).all(|k| {
                let last = format!("{}.25", 25 + k);
                s.iter()
                    .any(|r| r.1 == format!("d{k}") && r.2.contains(&last))
            })
            && count_rows(&pool, "ingestion.event_store").await == 31;
        done.then_some(s)
    })
    .await;

    // Rebuild from the event store after the read model is wiped.
    let (ok, out) = cli(&app, &["projections", "rebuild", "--dry-run"]);
    assert!(ok && out.contains("31 event(s) would be read"), "{out}");
    sqlx::query("DELETE FROM eventhandler.projections")
        .execute(&pool)
        .await
        .unwrap();
    let (ok, out) = cli(&app, &["projections", "rebuild"]);
    assert!(ok, "{out}");
    assert_eq!(
        snapshot(&pool).await,
        before,
        "rebuilt states are identical"
    );
    // Twice is the same.
    assert!(cli(&app, &["projections", "rebuild", "--type", "sensor_state"]).0);
    assert_eq!(snapshot(&pool).await, before);
    assert!(!cli(&app, &["projections", "rebuild", "--type", "nope"]).0);

    // Replay everything: consumed idempotently, projections unchanged.
    let (ok, out) = cli(
        &app,
        &["replay", "--since", "2000-01-01T00:00:00Z", "--dry-run"],
    );
    assert!(
        ok && out.contains("31 event(s) would be republished"),
        "{out}"
    );
    let (ok, out) = cli(
        &app,
        &[
            "replay",
            "--since",
            "2000-01-01T00:00:00Z",
            "--type",
            "sensor.reading",
        ],
    );
    assert!(ok && out.contains("30 event(s) republished"), "{out}");
    let recs = read_topics(&[app.topic("sensor-events")], 60, Duration::from_secs(20)).await;
    let replayed: Vec<&BusRecord> = recs
        .iter()
        .filter(|r| r.headers.contains_key("cj-replay"))
        .collect();
    assert_eq!(replayed.len(), 30);
    assert!(
        replayed
            .iter()
            .all(|r| r.payload["metadata"]["source"] == "replay")
    );
    // Sentinel after the replayed events, then compare.
    let sentinel = json!({"event_type": "sensor.reading", "aggregate_id": "sentinel",
                          "payload": {"value": 1, "unit": "c"}});
    assert_eq!(app.ingest(sentinel).await.0, 202);
    eventually(Duration::from_secs(45), || async {
        let r = app
            .http
            .get(app.url(
                Service::Query,
                "/api/v1/query/projections/sensor_state/sentinel",
            ))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let after: Snapshot = snapshot(&pool)
        .await
        .into_iter()
        .filter(|r| r.1 != "sentinel")
        .collect();
    assert_eq!(after, before, "replay changed no projection");
    let dlq: i64 = count_rows(&pool, "eventhandler.dlq").await;
    assert_eq!(dlq, 0);
}
