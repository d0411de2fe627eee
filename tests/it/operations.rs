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

/// The outbox sample that `/health`, `/readyz` and `/metrics` report stays right, and cheap,
/// with a backlog far above what a probe should count: exact up to the cap, the planner's
/// estimate beyond it, the oldest row and the retried rows read through indexes. (The outbox is
/// filled directly, with no service running, so no processor drains it meanwhile.)
#[tokio::test]
async fn the_outbox_sample_stays_cheap_and_right_under_a_large_backlog() {
    use cornjacket::services::ingestion::processor::{EXACT_BACKLOG, backlog};
    let db = TestDb::new().await;
    cornjacket::infra::db::migrate(&db.url, Service::Ingestion.migrations().unwrap())
        .await
        .unwrap();
    let pool = db.pool().await;
    let fill = |n: i64, age_s: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO ingestion.outbox (shard, event_id, created_at, event_payload)
                 SELECT (i % 16)::smallint, gen_random_uuid(),
                        now() - make_interval(secs => $2::float8), '{}'::jsonb
                 FROM generate_series(1, $1::bigint) AS i",
            )
            .bind(n)
            .bind(age_s as f64)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Small: exact.
    fill(1_000, 120).await;
    let (n, age, stuck) = backlog(&pool, 5).await.unwrap();
    assert_eq!((n, stuck), (1_000, 0));
    assert!((119.0..200.0).contains(&age), "{age}");
    sqlx::query("UPDATE ingestion.outbox SET retry_count = 9 WHERE seq IN (SELECT seq FROM ingestion.outbox LIMIT 7)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(backlog(&pool, 5).await.unwrap().2, 7);
    // Large: counted up to the cap, then the estimate (after the analyse autovacuum would run).
    fill(EXACT_BACKLOG + 50_000, 10).await;
    sqlx::query("ANALYZE ingestion.outbox")
        .execute(&pool)
        .await
        .unwrap();
    let (n, age, stuck) = backlog(&pool, 5).await.unwrap();
    let real = EXACT_BACKLOG + 51_000;
    assert!(
        n > EXACT_BACKLOG && (n - real).abs() < real / 10,
        "{n} is not within 10% of {real}"
    );
    assert!(
        (119.0..200.0).contains(&age),
        "the oldest is still the first: {age}"
    );
    assert_eq!(stuck, 7);
    // The retried rows come from their partial index, not a scan of the backlog.
    let plan: String = sqlx::query_scalar::<_, String>(
        "EXPLAIN SELECT count(*) FROM ingestion.outbox WHERE retry_count > 0 AND retry_count > 5",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .join("\n");
    assert!(plan.contains("idx_outbox_retried"), "{plan}");
}
