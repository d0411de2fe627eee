//! Slow and idle clients cannot hold an HTTP port (`CJ_HTTP_*`): raw TCP clients that stall their
//! headers or their body, idle keep-alive connections, and more connections than the limit,
//! against the real ingestion service.

use std::time::{Duration, Instant};

use crate::common::*;
use cornjacket::services::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Ingestion without the outbox processor (no broker needed), with short client limits.
async fn spawn(limits: &[(&str, &str)]) -> TestApp {
    let app = TestApp::spawn_with(&[Service::Ingestion], |e| {
        e.insert("CJ_OUTBOX_ENABLED".into(), "false".into());
        for (k, v) in limits {
            e.insert(k.to_string(), v.to_string());
        }
    })
    .await;
    app.wait_ready().await;
    app
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addrs[&Service::Ingestion])
        .await
        .unwrap()
}

/// Reads until the server closes the connection (or resets it); how long that took, or None
/// if it stayed open for `limit`. What was read is appended to `out`.
async fn closed_after(s: &mut TcpStream, limit: Duration, out: &mut Vec<u8>) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `GET /health` on an open connection, keeping it open; the status line.
async fn get_health(s: &mut TcpStream) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: cj\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "connection closed before the response");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if got.len() >= end + 4 + len {
                return text.lines().next().unwrap().to_string();
            }
        }
    }
}

async fn health_ok(app: &TestApp) {
    let r = app
        .http
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .expect("health answers");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn headers_that_do_not_complete_in_time_are_cut_off_while_others_are_served() {
    let app = spawn(&[("CJ_HTTP_HEADER_TIMEOUT", "1s")]).await;

    // Half a header, then nothing.
    let mut stalled = connect(&app).await;
    stalled
        .write_all(b"POST /api/v1/ingest HTTP/1.1\r\nHost: cj\r\n")
        .await
        .unwrap();
    // A connection that never sends a byte.
    let mut silent = connect(&app).await;
    // A header dripped a byte at a time: steady traffic, but never complete in time.
    let mut drip = connect(&app).await;
    let dripping = tokio::spawn(async move {
        for b in
            b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if drip.write_all(&[*b]).await.is_err() {
                return Some(drip);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    });

    // Meanwhile the port serves everyone else.
    for _ in 0..3 {
        health_ok(&app).await;
    }

    for (what, s) in [("stalled", &mut stalled), ("silent", &mut silent)] {
        let mut got = Vec::new();
        let took = closed_after(s, Duration::from_secs(6), &mut got)
            .await
            .unwrap_or_else(|| panic!("the {what} connection is still open after 6s"));
        assert!(got.is_empty(), "{what}: closed without a response");
        assert!(
            took < Duration::from_secs(5),
            "{what}: closed after {took:?}"
        );
    }
    let cut = tokio::time::timeout(Duration::from_secs(8), dripping)
        .await
        .expect("the drip is cut off")
        .unwrap();
    assert!(
        cut.is_some(),
        "the server closed the dripping connection before it finished its header"
    );
    health_ok(&app).await;
}

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_the_connection_closed() {
    let app = spawn(&[("CJ_HTTP_BODY_TIMEOUT", "1s")]).await;
    let mut s = connect(&app).await;
    s.write_all(
        b"POST /api/v1/ingest HTTP/1.1\r\nHost: cj\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"event_type\": \"sensor.reading\",",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let took = closed_after(&mut s, Duration::from_secs(6), &mut got)
        .await
        .expect("the server closes the connection");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 1s"), "{text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    // A body that arrives in time is read as usual.
    let (status, body) = app
        .ingest(
            serde_json::json!({"event_type": "sensor.reading", "aggregate_id": "d1",
                                   "payload": {"value": 1.0, "unit": "celsius"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes() {
    let app = spawn(&[
        ("CJ_HTTP_HEADER_TIMEOUT", "1s"),
        ("CJ_HTTP_IDLE_TIMEOUT", "3s"),
    ])
    .await;
    let mut s = connect(&app).await;
    assert!(get_health(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for longer than the header timeout: still open, and reused.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(get_health(&mut s).await.starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let mut got = Vec::new();
    closed_after(&mut s, Duration::from_secs(8), &mut got)
        .await
        .expect("an idle connection is closed");
    let idle = idle_from.elapsed();
    assert!(got.is_empty());
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_secs(6),
        "closed after {idle:?} idle"
    );
}

#[tokio::test]
async fn past_the_connection_limit_a_client_waits_until_a_connection_closes() {
    let app = spawn(&[
        ("CJ_HTTP_MAX_CONNECTIONS", "3"),
        ("CJ_HTTP_HEADER_TIMEOUT", "60s"),
        ("CJ_HTTP_IDLE_TIMEOUT", "1s"),
    ])
    .await;
    // The keep-alive connection of the readiness check goes idle and is closed: all three
    // slots are free.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The test's own client holds no connection meanwhile.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&app).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = app.url(Service::Ingestion, "/health");
    let client = fresh();
    let waiting = tokio::spawn(async move { client.get(&url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "a fourth connection is not served");

    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap()
        .expect("health answers");
    assert_eq!(status, 200);
    let r = fresh()
        .get(app.url(Service::Ingestion, "/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
