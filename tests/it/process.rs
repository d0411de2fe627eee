//! The built binary as a subprocess: startup failures, signals, health, crash safety, migrations.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use cornjacket::infra::db;
use serde_json::{Value, json};

struct Proc {
    child: Child,
    ports: HashMap<&'static str, u16>,
}

/// A failed assertion must not leave a platform running.
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(db_url: &str, prefix: &str, services: &str, extra: &[(&str, String)]) -> Proc {
    let ports: HashMap<&'static str, u16> = [
        ("CJ_INGESTION_PORT", free_port()),
        ("CJ_QUERY_PORT", free_port()),
        ("CJ_EVENTHANDLER_HEALTH_PORT", free_port()),
    ]
    .into_iter()
    .collect();
    let mut env = test_env(db_url, prefix);
    for (k, v) in &ports {
        env.insert(k.to_string(), v.to_string());
    }
    for (k, v) in extra {
        env.insert(k.to_string(), v.clone());
    }
    let mut cmd = cornjacket();
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !services.is_empty() {
        cmd.args(["--services", services]);
    }
    Proc {
        child: cmd.spawn().expect("spawn cornjacket"),
        ports,
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

async fn health(port: u16) -> Option<(u16, Value)> {
    probe(port, "/health").await
}

async fn probe(port: u16, path: &str) -> Option<(u16, Value)> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let s = r.status().as_u16();
    Some((s, r.json().await.ok()?))
}

#[tokio::test]
async fn a_taken_port_fails_startup_naming_the_port() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut p = spawn(&db.url, "x.", "", &[("CJ_QUERY_PORT", port.to_string())]);
    let status = wait_exit(&mut p.child, Duration::from_secs(10));
    assert!(!status.success());
    let err = stderr_of(&mut p.child);
    assert!(
        err.contains(&port.to_string()),
        "stderr names the port: {err}"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_every_port_reports_health() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut p = spawn(&db.url, &prefix, "", &[]);
    for (var, port) in p.ports.clone() {
        let (s, v) = eventually(Duration::from_secs(30), || async {
            health(port)
                .await
                .filter(|(s, v)| *s == 200 && v["checks"]["database"]["status"] == "healthy")
        })
        .await;
        assert_eq!(s, 200, "{var}: {v}");
    }
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(20));
    assert!(status.success(), "exit 0 after SIGTERM, got {status:?}");
}

#[tokio::test]
async fn health_is_503_when_a_service_database_is_unreachable() {
    let db = TestDb::new().await;
    let closed = format!(
        "postgres://cornjacket:cornjacket@127.0.0.1:{}/x?sslmode=disable",
        free_port()
    );
    let prefix = topic_prefix();
    let mut p = spawn(
        &db.url,
        &prefix,
        "",
        &[
            ("CJ_QUERY_DATABASE_URL", closed.clone()),
            ("CJ_DB_ACQUIRE_TIMEOUT", "1s".into()),
        ],
    );
    let query = p.ports["CJ_QUERY_PORT"];
    let ingestion = p.ports["CJ_INGESTION_PORT"];
    let (s, v) = eventually(Duration::from_secs(20), || async { health(query).await }).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["checks"]["database"]["status"], "unhealthy");
    // Readiness is the same deep check; liveness asks no dependency, so an orchestrator takes
    // the port out of traffic without restarting the process.
    let (s, r) = probe(query, "/readyz").await.unwrap();
    assert_eq!((s, &r["status"]), (503, &json!("unhealthy")), "{r}");
    let (s, l) = probe(query, "/livez").await.unwrap();
    assert_eq!((s, l), (200, json!({"status": "alive"})));
    eventually(Duration::from_secs(20), || async {
        health(ingestion).await.filter(|(s, _)| *s == 200)
    })
    .await;
    for port in [ingestion, p.ports["CJ_EVENTHANDLER_HEALTH_PORT"]] {
        assert_eq!(probe(port, "/livez").await.unwrap().0, 200, "port {port}");
        let (s, r) = probe(port, "/readyz").await.unwrap();
        assert!(s == 200 || s == 503, "port {port}: {s} {r}");
        assert!(r["checks"]["database"].is_object(), "port {port}: {r}");
    }
    signal(&p.child, "-TERM");
    assert!(wait_exit(&mut p.child, Duration::from_secs(20)).success());
}

