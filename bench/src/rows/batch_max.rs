//! batch-max: batch ingest, closed loop.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::bodies::{device, reading_body};
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::load::{Workload, closed_loop};
use crate::report::Row;
use crate::{http, log};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(10)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let n = a.batch_size.max(1);
    let w = Workload {
        addr,
        build: Arc::new(move |seq, out| {
            let mut body = Vec::with_capacity(n * 120 + 16);
            body.extend_from_slice(br#"{"events":["#);
            for i in 0..n as u64 {
                if i > 0 {
                    body.push(b',');
                }
                let s = seq * n as u64 + i;
                reading_body(&mut body, &device(s), s);
            }
            body.extend_from_slice(b"]}");
            http::request_bytes(out, "POST", &host, "/api/v1/ingest/batch", Some(&body));
        }),
        events: Arc::new(|body| {
            // {"accepted": N, ...}: read N without parsing the whole answer.
            let Some(b) = body else { return 0 };
            let key = br#""accepted":"#;
            let Some(p) = b.windows(key.len()).position(|w| w == key) else {
                return 0;
            };
            b[p + key.len()..]
                .iter()
                .skip_while(|c| c.is_ascii_whitespace())
                .take_while(|c| c.is_ascii_digit())
                .fold(0u64, |acc, c| acc * 10 + u64::from(c - b'0'))
        }),
        want_body: true,
    };
    log(format!(
        "batch-max: {} connections, {n}-event batches, {:?}",
        a.batch_connections,
        a.duration()
    ));
    let backlog0 = ctx.outbox_backlog().await;
    let m0 = cpu_mark(&a);
    let load = closed_loop(&w, a.batch_connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark(&a);
    let backlog1 = ctx.outbox_backlog().await;
    let mut r = Row::new("batch-max");
    let rate = load.per_sec(load.events);
    r.rate(rate, "ev/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let rejected_items = (load.ok * n as u64).saturating_sub(load.events);
    if rejected_items > 0 {
        r.failures.insert("rejected-items".into(), rejected_items);
    }
    r.goal = "≥ 100,000 ev/s".into();
    r.goal_met = Some(rate >= 100_000.0);
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "closed loop, {} connections × {:.0}s (+{:.0}s warm-up); POST /api/v1/ingest/batch with {n} sensor.reading events (~{} KB body); {:.0} requests/s; latency per batch request; {}; outbox backlog {} → {}; {}{}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        (n * 110) / 1000,
        load.per_sec(load.ok),
        r.failures_text(),
        backlog0.map_or("?".into(), |b| b.to_string()),
        backlog1.map_or("?".into(), |b| b.to_string()),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "requests_per_s": load.per_sec(load.ok), "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
