//! Retention's clock guard (SPEC §13): a retention job never computes a cutoff from a host clock
//! that disagrees with the database's. With the services' injected clock 30 days ahead, every
//! row would be "expired"; each job refuses its rounds instead, says why in `/health` and in
//! its metrics, and removes nothing until the clocks agree again.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, TimeDelta, Utc};
use cornjacket::envelope::{FixedClock, truncate_micros};
use cornjacket::services::Service;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

const JOBS: [&str; 4] = ["ingestion", "eventhandler", "tsdb", "actions"];

async fn wait_migrated(pool: &PgPool, table: &str) {
    eventually(Duration::from_secs(45), || async {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(pool)
            .await
            .ok()
            .filter(|b| *b)
    })
    .await;
}

/// One row per retention job's table, stamped `at`; named by `tag` so a test can find it.
async fn insert_rows(pool: &PgPool, tag: &str, at: DateTime<Utc>) {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO ingestion.event_store
             (event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata)
         VALUES ($1, 'sensor.reading', $2, $3, $3, '{}', '{}')",
    )
    .bind(id)
    .bind(tag)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO eventhandler.projections
             (projection_id, projection_type, aggregate_id, state, last_event_id,
              last_event_timestamp, updated_at)
         VALUES ($1, 'sensor_state', $2, '{}', $1, $3, $3)",
    )
    .bind(id)
    .bind(tag)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tsdb.sensor_readings (time, device_id, value, unit, event_id)
         VALUES ($1, $2, 1.0, 'celsius', $3)",
    )
    .bind(at)
    .bind(tag)
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO actions.deliveries
             (delivery_id, rule_id, event_id, event_type, aggregate_id, event_at, endpoint,
              body, status, next_attempt_at, created_at, updated_at)
         VALUES ($1, $1, $1, 'system.alert', $2, $3, 'http://127.0.0.1:9/h', '{}', 'delivered',
                 $3, $3, $3)",
    )
    .bind(id)
    .bind(tag)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// The tags still present in each job's table, in `JOBS` order.
async fn remaining(pool: &PgPool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for sql in [
        "SELECT aggregate_id FROM ingestion.event_store ORDER BY 1",
        "SELECT aggregate_id FROM eventhandler.projections ORDER BY 1",
        "SELECT device_id FROM tsdb.sensor_readings ORDER BY 1",
        "SELECT aggregate_id FROM actions.deliveries ORDER BY 1",
    ] {
        out.push(sqlx::query_scalar(sql).fetch_all(pool).await.unwrap());
    }
    out
}

async fn refused_rounds(app: &TestApp) -> Vec<f64> {
    let m = scrape(app, Service::Ingestion).await;
    JOBS.iter()
        .map(|job| metric(&m, "cj_retention_runs_refused_total", &[("job", job)]))
        .collect()
}

/// Each job's `/health` report, in `JOBS` order.
async fn healths(app: &TestApp) -> Vec<Value> {
    let mut out = Vec::new();
    for url in [
        app.url(Service::Ingestion, "/health"),
        app.url(Service::Eventhandler, "/health"),
        app.url(Service::Tsdb, "/health"),
        app.health_url(Service::Actions, "/health"),
    ] {
        let r = app.http.get(&url).send().await.expect("health request");
        out.push(r.json().await.expect("health body"));
    }
    out
}

#[tokio::test]
async fn retention_removes_nothing_while_the_host_clock_disagrees_with_the_database() {
    let now = truncate_micros(wall_clock());
    let clock = FixedClock::at(now + TimeDelta::days(30));
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert("CJ_RETENTION_INTERVAL".into(), "1s".into());
    let app = TestApp::start_with_clock(
        db,
        prefix,
        env,
        &[
            Service::Ingestion,
            Service::Eventhandler,
            Service::Tsdb,
            Service::Actions,
        ],
        Arc::new(clock.clone()),
    )
    .await;
    assert_eq!(app.config.retention.max_clock_skew, Duration::from_secs(60));
    app.wait_ready().await;
    let pool = app.pool().await;
    for table in [
        "eventhandler.projections",
        "tsdb.sensor_readings",
        "actions.deliveries",
    ] {
        wait_migrated(&pool, table).await;
    }
    // Kept by a 7-day window at the database's time, and due by it; by the services' clock,
    // 30 days ahead, both are due.
    insert_rows(&pool, "fresh", now).await;
    insert_rows(&pool, "old", now - TimeDelta::days(10)).await;
    let both = vec!["fresh".to_string(), "old".to_string()];

    // Two refused rounds of every job after the rows were there.
    let before = refused_rounds(&app).await;
    eventually(Duration::from_secs(30), || async {
        assert_eq!(
            remaining(&pool).await,
            vec![both.clone(); 4],
            "a round removed rows by a clock 30 days ahead"
        );
        let after = refused_rounds(&app).await;
        after
            .iter()
            .zip(&before)
            .all(|(a, b)| *a >= b + 2.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        remaining(&pool).await,
        vec![both.clone(); 4],
        "nothing removed"
    );
    for (job, h) in JOBS.iter().zip(healths(&app).await) {
        let r = &h["checks"]["retention"];
        assert_eq!(r["status"], "degraded", "{job}: {h}");
        assert_ne!(h["status"], "healthy", "{job}: {h}");
        let why = r["refused"].as_str().unwrap_or_default();
        assert!(
            why.contains("ahead of") && why.contains("CJ_RETENTION_MAX_CLOCK_SKEW"),
            "{job}: {why}"
        );
        let skew = r["skew_seconds"].as_f64().unwrap();
        assert!((skew - 30.0 * 86_400.0).abs() < 120.0, "{job}: {skew}");
        let host = r["host_time"].as_str().unwrap();
        let database = r["database_time"].as_str().unwrap();
        assert!(why.contains(host) && why.contains(database), "{job}: {why}");
    }
    let m = scrape(&app, Service::Ingestion).await;
    for job in JOBS {
        let skew = metric(&m, "cj_retention_clock_skew_seconds", &[("job", job)]);
        assert!((skew - 30.0 * 86_400.0).abs() < 120.0, "{job}: {skew}");
    }

    // The clocks agree again: the next rounds run, and the 7-day window holds.
    clock.set(truncate_micros(wall_clock()));
    let fresh = vec!["fresh".to_string()];
    eventually(Duration::from_secs(30), || async {
        (remaining(&pool).await == vec![fresh.clone(); 4]).then_some(())
    })
    .await;
    for (job, h) in JOBS.iter().zip(healths(&app).await) {
        assert!(h["checks"].get("retention").is_none(), "{job}: {h}");
    }
}
