//! How the consumers sort failures (SPEC §7, ADR-0004), against the real PostgreSQL and broker:
//! a database that refuses every write for a reason of its own (a table renamed mid-rollout, a
//! privilege revoked) blocks the consumer — nothing dead-lettered, `/health` says why — until it
//! is fixed, and then every message lands once, in order; a write refused for the message's own
//! data is retried on the schedule before it is dead-lettered; bytes that are not an envelope
//! go to the DLQ without retries.

use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, TimeDelta, Utc};
use cornjacket::services::Service;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// A `sensor.reading` envelope as the outbox processor puts it on the bus.
fn envelope(device: &str, payload: Value, second: u32) -> Vec<u8> {
    let t = format!("2026-01-01T00:00:{second:02}.000000Z");
    json!({"event_id": Uuid::now_v7(), "event_type": "sensor.reading", "aggregate_id": device,
           "event_time": t, "ingested_at": t, "payload": payload,
           "metadata": {"source": "http", "schema_version": 1}})
    .to_string()
    .into_bytes()
}

fn reading(device: &str, value: f64, second: u32) -> Vec<u8> {
    envelope(device, json!({"value": value, "unit": "celsius"}), second)
}

async fn health(app: &TestApp, svc: Service) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(svc, "/health"))
        .send()
        .await
        .expect("health request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the service's consumer has partitions assigned.
async fn wait_consuming(app: &TestApp, svc: Service) {
    eventually(Duration::from_secs(45), || async {
        let (_, v) = health(app, svc).await;
        (v["checks"]["consumer"]["assigned_partitions"].as_u64() > Some(0)).then_some(())
    })
    .await;
}

/// Logs every row a consumer writes into `table`, in commit order, with its `value` (the
/// consumers run with batches of one, so each message is its own transaction).
async fn log_writes(pool: &PgPool, table: &str, value: &str) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE public.written (seq bigserial PRIMARY KEY, value float8);
         CREATE FUNCTION public.log_written() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO public.written (value) VALUES ({value}); RETURN NEW; END $$;
         CREATE TRIGGER log_written AFTER INSERT OR UPDATE ON {table}
             FOR EACH ROW EXECUTE FUNCTION public.log_written();"
    ))
    .execute(pool)
    .await
    .expect("install the write log");
}

