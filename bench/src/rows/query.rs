//! query: projection reads, open loop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use crate::bodies::{mix, reading_body};
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::load::{Workload, open_loop};
use crate::report::Row;
use crate::{http, log};

/// Sends `ids` as sensor.reading events through the batch endpoint (100 per request).
async fn seed(ctx: &Ctx, ids: &[String]) -> anyhow::Result<()> {
    let (addr, host) = &ctx.ingest;
    let mut conn = http::Conn::connect(*addr).await?;
    for (k, chunk) in ids.chunks(100).enumerate() {
        let mut body = br#"{"events":["#.to_vec();
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            reading_body(&mut body, id, (k * 100 + i) as u64);
        }
        body.extend_from_slice(b"]}");
        let mut req = Vec::new();
        http::request_bytes(&mut req, "POST", host, "/api/v1/ingest/batch", Some(&body));
        let reply = conn.request(&req, false).await?;
        if reply.status != 202 {
            bail!("seeding answered {}", reply.status);
        }
    }
    Ok(())
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let ids: Vec<String> = (0..1000).map(|i| format!("q-{}-{i:04}", ctx.run)).collect();
    seed(ctx, &ids).await?;
    let visible = ctx.wait_visible(&ids, Duration::from_secs(30)).await?;
    if (visible as usize) < ids.len() {
        bail!(
            "only {visible} of {} seeded projections became visible",
            ids.len()
        );
    }
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let (addr, host) = ctx.query.clone();
    let ids = Arc::new(ids);
    let w = Workload {
        addr,
        build: {
            let ids = ids.clone();
            Arc::new(move |seq, out| {
                let id = &ids[(mix(seq) % ids.len() as u64) as usize];
                let path = format!("/api/v1/query/projections/sensor_state/{id}");
                http::request_bytes(out, "GET", &host, &path, None);
            })
        },
        events: Arc::new(|_| 1),
        want_body: false,
    };
    log(format!(
        "query: {} req/s for {:?}",
        a.query_rate,
        a.query_duration()
    ));
    let m0 = cpu_mark(&a);
    let load = open_loop(
        &w,
        a.query_rate,
        a.open_loop_connections,
        a.warmup(),
        a.query_duration(),
        false,
        None,
    )
    .await;
    let m1 = cpu_mark(&a);
    let mut r = Row::new("query");
    r.rate(load.per_sec(load.ok), "req/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = "p99 ≤ 5 ms".into();
    r.goal_met = r.p99_us.map(|p| p <= 5_000 && r.failures.is_empty());
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "open loop {} req/s × {:.0}s (+{:.0}s warm-up), ≤{} connections ({} opened); GET /api/v1/query/projections/sensor_state/{{id}} over 1,000 seeded devices, idle pipeline; {}; {}{}",
        a.query_rate,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.open_loop_connections,
        load.connections,
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
