//! `/metrics` moves with the work (SPEC §13): events accepted and published, the outbox backlog
//! and its age, publish latency and failures, projection updates, dead letters written and
//! waiting, and consumer lag per group and partition — scraped from the ingestion and event
//! handler ports before and after.
//!
//! The registry is process-wide; exact deltas rely on nextest running each test in its own
//! process (keep one test per file here if that ever changes).

use std::time::Duration;

use crate::common::*;
use cornjacket::services::Service;
use cornjacket::services::ingestion::processor::LOCK_NAMESPACE;
use cornjacket::services::ingestion::writer::shard_of;
use serde_json::json;

fn reading(device: &str) -> serde_json::Value {
    json!({"event_type": "sensor.reading", "aggregate_id": device,
           "payload": {"value": 20.5, "unit": "c"}})
}

#[tokio::test]
async fn metrics_move_by_what_was_ingested_published_projected_and_dead_lettered() {
    let app = TestApp::spawn_with(&[Service::Ingestion, Service::Eventhandler], |e| {
        e.insert(
            "CJ_EVENTHANDLER_RETRY_DELAYS".into(),
            "0s,100ms,200ms".into(),
        );
    })
    .await;
    app.wait_ready().await;
    let group = app.config.eventhandler.consumer_group.clone();
    let group = group.as_str();
    let sensor = app.topic("sensor-events");
    let pool = app.pool().await;

    let ing0 = scrape(&app, Service::Ingestion).await;
    let eh0 = scrape(&app, Service::Eventhandler).await;
    let accepted = |m: &[Sample]| metric(m, "cj_events_accepted_total", &[("source", "http")]);
    let published = |m: &[Sample]| metric(m, "cj_outbox_published_total", &[]);
    let publishes = |m: &[Sample]| metric(m, "cj_outbox_publish_seconds_count", &[]);
    let failures = |m: &[Sample]| metric(m, "cj_outbox_publish_failures_total", &[]);
    let updates = |m: &[Sample]| metric(m, "cj_projection_updates_total", &[]);
    let dlq_written = |m: &[Sample]| metric(m, "cj_dlq_written_total", &[("consumer", group)]);
    let dlq_pending = |m: &[Sample]| {
        metric(
            m,
            "cj_dlq_entries",
            &[("consumer", group), ("status", "pending")],
        )
    };
    assert!(
        ing0.iter()
            .any(|s| s.name == "cj_outbox_publish_failures_total"),
        "publish failures are exported from the start"
    );
    assert_eq!(metric(&ing0, "cj_outbox_backlog", &[]), 0.0);
    assert!(
        eh0.iter().any(|s| s.name == "cj_dlq_entries"),
        "dead letters are exported (at 0) from the start"
    );
    assert_eq!(dlq_pending(&eh0), 0.0);

    // Hold one aggregate's shard the way a busy worker would: its event waits in the outbox.
    let mut held = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1::int4, $2::int4)")
        .bind(LOCK_NAMESPACE)
        .bind(i32::from(shard_of("held")))
        .execute(&mut *held)
        .await
        .unwrap();
    assert_eq!(app.ingest(reading("held")).await.0, 202);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let waiting = scrape(&app, Service::Ingestion).await;
    assert_eq!(metric(&waiting, "cj_outbox_backlog", &[]), 1.0);
    let age = metric(&waiting, "cj_outbox_oldest_age_seconds", &[]);
    assert!(age >= 0.5, "oldest row age {age}");
    held.rollback().await.unwrap();

    for d in ["m1", "m2", "m3", "m4"] {
        assert_eq!(app.ingest(reading(d)).await.0, 202);
    }
    produce_raw(&sensor, "poison", b"not an envelope").await;

    let (ing1, eh1) = eventually(Duration::from_secs(45), || async {
        let ing = scrape(&app, Service::Ingestion).await;
        let eh = scrape(&app, Service::Eventhandler).await;
        // The backlog gauges are sampled: a scrape between the publish and the move out of the
        // outbox still sees the rows.
        let done = published(&ing) - published(&ing0) >= 5.0
            && metric(&ing, "cj_outbox_backlog", &[]) == 0.0
            && updates(&eh) - updates(&eh0) >= 5.0
            && dlq_pending(&eh) >= 1.0;
        done.then_some((ing, eh))
    })
    .await;
    assert_eq!(accepted(&ing1) - accepted(&ing0), 5.0);
    assert_eq!(published(&ing1) - published(&ing0), 5.0);
    let batches = publishes(&ing1) - publishes(&ing0);
    assert!((1.0..=5.0).contains(&batches), "{batches} publish batches");
    assert_eq!(failures(&ing1) - failures(&ing0), 0.0);
    assert_eq!(metric(&ing1, "cj_outbox_backlog", &[]), 0.0);
    assert_eq!(metric(&ing1, "cj_outbox_oldest_age_seconds", &[]), 0.0);
    assert_eq!(updates(&eh1) - updates(&eh0), 5.0);
    assert_eq!(dlq_written(&eh1) - dlq_written(&eh0), 1.0);
    assert_eq!(dlq_pending(&eh1), 1.0);
    assert_eq!(
        metric(&eh1, "cj_consumer_applied_total", &[("consumer", group)])
            - metric(&eh0, "cj_consumer_applied_total", &[("consumer", group)]),
        5.0
    );

    // Consumer lag per group and partition (from librdkafka's statistics): every partition of
    // the sensor topic is reported, and the group catches up to 0.
    let partitions = app.config.kafka.partitions;
    eventually(Duration::from_secs(30), || async {
        let m = scrape(&app, Service::Eventhandler).await;
        let lags: Vec<f64> = (0..partitions)
            .filter_map(|p| {
                let p = p.to_string();
                let labels = [
                    ("group", group),
                    ("topic", sensor.as_str()),
                    ("partition", p.as_str()),
                ];
                m.iter()
                    .find(|s| {
                        s.name == "cj_consumer_lag"
                            && labels
                                .iter()
                                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                    })
                    .map(|s| s.value)
            })
            .collect();
        (lags.len() == partitions as usize && lags.iter().all(|l| *l == 0.0)).then_some(())
    })
    .await;
}

