//! The short variant of the chaos run, in `make test` (`make chaos` runs it with longer faults):
//! one fault of each kind under a steady load, one after the other once the platform recovered,
//! against the platform as a process of its own — its broker stopped (an in-memory Tansu, so it
//! comes back empty) and started (the full run only, see [`Durations::broker_loss`]); the
//! database blackholed (a proxy that stops forwarding without
//! closing); every database connection cut at once (what a PostgreSQL restart looks like from the
//! platform); SIGKILL and a restart — then the ledger: every accepted event is stored exactly
//! once, in its aggregate's order, on the bus, and projected. Each fault's figures are printed. (The MQTT broker restarting under the platform
//! is `mqtt::the_subscriber_reconnects_after_a_broker_restart`; the shared PostgreSQL itself is
//! never restarted, since tests run in parallel on it.)

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::*;

const DEVICES: usize = 12;

/// How long each fault lasts: the short variant by default, the durations with
/// `CJ_CHAOS_FULL=1` (`make chaos`).
struct Durations {
    /// Whether the broker is stopped and comes back empty. Only in the full run: under the load
    /// of a parallel `make test`, the event handler then sat without partitions for 90 s
    /// ("Subscribed topic not available: …user-actions"), a fault of the recovery after a broker
    /// loss recorded in the [Broker restart] issue, which `make chaos` reproduces.
    broker_loss: bool,
    broker_down: Duration,
    blackhole: Duration,
    cut: Duration,
    /// Events accepted between faults.
    between: usize,
}

fn durations() -> Durations {
    if std::env::var("CJ_CHAOS_FULL").is_ok_and(|v| v == "1") {
        Durations {
            broker_loss: true,
            broker_down: Duration::from_secs(30),
            blackhole: Duration::from_secs(10),
            cut: Duration::from_secs(10),
            between: 2_000,
        }
    } else {
        Durations {
            broker_loss: false,
            broker_down: Duration::from_secs(8),
            blackhole: Duration::from_secs(8),
            cut: Duration::from_secs(3),
            between: 50,
        }
    }
}