async fn written(pool: &PgPool) -> Vec<f64> {
    sqlx::query_scalar("SELECT value FROM public.written ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

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

/// While the database refuses every write: `/health` is 503 and names the SQLSTATE, the blocked
/// counter moves, and the DLQ stays empty even after the retry schedule
/// would have run out many times over.
async fn assert_blocked(app: &TestApp, svc: Service, group: &str, dlq: &str, sqlstate: &str) {
    let pool = app.pool().await;
    let h = eventually(Duration::from_secs(30), || async {
        let letters = count_rows(&pool, dlq).await;
        assert_eq!(letters, 0, "an outage dead-lettered {letters} message(s)");
        let (s, v) = health(app, svc).await;
        let reason = v["checks"]["processing"]["blocked"].as_str()?.to_string();
        (s == 503 && reason.contains(sqlstate)).then_some(v)
    })
    .await;
    assert_eq!(h["status"], "unhealthy", "{h}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count_rows(&pool, dlq).await,
        0,
        "an outage never fills the DLQ"
    );
    let m = scrape(app, svc).await;
    assert!(metric(&m, "cj_consumer_blocked_total", &[("consumer", group)]) > 0.0);
    assert_eq!(
        metric(&m, "cj_dlq_written_total", &[("consumer", group)]),
        0.0
    );
}

/// After the fix: healthy again, every message written once and in order, nothing dead-lettered.
async fn assert_caught_up(app: &TestApp, svc: Service, group: &str, dlq: &str, n: usize) {
    let pool = app.pool().await;
    let want: Vec<f64> = (1..=n).map(|v| v as f64).collect();
    eventually(Duration::from_secs(45), || async {
        (written(&pool).await.len() >= n).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        (health(app, svc).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(written(&pool).await, want, "each message once, in order");
    assert_eq!(count_rows(&pool, dlq).await, 0);
    let m = scrape(app, svc).await;
    assert_eq!(
        metric(&m, "cj_consumer_applied_total", &[("consumer", group)]),
        n as f64
    );
}

#[tokio::test]
async fn a_table_renamed_under_the_event_handler_blocks_it_without_dead_letters_then_it_catches_up_in_order()
 {
    let app = TestApp::spawn_with(&[Service::Eventhandler], |e| {
        e.insert("CJ_EVENTHANDLER_MAX_BATCH".into(), "1".into());
        e.insert("CJ_EVENTHANDLER_RETRY_DELAYS".into(), "0s,100ms".into());
    })
    .await;
    let group = app.config.eventhandler.consumer_group.clone();
    let pool = app.pool().await;
    wait_migrated(&pool, "eventhandler.projections").await;
    log_writes(
        &pool,
        "eventhandler.projections",
        "(NEW.state->>'value')::float8",
    )
    .await;
    wait_consuming(&app, Service::Eventhandler).await;
    let topic = app.topic("sensor-events");
    produce_raw(&topic, "dev", &reading("dev", 1.0, 1)).await;
    eventually(Duration::from_secs(30), || async {
        (written(&pool).await == [1.0]).then_some(())
    })
    .await;

    // A rollout renames the table the handler writes to (SQLSTATE 42P01 undefined_table).
    sqlx::query("ALTER TABLE eventhandler.projections RENAME TO projections_moved")
        .execute(&pool)
        .await
        .unwrap();
    for v in 2..=6 {
        produce_raw(&topic, "dev", &reading("dev", v as f64, v)).await;
    }
    assert_blocked(
        &app,
        Service::Eventhandler,
        &group,
        "eventhandler.dlq",
        "42P01",
    )
    .await;

    sqlx::query("ALTER TABLE eventhandler.projections_moved RENAME TO projections")
        .execute(&pool)
        .await
        .unwrap();
    assert_caught_up(&app, Service::Eventhandler, &group, "eventhandler.dlq", 6).await;
    let state: Value =
        sqlx::query_scalar("SELECT state FROM eventhandler.projections WHERE aggregate_id = 'dev'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state["value"], 6.0);
}

#[tokio::test]
async fn a_privilege_revoked_from_the_tsdb_writer_blocks_it_without_dead_letters_then_it_catches_up_in_order()
 {
    let app = TestApp::spawn_with(&[Service::Tsdb], |e| {
        e.insert("CJ_TSDB_MAX_BATCH".into(), "1".into());
        e.insert("CJ_TSDB_RETRY_DELAYS".into(), "0s,100ms".into());
    })
    .await;
    let group = app.config.tsdb.consumer_group.clone();
    let pool = app.pool().await;
    wait_migrated(&pool, "tsdb.sensor_readings").await;
    log_writes(&pool, "tsdb.sensor_readings", "NEW.value").await;
    wait_consuming(&app, Service::Tsdb).await;
    let topic = app.topic("sensor-events");
    produce_raw(&topic, "dev", &reading("dev", 1.0, 1)).await;
    eventually(Duration::from_secs(30), || async {
        (written(&pool).await == [1.0]).then_some(())
    })
    .await;

    // The writer's role loses INSERT on its table (SQLSTATE 42501 insufficient_privilege). The
    // test database's owner is the role the services use; an owner may revoke its own grants.
    sqlx::query("REVOKE INSERT ON tsdb.sensor_readings FROM CURRENT_USER")
        .execute(&pool)
        .await
        .unwrap();
    for v in 2..=6 {
        produce_raw(&topic, "dev", &reading("dev", v as f64, v)).await;
    }
    assert_blocked(&app, Service::Tsdb, &group, "tsdb.dlq", "42501").await;

    sqlx::query("GRANT INSERT ON tsdb.sensor_readings TO CURRENT_USER")
        .execute(&pool)
        .await
        .unwrap();
    assert_caught_up(&app, Service::Tsdb, &group, "tsdb.dlq", 6).await;
    assert_eq!(count_rows(&pool, "tsdb.sensor_readings").await, 6);
}

#[derive(Debug, sqlx::FromRow)]
struct Letter {
    error_message: String,
    retry_count: i32,
    failed_at: DateTime<Utc>,
}

#[tokio::test]
async fn refusals_are_retried_on_the_schedule_before_the_dlq_and_garbage_goes_there_at_once() {
    // The schedule of SPEC §7 as configured by default: at once, after 1 s, after 2 s.
    let app = TestApp::spawn(&[Service::Eventhandler]).await;
    assert_eq!(
        app.config.eventhandler.retry_delays,
        [0, 1, 2].map(Duration::from_secs)
    );
    let pool = app.pool().await;
    wait_migrated(&pool, "eventhandler.dlq").await;
    wait_consuming(&app, Service::Eventhandler).await;
    let topic = app.topic("sensor-events");
    let t0: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();

    // Not an envelope; refused by its handler; refused by the database for its data (jsonb
    // has no NUL: SQLSTATE 22P05); and a good one.
    produce_raw(&topic, "garbage", b"\x00not json at all").await;
    produce_raw(
        &topic,
        "handler",
        &envelope("handler", json!({"value": "hot", "unit": "celsius"}), 1),
    )
    .await;
    produce_raw(
        &topic,
        "database",
        &envelope("database", json!({"value": 1.0, "unit": "c\u{0}"}), 1),
    )
    .await;
    produce_raw(&topic, "good", &reading("good", 2.0, 1)).await;

    let letters: Vec<Letter> = eventually(Duration::from_secs(45), || async {
        let rows: Vec<Letter> = sqlx::query_as(
            "SELECT error_message, retry_count, failed_at FROM eventhandler.dlq ORDER BY failed_at",
        )
        .fetch_all(&pool)
        .await
        .ok()?;
        (rows.len() == 3).then_some(rows)
    })
    .await;
    let find = |needle: &str| {
        letters
            .iter()
            .find(|l| l.error_message.contains(needle))
            .unwrap_or_else(|| panic!("a dead letter for {needle}: {letters:?}"))
    };
    let garbage = find("undecodable");
    assert_eq!(garbage.retry_count, 0, "retrying garbage cannot help");
    let schedule = TimeDelta::seconds(3);
    for refused in [find("payload.value"), find("22P05")] {
        assert_eq!(refused.retry_count, 3, "{refused:?}");
        assert!(
            refused.failed_at - t0 >= schedule,
            "dead-lettered only after the schedule's 0 + 1 + 2 s: {refused:?}, produced after {t0}"
        );
    }
    assert!(find("22P05").error_message.starts_with("write refused"));
    let good: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM eventhandler.projections WHERE aggregate_id = 'good'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(good, 1, "the good message is applied");
    let m = scrape(&app, Service::Eventhandler).await;
    let group = app.config.eventhandler.consumer_group.as_str();
    assert_eq!(
        metric(&m, "cj_dlq_written_total", &[("consumer", group)]),
        3.0
    );
    assert_eq!(
        metric(&m, "cj_consumer_blocked_total", &[("consumer", group)]),
        0.0,
        "a refusal never blocks"
    );
}