#[tokio::test]
async fn sigkill_under_load_loses_no_accepted_event() {
    let db = TestDb::new().await;
    let prefix = topic_prefix();
    let mut p = spawn(&db.url, &prefix, "ingestion", &[]);
    let port = p.ports["CJ_INGESTION_PORT"];
    eventually(Duration::from_secs(30), || async {
        health(port)
            .await
            .filter(|(s, v)| *s == 200 && v["checks"].get("outbox").is_some())
    })
    .await;

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = reqwest::Client::new();
    // Writers stop at their first failure after the kill.
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (client, accepted, killed) = (client.clone(), accepted.clone(), killed.clone());
            tokio::spawn(async move {
                let mut i = 0;
                loop {
                    let body = json!({"event_type": "sensor.reading", "aggregate_id": format!("k{w}"),
                                      "payload": {"value": i, "unit": "c"}});
                    let r = client
                        .post(format!("http://127.0.0.1:{port}/api/v1/ingest"))
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 202 => {
                            let v: Value = r.json().await.unwrap_or_default();
                            if let Some(id) = v["event_id"].as_str() {
                                accepted.lock().unwrap().push(id.to_string());
                            }
                        }
                        _ => {
                            if killed.load(std::sync::atomic::Ordering::SeqCst) {
                                break;
                            }
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Killed in the middle of the load, once it is well under way (a loaded machine takes longer
    // to get there; a fixed delay made the test depend on the machine's speed).
    eventually(Duration::from_secs(60), || async {
        (accepted.lock().unwrap().len() > 200).then_some(())
    })
    .await;
    signal(&p.child, "-KILL");
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = wait_exit(&mut p.child, Duration::from_secs(10));
    for w in writers {
        w.await.unwrap();
    }
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 50, "load was running: {}", accepted.len());

    let mut p2 = spawn(&db.url, &prefix, "ingestion", &[]);
    let pool = db.pool().await;
    eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ingestion.outbox")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
    let stored: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM ingestion.event_store")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    for id in &accepted {
        assert!(stored.contains(id), "accepted {id} is in the event store");
    }
    // Duplicates after a kill are allowed, so read until every accepted id was seen.
    let wanted: HashSet<String> = accepted.iter().cloned().collect();
    let recs = read_topics_until(
        &brokers(),
        &[format!("{prefix}sensor-events")],
        Duration::from_secs(30),
        move |recs| {
            let seen: HashSet<&String> = recs.iter().map(|r| &r.headers["event_id"]).collect();
            wanted.iter().all(|id| seen.contains(id))
        },
    )
    .await;
    let on_bus: HashSet<String> = recs.iter().map(|r| r.headers["event_id"].clone()).collect();
    for id in &accepted {
        assert!(on_bus.contains(id), "accepted {id} is on the bus");
    }
    eprintln!(
        "accepted {}, stored {}, bus records {} (duplicates {})",
        accepted.len(),
        stored.len(),
        recs.len(),
        recs.len() - on_bus.len()
    );
    signal(&p2.child, "-TERM");
    assert!(wait_exit(&mut p2.child, Duration::from_secs(20)).success());
}

async fn history(pool: &sqlx::PgPool, schema: &str) -> Vec<i32> {
    sqlx::query_scalar(&format!(
        "SELECT version FROM {schema}.refinery_schema_history ORDER BY version"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_are_idempotent_separate_and_safe_to_race() {
    let db = TestDb::new().await;
    // Two concurrent runs per service: both succeed, each migration applied once.
    let (a, b, c, d) = tokio::join!(
        db::migrate(&db.url, &cornjacket::services::ingestion::MIGRATIONS),
        db::migrate(&db.url, &cornjacket::services::ingestion::MIGRATIONS),
        db::migrate(&db.url, &cornjacket::services::eventhandler::MIGRATIONS),
        db::migrate(&db.url, &cornjacket::services::eventhandler::MIGRATIONS),
    );
    let applied = |r: &refinery::Report| r.applied_migrations().len();
    let embedded = |m: &db::Migrations| -> Vec<i32> {
        let mut v: Vec<i32> = (m.runner)()
            .get_migrations()
            .iter()
            .map(|m| m.version())
            .collect();
        v.sort();
        v
    };
    let (a, b, c, d) = (a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap());
    let ingestion = embedded(&cornjacket::services::ingestion::MIGRATIONS);
    let eventhandler = embedded(&cornjacket::services::eventhandler::MIGRATIONS);
    assert_eq!(
        applied(&a) + applied(&b),
        ingestion.len(),
        "each applied once"
    );
    assert_eq!(
        applied(&c) + applied(&d),
        eventhandler.len(),
        "each applied once"
    );
    // Again: a no-op.
    assert_eq!(
        applied(
            &db::migrate(&db.url, &cornjacket::services::ingestion::MIGRATIONS)
                .await
                .unwrap()
        ),
        0
    );
    let pool = db.pool().await;
    assert_eq!(
        history(&pool, "ingestion").await,
        ingestion,
        "its own history"
    );
    assert_eq!(
        history(&pool, "eventhandler").await,
        eventhandler,
        "its own history"
    );
    // The CLI does the same and exits 0.
    let out = cornjacket()
        .args(["migrate"])
        .env("CJ_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_bad_configuration_value_stops_startup_with_its_name() {
    let out = cornjacket()
        .args(["serve"])
        .env("CJ_OUTBOX_WORKER_COUNT", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CJ_OUTBOX_WORKER_COUNT") && err.contains("integer"),
        "{err}"
    );
}
