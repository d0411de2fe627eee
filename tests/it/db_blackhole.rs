//! A database that stops answering without closing its connections — a blackhole, not a reset —
//! against the real PostgreSQL behind a test proxy: ingestion answers 503 quickly meanwhile, and
//! once the database answers again, 202 within seconds, and the outbox drains.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::*;
use cornjacket::services::Service;
use serde_json::{Value, json};

fn reading(device: &str, value: f64) -> Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": value, "unit": "celsius"}})
}

/// Ingests `n` events at once; the event_ids of those answered 202, and every status.
async fn ingest_many(app: &TestApp, tag: &str, n: usize) -> (Vec<String>, Vec<(u16, Duration)>) {
    let results = futures::future::join_all((0..n).map(|i| async move {
        let started = Instant::now();
        let r = app
            .http
            .post(app.url(Service::Ingestion, "/api/v1/ingest"))
            .json(&reading(&format!("{tag}{}", i % 5), i as f64))
            .send()
            .await
            .expect("ingestion answers (the client gives up after 30 s)");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (status, started.elapsed(), body)
    }))
    .await;
    let accepted = results
        .iter()
        .filter(|(s, _, _)| *s == 202)
        .map(|(_, _, b)| b["event_id"].as_str().expect("event_id").to_string())
        .collect();
    let statuses = results.iter().map(|(s, d, _)| (*s, *d)).collect();
    (accepted, statuses)
}

async fn stored_ids(pool: &sqlx::PgPool) -> HashSet<String> {
    sqlx::query_scalar::<_, String>("SELECT event_id::text FROM ingestion.event_store")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn blackholed_database_answers_503_fast_then_202_within_seconds_and_the_outbox_drains() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let prefix = topic_prefix();
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    for (k, v) in [
        ("CJ_DB_ACQUIRE_TIMEOUT", "1s"),
        ("CJ_INGESTION_REQUEST_TIMEOUT", "2s"),
        ("CJ_DB_STATEMENT_TIMEOUT", "2s"),
        ("CJ_DB_RESPONSE_TIMEOUT", "3s"),
        ("CJ_KAFKA_MESSAGE_TIMEOUT", "3s"),
        ("CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT", "4s"),
    ] {
        env.insert(k.into(), v.into());
    }
    let app = TestApp::start(db, prefix, env, &[Service::Ingestion]).await;
    app.wait_ready().await;
    // Straight to PostgreSQL, past the proxy.
    let direct = app.pool().await;

    // Warm up: the pool fills with connections through the proxy, the ones the blackhole takes.
    // The short acquire timeout can refuse a request on a loaded machine; only 202s count.
    let mut accepted: Vec<String> = Vec::new();
    for round in 0..3 {
        accepted.extend(ingest_many(&app, &format!("w{round}-"), 16).await.0);
    }
    assert!(!accepted.is_empty(), "ingestion works before the blackhole");
    eventually(Duration::from_secs(30), || async {
        (count_rows(&direct, "ingestion.outbox").await == 0).then_some(())
    })
    .await;

    proxy.blackhole();
    // While blackholed: every request is answered, with 503, about when the request timeout
    // says — none hangs on a connection that will never answer.
    let until = Instant::now() + Duration::from_secs(6);
    let mut during = 0;
    while Instant::now() < until {
        let (ok, statuses) = ingest_many(&app, "b-", 8).await;
        assert!(ok.is_empty(), "nothing is accepted without a database");
        for (status, took) in statuses {
            assert_eq!(status, 503, "unavailable, not an error");
            assert!(
                took < Duration::from_secs(6),
                "answered in {took:?}, no hang"
            );
            during += 1;
        }
    }
    assert!(during >= 8);
    let started = Instant::now();
    let h = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .expect("health answers");
    assert_eq!(h.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "health does not hang"
    );

    proxy.restore();
    let restored = Instant::now();
    // The blackholed connections stay open and silent: only discarding them brings ingestion
    // back. Back means a burst of concurrent requests is accepted whole — a single 202 can ride
    // the one fresh connection while the pool still holds silent ones (seen on a loaded machine:
    // the first 202, then 503s on the pool's timeout for a second more).
    // Every 202 of the bursts counts as accepted, the partial ones too.
    let during_recovery = std::sync::Mutex::new(Vec::new());
    eventually(Duration::from_secs(10), || async {
        let (ok, statuses) = ingest_many(&app, "r-", 8).await;
        during_recovery.lock().unwrap().extend(ok);
        statuses.iter().all(|(s, _)| *s == 202).then_some(())
    })
    .await;
    let back_after = restored.elapsed();
    assert!(
        back_after < Duration::from_secs(8),
        "a burst accepted whole {back_after:?} after the database answered"
    );
    accepted.extend(during_recovery.into_inner().unwrap());
    let (ok, statuses) = ingest_many(&app, "a-", 20).await;
    assert!(
        statuses.iter().all(|(s, _)| *s == 202),
        "every request accepted once recovered: {statuses:?}"
    );
    accepted.extend(ok);

    // The outbox drains: every accepted event reaches the event store.
    eventually(Duration::from_secs(40), || async {
        let stored = stored_ids(&direct).await;
        (count_rows(&direct, "ingestion.outbox").await == 0
            && accepted.iter().all(|id| stored.contains(id)))
        .then_some(())
    })
    .await;
}
