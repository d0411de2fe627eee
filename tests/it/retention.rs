//! Retention (SPEC §13): the event store's daily partitions, the ingestion and event handler
//! retention jobs and `cornjacket retention run`, against the real database.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, TimeDelta, Utc};
use cornjacket::envelope::{FixedClock, truncate_micros};
use cornjacket::services::Service;
use cornjacket::services::ingestion::retention::{self, partition_name};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WEEK: Duration = Duration::from_secs(7 * 86_400);

fn day(now: DateTime<Utc>, offset: i64) -> String {
    partition_name((now + TimeDelta::days(offset)).date_naive())
}

async fn partition_names(pool: &PgPool) -> Vec<String> {
    retention::partitions(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// The table (partition) a stored event lives in, or None when it is gone.
async fn home(pool: &PgPool, event_id: Uuid) -> Option<String> {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM ingestion.event_store WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Stores an event straight into the event store (as the outbox processor would).
async fn store_event(pool: &PgPool, ingested_at: DateTime<Utc>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO ingestion.event_store
             (event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata)
         VALUES ($1, 'sensor.reading', 'direct', $2, $2, '{}', '{}')",
    )
    .bind(id)
    .bind(ingested_at)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn exists(pool: &PgPool, sql: &str, id: impl ToString) -> bool {
    sqlx::query_scalar::<_, bool>(&format!("SELECT EXISTS ({sql})"))
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn client_id_known(pool: &PgPool, id: Uuid) -> bool {
    exists(
        pool,
        "SELECT 1 FROM ingestion.event_ids WHERE event_id = $1::uuid",
        id,
    )
    .await
}

async fn key_known(pool: &PgPool, key: &str) -> bool {
    exists(
        pool,
        "SELECT 1 FROM ingestion.idempotency_keys WHERE key = $1",
        key,
    )
    .await
}

fn reading(device: &str, event_id: Option<Uuid>) -> Value {
    let mut v = json!({"event_type": "sensor.reading", "aggregate_id": device,
                       "payload": {"value": 1.5, "unit": "c"}});
    if let Some(id) = event_id {
        v["event_id"] = json!(id);
    }
    v
}

async fn ingest_keyed(app: &TestApp, key: &str) -> Uuid {
    let r = app
        .http
        .post(app.url(Service::Ingestion, "/api/v1/ingest"))
        .header("idempotency-key", key)
        .json(&reading("dev-keyed", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    Uuid::parse_str(v["event_id"].as_str().unwrap()).unwrap()
}

async fn wait_stored(pool: &PgPool, ids: &[Uuid]) {
    eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ingestion.event_store WHERE event_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(pool)
        .await
        .ok()?;
        (n == ids.len() as i64).then_some(())
    })
    .await;
}

#[tokio::test]
async fn old_partitions_rows_and_idempotency_records_go_and_newer_ones_stay() {
    let now = truncate_micros(wall_clock());
    let clock = FixedClock::at(now - TimeDelta::days(10));
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert("CJ_RETENTION_INTERVAL".into(), "1s".into());
    // The clock stands still at `now` while the test runs: allow for a slow run (the guard
    // itself is tested in tests/it/retention_clock.rs).
    env.insert("CJ_RETENTION_MAX_CLOCK_SKEW".into(), "1h".into());
    let app = TestApp::start_with_clock(
        db,
        prefix,
        env,
        &[Service::Ingestion],
        Arc::new(clock.clone()),
    )
    .await;
    app.wait_ready().await;
    let pool = app.pool().await;

    // Ten days ago: the service made that day's partition (and the next three) at startup.
    let (old_a, old_b) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [old_a, old_b] {
        assert_eq!(app.ingest(reading("dev-old", Some(id))).await.0, 202);
    }
    let old_keyed = ingest_keyed(&app, "old-key").await;
    wait_stored(&pool, &[old_a, old_b, old_keyed]).await;
    assert_eq!(
        home(&pool, old_a).await.unwrap(),
        format!("ingestion.{}", day(now, -10))
    );
    // Their idempotency records were written then too (the database stamps them with its own
    // clock, which a test cannot move).
    let then = now - TimeDelta::days(10);
    sqlx::query("UPDATE ingestion.event_ids SET created_at = $1 WHERE event_id = ANY($2)")
        .bind(then)
        .bind([old_a, old_b])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE ingestion.idempotency_keys SET created_at = $1 WHERE key = 'old-key'")
        .bind(then)
        .execute(&pool)
        .await
        .unwrap();
    // Days without a partition land in the default one: 30 days ago, and 5 days ago.
    let default_old = store_event(&pool, now - TimeDelta::days(30)).await;
    let default_new = store_event(&pool, now - TimeDelta::days(5)).await;
    assert_eq!(
        home(&pool, default_new).await.unwrap(),
        "ingestion.event_store_default"
    );

    // Time moves to now; new events arrive, and the next run applies the 7-day window.
    clock.set(now);
    let new_id = Uuid::now_v7();
    assert_eq!(app.ingest(reading("dev-new", Some(new_id))).await.0, 202);
    let new_keyed = ingest_keyed(&app, "new-key").await;
    wait_stored(&pool, &[new_id, new_keyed]).await;
    eventually(Duration::from_secs(30), || async {
        let names = partition_names(&pool).await;
        let gone = !names.contains(&day(now, -8))
            && home(&pool, default_old).await.is_none()
            && !client_id_known(&pool, old_b).await
            && !key_known(&pool, "old-key").await;
        gone.then_some(())
    })
    .await;

    let names = partition_names(&pool).await;
    for d in [-10, -9, -8] {
        assert!(
            !names.contains(&day(now, d)),
            "{} dropped: {names:?}",
            day(now, d)
        );
    }
    // The day 7 days ago is kept whole, as are today and the days ahead.
    for d in [-7, 0, 1, 2, 3] {
        assert!(
            names.contains(&day(now, d)),
            "{} kept: {names:?}",
            day(now, d)
        );
    }
    for id in [old_a, old_b, old_keyed, default_old] {
        assert_eq!(home(&pool, id).await, None, "{id} removed");
    }
    assert_eq!(
        home(&pool, new_id).await.unwrap(),
        format!("ingestion.{}", day(now, 0))
    );
    assert!(home(&pool, new_keyed).await.is_some());
    assert_eq!(
        home(&pool, default_new).await.unwrap(),
        "ingestion.event_store_default"
    );
    assert!(!client_id_known(&pool, old_a).await);
    assert!(client_id_known(&pool, new_id).await);
    assert!(key_known(&pool, "new-key").await);
    // A repeat of a remembered key still answers its event.
    assert_eq!(ingest_keyed(&app, "new-key").await, new_keyed);

    let m = scrape(&app, Service::Ingestion).await;
    assert_eq!(
        metric(&m, "cj_retention_partitions_dropped_total", &[]),
        3.0
    );
    let removed = |table| metric(&m, "cj_retention_removed_total", &[("table", table)]);
    assert_eq!(removed("ingestion.event_store_default"), 1.0);
    assert_eq!(removed("ingestion.event_ids"), 2.0);
    assert_eq!(removed("ingestion.idempotency_keys"), 1.0);
    assert_eq!(
        metric(&m, "cj_event_store_partitions", &[]),
        partition_names(&pool).await.len() as f64
    );
}

#[tokio::test]
async fn partitions_exist_ahead_after_startup_and_maintenance_is_idempotent_and_race_safe() {
    // The service's clock decides the days, at startup already; retention being off only
    // stops removals, not the partitions ahead.
    let now = truncate_micros(wall_clock());
    let later = now + TimeDelta::days(30);
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut env = test_env(&db.url, &prefix);
    env.insert("CJ_RETENTION_ENABLED".into(), "false".into());
    let app = TestApp::start_with_clock(
        db,
        prefix,
        env,
        &[Service::Ingestion],
        Arc::new(FixedClock::at(later)),
    )
    .await;
    app.wait_ready().await;
    let pool = app.pool().await;
    let names = partition_names(&pool).await;
    for d in 0..=3 {
        assert!(names.contains(&day(later, d)), "{names:?}");
        // The migration's, around the database's today, are not removed: retention is off.
        assert!(names.contains(&day(now, d)), "{names:?}");
    }

    // Two instances maintaining at once: no error, each partition made once, then nothing.
    let other = app.db.pool().await;
    let at = now + TimeDelta::days(60);
    let (a, b) = tokio::join!(
        retention::create_ahead(&pool, at),
        retention::create_ahead(&other, at)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut created: Vec<String> = a.into_iter().chain(b).collect();
    created.sort();
    assert_eq!(created, (0..=3).map(|d| day(at, d)).collect::<Vec<_>>());
    assert!(retention::create_ahead(&pool, at).await.unwrap().is_empty());

    // Two retention runs at once drop each expired partition once between them.
    let never = CancellationToken::new();
    let before = partition_names(&pool).await;
    let (a, b) = tokio::join!(
        retention::enforce(&pool, at, WEEK, false, &never),
        retention::enforce(&other, at, WEEK, false, &never)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut dropped: Vec<String> = a
        .dropped
        .iter()
        .chain(&b.dropped)
        .map(|p| p.name.clone())
        .collect();
    dropped.sort();
    let expired: Vec<String> = before
        .iter()
        .filter(|n| **n < day(at, -7))
        .cloned()
        .collect();
    assert_eq!(dropped, expired);
    assert_eq!(
        partition_names(&pool).await,
        (0..=3).map(|d| day(at, d)).collect::<Vec<_>>()
    );

    // A day whose rows went to the default partition (it had no partition then) gets its
    // partition with those rows moved in, and the partition gets the table's indexes.
    // Midnight, so that `far + 1h` is the same day whatever time the suite runs at.
    let far = (now + TimeDelta::days(90))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let stranded = store_event(&pool, far + TimeDelta::hours(1)).await;
    let elsewhere = store_event(&pool, far + TimeDelta::days(10)).await;
    assert_eq!(
        home(&pool, stranded).await.unwrap(),
        "ingestion.event_store_default"
    );
    let created = retention::create_ahead(&pool, far).await.unwrap();
    assert_eq!(created, (0..=3).map(|d| day(far, d)).collect::<Vec<_>>());
    assert_eq!(
        home(&pool, stranded).await.unwrap(),
        format!("ingestion.{}", day(far, 0))
    );
    assert_eq!(
        home(&pool, elsewhere).await.unwrap(),
        "ingestion.event_store_default"
    );
    let indexes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'ingestion' AND tablename = $1",
    )
    .bind(day(far, 0))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        indexes, 5,
        "primary key, the three secondary indexes and the publish_seq BRIN (V6)"
    );
    // A lookup by event_id still finds exactly one row.
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingestion.event_store WHERE event_id = $1")
            .bind(stranded)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 1);
}

async fn insert_projection(pool: &PgPool, agg: &str, updated: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO eventhandler.projections
             (projection_id, projection_type, aggregate_id, state, last_event_id,
              last_event_timestamp, updated_at)
         VALUES ($1, 'sensor_state', $2, '{}', $1, $3, $3)",
    )
    .bind(Uuid::now_v7())
    .bind(agg)
    .bind(updated)
    .execute(pool)
    .await
    .unwrap();
}

async fn insert_dead_letter(pool: &PgPool, status: &str, updated: DateTime<Utc>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO eventhandler.dlq
             (dlq_id, consumer, error_message, failed_at, status, topic, \"partition\", \"offset\", updated_at)
         VALUES ($1, 'event-handler', 'test', $2, $3, 't', 0, $4, $2)",
    )
    .bind(id)
    .bind(updated)
    .bind(status)
    .bind(id.as_u128() as i64)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn wait_migrated(pool: &PgPool, table: &str) {
    eventually(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(pool)
            .await
            .ok()
            .filter(|b| *b)
    })
    .await;
}

async fn aggregates(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT aggregate_id FROM eventhandler.projections ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn dead_letters(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT dlq_id FROM eventhandler.dlq ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn stale_projections_and_resolved_dead_letters_are_removed_fresh_ones_stay() {
    let app = TestApp::spawn_with(&[Service::Eventhandler], |e| {
        e.insert("CJ_RETENTION_INTERVAL".into(), "1s".into());
    })
    .await;
    let pool = app.pool().await;
    wait_migrated(&pool, "eventhandler.dlq").await;
    let now = wall_clock();
    let (old, fresh) = (now - TimeDelta::days(10), now - TimeDelta::days(1));
    insert_projection(&pool, "silent-1", old).await;
    insert_projection(&pool, "silent-2", old).await;
    insert_projection(&pool, "recent", fresh).await;
    insert_projection(&pool, "current", now).await;
    let pending_old = insert_dead_letter(&pool, "pending", old).await;
    insert_dead_letter(&pool, "replayed", old).await;
    insert_dead_letter(&pool, "discarded", old).await;
    let discarded_fresh = insert_dead_letter(&pool, "discarded", fresh).await;

    eventually(Duration::from_secs(30), || async {
        (aggregates(&pool).await.len() == 2 && dead_letters(&pool).await.len() == 2).then_some(())
    })
    .await;
    assert_eq!(aggregates(&pool).await, ["current", "recent"]);
    let mut kept = vec![pending_old, discarded_fresh];
    kept.sort();
    assert_eq!(
        dead_letters(&pool).await,
        kept,
        "pending and recent entries stay"
    );

    let m = scrape(&app, Service::Eventhandler).await;
    let removed = |table| metric(&m, "cj_retention_removed_total", &[("table", table)]);
    assert_eq!(removed("eventhandler.projections"), 2.0);
    assert_eq!(removed("eventhandler.dlq"), 2.0);
}

fn retention_cli(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["retention", "run"];
    all.extend_from_slice(args);
    cli_ok(app, &all)
}

#[tokio::test]
async fn the_cli_reports_what_is_due_then_removes_it() {
    let app = TestApp::spawn_with(&[Service::Ingestion, Service::Eventhandler], |e| {
        e.insert("CJ_RETENTION_ENABLED".into(), "false".into());
    })
    .await;
    app.wait_ready().await;
    let pool = app.pool().await;
    wait_migrated(&pool, "eventhandler.dlq").await;
    let now = wall_clock();
    let old = now - TimeDelta::days(20);
    retention::create_ahead(&pool, old).await.unwrap();
    let in_partition = store_event(&pool, old).await;
    let in_default = store_event(&pool, now - TimeDelta::days(30)).await;
    let kept = store_event(&pool, now).await;
    insert_projection(&pool, "silent", old).await;
    insert_projection(&pool, "current", now).await;
    insert_dead_letter(&pool, "replayed", old).await;

    let out = retention_cli(&app, &["--dry-run"]);
    for d in 0..=3 {
        assert!(
            out.contains(&format!("partition {} (day ", day(old, d)))
                && out.contains("would be dropped"),
            "{out}"
        );
    }
    for line in [
        "ingestion.event_store_default: 1 row(s) would be deleted",
        "eventhandler.projections: 1 row(s) would be deleted",
        "eventhandler.dlq: 1 row(s) would be deleted",
        "ingestion.event_ids: 0 row(s) would be deleted",
    ] {
        assert!(out.contains(line), "{line}\n{out}");
    }
    assert!(
        home(&pool, in_partition).await.is_some(),
        "a dry run removes nothing"
    );
    assert!(home(&pool, in_default).await.is_some());
    assert_eq!(aggregates(&pool).await.len(), 2);

    let out = retention_cli(&app, &[]);
    assert!(
        out.contains(&format!("partition {} (day ", day(old, 0))),
        "{out}"
    );
    assert!(
        out.contains("ingestion.event_store_default: 1 row(s) deleted"),
        "{out}"
    );
    assert!(
        out.contains("eventhandler.projections: 1 row(s) deleted"),
        "{out}"
    );
    assert_eq!(home(&pool, in_partition).await, None);
    assert_eq!(home(&pool, in_default).await, None);
    assert!(home(&pool, kept).await.is_some());
    assert_eq!(aggregates(&pool).await, ["current"]);
    assert!(dead_letters(&pool).await.is_empty());

    // Nothing is left to do.
    let out = retention_cli(&app, &[]);
    assert!(!out.contains("dropped"), "{out}");
    assert!(
        out.contains("ingestion.event_store_default: 0 row(s) deleted"),
        "{out}"
    );
}

#[tokio::test]
async fn old_readings_and_finished_deliveries_go_pending_ones_stay() {
    let app = TestApp::spawn_with(&[Service::Tsdb, Service::Actions], |e| {
        e.insert("CJ_RETENTION_INTERVAL".into(), "1s".into());
    })
    .await;
    let pool = app.pool().await;
    wait_migrated(&pool, "tsdb.sensor_readings").await;
    wait_migrated(&pool, "actions.deliveries").await;
    let now = wall_clock();
    let old = now - TimeDelta::days(10);
    for (device, t) in [("d-old", old), ("d-new", now - TimeDelta::days(1))] {
        sqlx::query(
            "INSERT INTO tsdb.sensor_readings (time, device_id, value, unit, event_id)
             VALUES ($1, $2, 1.0, 'celsius', $3)",
        )
        .bind(t)
        .bind(device)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    }
    // An old delivered one goes; an old one still pending (its receiver is down) stays.
    for (status, agg) in [("delivered", "done"), ("pending", "waiting")] {
        sqlx::query(
            "INSERT INTO actions.deliveries
                 (delivery_id, rule_id, event_id, event_type, aggregate_id, event_at, endpoint,
                  body, status, next_attempt_at, created_at, updated_at)
             VALUES ($1, $2, $3, 'system.alert', $4, $5, 'http://127.0.0.1:9/h', '{}', $6,
                     now() + interval '1 day', $5, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(Uuid::now_v7())
        .bind(Uuid::now_v7())
        .bind(agg)
        .bind(old)
        .bind(status)
        .execute(&pool)
        .await
        .unwrap();
    }
    let devices = || async {
        sqlx::query_scalar::<_, String>("SELECT device_id FROM tsdb.sensor_readings")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let deliveries = || async {
        sqlx::query_scalar::<_, String>("SELECT aggregate_id FROM actions.deliveries")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    eventually(Duration::from_secs(30), || async {
        (devices().await.len() == 1 && deliveries().await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(devices().await, ["d-new"]);
    assert_eq!(deliveries().await, ["waiting"]);
}