struct Platform {
    child: Child,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(env: &HashMap<String, String>) -> Platform {
    let mut cmd = cornjacket();
    cmd.args(["serve", "--services", "ingestion,eventhandler"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdout(chaos_log())
        .stderr(chaos_log());
    Platform {
        child: cmd.spawn().expect("spawn cornjacket"),
    }
}

/// The platform's log, appended across its restarts: `$TMPDIR/cornjacket-chaos-<pid>.log`.
fn chaos_log() -> Stdio {
    let path = std::env::temp_dir().join(format!("cornjacket-chaos-{}.log", std::process::id()));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    }
}

/// (device, its sequence number, the event id) of every 202.
type Ledger = Arc<Mutex<Vec<(usize, u64, Uuid)>>>;

async fn accepted_now(ledger: &Ledger) -> usize {
    ledger.lock().unwrap().len()
}

/// Until `n` more events than now were accepted: the load goes on after the fault.
async fn more_accepted(ledger: &Ledger, n: usize, within: Duration) -> Duration {
    let start = Instant::now();
    let from = accepted_now(ledger).await;
    eventually(within, || async {
        (accepted_now(ledger).await >= from + n).then_some(())
    })
    .await;
    start.elapsed()
}

/// Until the event handler consumes again (partitions assigned): each fault comes once the
/// platform has recovered from the previous one. (A broker that loses its memory while a
/// restarted consumer is still joining can leave it without partitions for minutes; see the
/// [Broker restart] issue.)
async fn consuming(http: &reqwest::Client, eh_port: u16) -> Duration {
    let start = Instant::now();
    loop {
        let v: Value = match http
            .get(format!("http://127.0.0.1:{eh_port}/health"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        if v["checks"]["consumer"]["assigned_partitions"].as_u64() > Some(0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the event handler has not consumed for 90 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Until every device's projection holds at least the value of its entry in `targets`.
async fn projected(
    pool: &sqlx::PgPool,
    http: &reqwest::Client,
    eh_port: u16,
    last_sent: &HashMap<usize, u64>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: Vec<(String, Value)> = sqlx::query_as(
            "SELECT aggregate_id, state FROM eventhandler.projections
              WHERE projection_type = 'sensor_state' AND aggregate_id LIKE 'chaos-%'",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        let got: HashMap<String, i64> = rows
            .iter()
            .filter_map(|(a, s)| Some((a.clone(), s["value"].as_f64()? as i64)))
            .collect();
        let behind: Vec<String> = last_sent
            .iter()
            .filter(|(d, seq)| {
                got.get(&format!("chaos-{d}"))
                    .is_none_or(|v| *v < **seq as i64)
            })
            .map(|(d, seq)| {
                format!(
                    "chaos-{d}: projected {:?}, last sent {seq}",
                    got.get(&format!("chaos-{d}"))
                )
            })
            .collect();
        if behind.is_empty() {
            break;
        }
        let health = http
            .get(format!("http://127.0.0.1:{eh_port}/health"))
            .send()
            .await
            .ok();
        let health = match health {
            Some(r) => r.text().await.unwrap_or_default(),
            None => "unreachable".into(),
        };
        assert!(
            Instant::now() < deadline,
            "the event handler says {health}; projections never caught up ({} rows): {behind:?}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fault_of_each_kind_under_load_loses_and_reorders_nothing() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut broker = OwnBroker::start();
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let mut env = test_env(&with_host(&db.url, &proxy.addr.to_string()), &prefix);
    let port = free_port();
    let eh_port = free_port();
    for (k, v) in [
        ("CJ_INGESTION_PORT", port.to_string()),
        ("CJ_EVENTHANDLER_HEALTH_PORT", eh_port.to_string()),
        ("CJ_KAFKA_BROKERS", broker.brokers()),
        ("CJ_KAFKA_MESSAGE_TIMEOUT", "3s".into()),
        ("CJ_OUTBOX_BUS_WATCH_INTERVAL", "500ms".into()),
        ("CJ_DB_ACQUIRE_TIMEOUT", "1s".into()),
        ("CJ_INGESTION_REQUEST_TIMEOUT", "2s".into()),
        ("CJ_DB_STATEMENT_TIMEOUT", "2s".into()),
        ("CJ_DB_RESPONSE_TIMEOUT", "3s".into()),
        ("CJ_DB_IDLE_IN_TRANSACTION_TIMEOUT", "4s".into()),
        ("CJ_EVENTHANDLER_RETRY_DELAYS", "0s,100ms".into()),
        ("CJ_LOG_LEVEL", "warn,librdkafka=off,rdkafka=off".into()),
    ] {
        env.insert(k.into(), v);
    }
    let platform = spawn(&env);
    let ingest = format!("http://127.0.0.1:{port}/api/v1/ingest");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let ready = |http: reqwest::Client| async move {
        eventually(Duration::from_secs(60), || async {
            let r = http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await
    };
    ready(http.clone()).await;

    // The load: each device sends its readings one after another, each under an event id of
    // its own, sent again (the same id and body) after any failure until it is accepted — as a
    // careful client does — so a device's accepted order is its sequence order.
    let ledger: Ledger = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..DEVICES)
        .map(|d| {
            let (http, url, ledger, stop) =
                (http.clone(), ingest.clone(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let id = Uuid::now_v7();
                    let body = json!({"event_id": id, "event_type": "sensor.reading",
                        "aggregate_id": format!("chaos-{d}"),
                        "payload": {"value": seq, "unit": "count"}});
                    loop {
                        match http.post(&url).json(&body).send().await {
                            Ok(r) if r.status() == 202 => break,
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                    ledger.lock().unwrap().push((d, seq, id));
                    seq += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    more_accepted(&ledger, 200, Duration::from_secs(60)).await;
    consuming(&http, eh_port).await;
    let mut figures = Vec::new();
    let t = durations();

    // 1. The broker stopped; it comes back empty (memory storage). What the new broker must
    // hold afterwards: everything accepted from then on (and what the platform republishes: what
    // it had not seen consumed before the broker lost it). Without this fault, everything.
    let mut after_restart = 0;
    if t.broker_loss {
        let at = accepted_now(&ledger).await;
        broker.stop();
        tokio::time::sleep(t.broker_down).await;
        let during = accepted_now(&ledger).await - at;
        broker.restart();
        after_restart = accepted_now(&ledger).await;
        let back = more_accepted(&ledger, t.between, Duration::from_secs(90)).await;
        let consumes = consuming(&http, eh_port).await + back;
        figures.push(format!(
            "broker down {:?}: {during} accepted meanwhile (the outbox holds them), {} more {back:.1?} after, consuming again after {consumes:.1?}",
            t.broker_down, t.between
        ));
    }

    // 2. The database blackholed.
    let at = accepted_now(&ledger).await;
    proxy.blackhole();
    tokio::time::sleep(t.blackhole).await;
    let during = accepted_now(&ledger).await - at;
    proxy.restore();
    let back = more_accepted(&ledger, t.between, Duration::from_secs(90)).await;
    figures.push(format!(
        "database blackholed {:?}: {during} accepted meanwhile, {} more {back:.1?} after it answered",
        t.blackhole, t.between
    ));

    // 3. Every database connection cut, new ones refused (a PostgreSQL restart).
    proxy.cut();
    tokio::time::sleep(t.cut).await;
    proxy.restore();
    let back = more_accepted(&ledger, t.between, Duration::from_secs(90)).await;
    figures.push(format!(
        "database connections cut for {:?}: {} more accepted {back:.1?} after",
        t.cut, t.between
    ));

    // 4. SIGKILL, and a restart on the same ports: last, because on Tansu 0.6 the restarted
    // event handler does not get its partitions back (the killed member is never evicted from
    // its group: `consuming` sat at 0 partitions for 90 s in 4 runs of 4), a known fault of
    // the local broker recorded in the [Broker restart] issue. So the ledger checks what the
    // restarted ingestion accepted as stored, ordered and published, and the projections up to
    // the kill.
    let projected_before_kill: HashMap<usize, u64> =
        ledger
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, a| {
                m.insert(a.0, a.1);
                m
            });
    // The event handler first catches up with what was accepted so far.
    projected(&db.pool().await, &http, eh_port, &projected_before_kill).await;
    let at = accepted_now(&ledger).await;
    drop(platform); // SIGKILL, then waited for
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _platform = spawn(&env);
    let back = more_accepted(&ledger, t.between, Duration::from_secs(90)).await;
    figures.push(format!(
        "SIGKILL at {at} accepted: {} more {back:.1?} after the restart",
        t.between
    ));

    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let accepted: Vec<(usize, u64, Uuid)> = ledger.lock().unwrap().clone();

    // The ledger. Every accepted event stored exactly once (read past the proxy).
    let pool = db.pool().await;
    eventually(Duration::from_secs(90), || async {
        (count_rows(&pool, "ingestion.outbox").await == 0).then_some(())
    })
    .await;
    let stored: Vec<(Uuid, String, Value)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, payload FROM ingestion.event_store
          WHERE aggregate_id LIKE 'chaos-%' ORDER BY publish_seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ids: HashSet<Uuid> = stored.iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), stored.len(), "an event stored twice");
    for (d, seq, id) in &accepted {
        assert!(
            ids.contains(id),
            "accepted chaos-{d} #{seq} ({id}) is not stored"
        );
    }
    assert_eq!(
        stored.len(),
        accepted.len(),
        "stored only what was accepted"
    );
    // In each aggregate's order: published (publish_seq) as sent.
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, agg, payload) in &stored {
        let v = payload["value"].as_i64().unwrap();
        if let Some(prev) = last.insert(agg.clone(), v) {
            assert_eq!(v, prev + 1, "{agg}: {v} published after {prev}");
        }
    }
    // On the bus: everything accepted after the broker came back, or all of it when it never
    // went. (What was consumed before it lost its memory is not republished; the projections
    // below show it was consumed.)
    let wanted: HashSet<String> = accepted[after_restart..]
        .iter()
        .map(|a| a.2.to_string())
        .collect();
    let want = wanted.clone();
    let recs = read_topics_until(
        &broker.brokers(),
        &[format!("{prefix}sensor-events")],
        Duration::from_secs(60),
        move |recs| {
            let seen: HashSet<&String> = recs.iter().map(|r| &r.headers["event_id"]).collect();
            want.iter().all(|id| seen.contains(id))
        },
    )
    .await;
    let on_bus: HashSet<&String> = recs.iter().map(|r| &r.headers["event_id"]).collect();
    let missing = wanted.iter().filter(|id| !on_bus.contains(id)).count();
    assert_eq!(
        missing, 0,
        "accepted after the broker restart but not on the bus"
    );
    let last_sent = projected_before_kill;
    projected(&pool, &http, eh_port, &last_sent).await;
    eprintln!(
        "chaos: {} events accepted from {DEVICES} devices, all stored once and in order, projected up to the kill; the bus holds {} records for the {} it must ({} more: republished or redelivered, at-least-once); {}",
        accepted.len(),
        recs.len(),
        accepted.len() - after_restart,
        recs.len().saturating_sub(accepted.len() - after_restart),
        figures.join("; ")
    );
}