/// Every metric the sources record is catalogued with its type, and what `/metrics` shows has
/// HELP and TYPE lines, the right type, and buckets that fit what it measures.
#[tokio::test]
async fn every_metric_has_help_the_right_type_and_fitting_buckets() {
    use cornjacket::infra::metrics_catalogue::{Kind, METRICS, ROWS};
    // The sources: every `counter!("cj_…")`, `gauge!(…)`, `histogram!(…)`.
    let re = regex::Regex::new(r#"(counter|gauge|histogram)!\(\s*"(cj_[a-z0-9_]+)""#).unwrap();
    let mut used = std::collections::BTreeSet::new();
    let mut stack = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for c in re.captures_iter(&text) {
                    used.insert((c[2].to_string(), c[1].to_string()));
                }
            }
        }
    }
    assert!(used.len() > 30, "{used:?}");
    for (name, kind) in &used {
        let entry = METRICS.iter().find(|(n, ..)| n == name);
        let Some((_, k, help)) = entry else {
            panic!("{name} is recorded but not in infra::metrics_catalogue::METRICS");
        };
        let want = match kind.as_str() {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            _ => Kind::Histogram,
        };
        assert_eq!(*k, want, "{name}");
        assert!(help.len() > 10, "{name}");
    }

    let app = TestApp::spawn(&[Service::Ingestion]).await;
    app.wait_ready().await;
    for d in ["h1", "h2", "h3"] {
        assert_eq!(app.ingest(reading(d)).await.0, 202);
    }
    let text = app
        .http
        .get(app.url(Service::Ingestion, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("cj_"))
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| {
                    METRICS
                        .iter()
                        .any(|(n, k, _)| n == base && *k == Kind::Histogram)
                })
                .unwrap_or(name)
        })
        .collect();
    assert!(families.contains("cj_events_accepted_total"), "{text}");
    for f in &families {
        let (_, kind, _) = METRICS
            .iter()
            .find(|(n, ..)| n == f)
            .unwrap_or_else(|| panic!("{f} exported but not catalogued"));
        assert!(text.contains(&format!("# HELP {f} ")), "no HELP for {f}");
        let t = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert!(
            text.contains(&format!("# TYPE {f} {t}")),
            "TYPE of {f} is not {t}"
        );
    }
    // Row counts get row buckets, not seconds: three single events land in le="1"… not in +Inf only.
    for b in ROWS {
        assert!(
            text.contains(&format!("cj_outbox_group_commit_rows_bucket{{le=\"{b}\"}}")),
            "no le={b} bucket for the group commit rows: {text}"
        );
    }
    assert!(!text.contains("cj_outbox_group_commit_rows_bucket{le=\"0.0005\"}"));
    let build = text
        .lines()
        .find(|l| l.starts_with("cj_build_info{"))
        .expect("cj_build_info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.ends_with(" 1"),
        "{build}"
    );
    // The commit of this checkout (build.rs asks git), not "unknown".
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "a git checkout");
    assert!(build.contains(&format!("commit=\"{head}\"")), "{build}");
}

/// Prometheus's own linter (`promtool check metrics`, Debian's prometheus package, which
/// `make test` installs) accepts what every port of every service serves.
#[tokio::test]
async fn promtool_accepts_every_metrics_endpoint() {
    const PROMTOOL: &str = "/usr/bin/promtool";
    assert!(
        std::path::Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: `make test` installs Debian's prometheus (scripts/infra.sh test-tools)"
    );
    let app = TestApp::spawn(&[
        Service::Ingestion,
        Service::Eventhandler,
        Service::Tsdb,
        Service::Query,
        Service::Actions,
        Service::Console,
    ])
    .await;
    app.wait_ready().await;
    // Something in every family that has samples only once used.
    assert_eq!(app.ingest(reading("promtool-1")).await.0, 202);
    let _ = app
        .http
        .get(app.url(Service::Ingestion, "/no-such-route"))
        .send()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The actions API port serves only the API; its /metrics is on its health port.
    let mut urls: Vec<String> = app
        .addrs
        .iter()
        .filter(|(s, _)| **s != Service::Actions)
        .map(|(_, a)| a)
        .chain(app.health_addrs.values())
        .map(|a| format!("http://{a}/metrics"))
        .collect();
    urls.sort();
    urls.dedup();
    assert!(urls.len() >= 5, "{urls:?}");
    for url in urls {
        let text = app
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("cj_build_info"), "{url}: {text}");
        let mut child = tokio::process::Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "{url}: promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
