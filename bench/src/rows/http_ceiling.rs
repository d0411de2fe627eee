//! http-ceiling: the same requests as ingest-max against an axum route that only answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::net::TcpStream;

use crate::bodies::{device, single_ingest};
use crate::cpu::{cpu_mark_of, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::load::closed_loop;
use crate::log;
use crate::report::Row;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = &ctx.a;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve-ceiling")
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the http-ceiling server")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("the http-ceiling server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = format!("127.0.0.1:{port}");
    let w = single_ingest(addr, host, Arc::new(device));
    log(format!(
        "http-ceiling: {} connections, {:?}",
        a.connections,
        a.duration()
    ));
    let m0 = cpu_mark_of(a, Some(child.id()));
    let load = closed_loop(&w, a.connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark_of(a, Some(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let mut r = Row::new("http-ceiling");
    r.rate(load.per_sec(load.ok), "req/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "closed loop, {} connections × {:.0}s (+{:.0}s warm-up); same single-event POST against an axum route in a child process of the bench (2-thread tokio runtime) answering 202 with a fixed body (its CPU is shown as 'platform'); {}; {}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        r.failures_text(),
        cpu_text(&cpu)
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// The ceiling endpoint: reads the body and answers 202 with a body shaped like ingest's.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/api/v1/ingest",
        post(|_body: axum::body::Bytes| async {
            (
                axum::http::StatusCode::ACCEPTED,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                r#"{"event_id":"0196a5b2-7c1e-7d3f-9a2b-3c4d5e6f7a8b","status":"accepted"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
