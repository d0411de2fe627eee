//! e2e-latency: ingest → projection, open loop.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::bodies::single_ingest;
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::load::{histogram, open_loop};
use crate::log;
use crate::report::{Row, fmt_us, quantiles, thousands};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let run = ctx.run.clone();
    // Warm-up events get their own prefix so that only measured events are read back.
    let warm_n = (a.warmup().as_secs_f64() * a.e2e_rate).round() as u64;
    let id = move |seq: u64| {
        if seq < warm_n {
            format!("e2ew-{run}-{seq}")
        } else {
            format!("e2e-{run}-{seq}")
        }
    };
    let w = single_ingest(addr, host, Arc::new(id.clone()));
    log(format!(
        "e2e-latency: {} ev/s for {:?}",
        a.e2e_rate,
        a.e2e_duration()
    ));
    let m0 = cpu_mark(&a);
    let load = open_loop(
        &w,
        a.e2e_rate,
        a.open_loop_connections,
        a.warmup(),
        a.e2e_duration(),
        true,
        None,
    )
    .await;
    let m1 = cpu_mark(&a);
    let ids: Vec<String> = load.ok_seqs.iter().map(|s| id(*s)).collect();
    let visible = ctx.wait_visible(&ids, Duration::from_secs(30)).await?;
    let deltas: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (updated_at - last_event_timestamp)) * 1e6)::float8
         FROM eventhandler.projections
         WHERE projection_type = 'sensor_state' AND aggregate_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(ctx.db()?)
    .await?;
    let mut h = histogram();
    let mut negative = 0u64;
    for d in &deltas {
        if *d < 0.0 {
            negative += 1;
        }
        h.saturating_record(d.max(1.0) as u64);
    }
    // Where the time goes: event_store.stored_at is now() of the outbox processor's claim
    // transaction, which splits the path in two (best effort: skipped if the query fails).
    let stages: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM (e.stored_at - e.ingested_at)) * 1e6)::float8,
                (extract(epoch FROM (p.updated_at - e.stored_at)) * 1e6)::float8
         FROM eventhandler.projections p
         JOIN ingestion.event_store e ON e.event_id = p.last_event_id
         WHERE p.projection_type = 'sensor_state' AND p.aggregate_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(ctx.db()?)
    .await
    .unwrap_or_default();
    let (mut to_claim, mut to_projection) = (histogram(), histogram());
    for (a, b) in &stages {
        to_claim.saturating_record(a.max(1.0) as u64);
        to_projection.saturating_record(b.max(1.0) as u64);
    }
    let stage_text = if stages.is_empty() {
        String::new()
    } else {
        format!(
            "; stages p50/p99: ingested_at → processor claim transaction (event_store.stored_at) {}/{}, claim → projection upsert {}/{}",
            fmt_us(Some(to_claim.value_at_quantile(0.5))),
            fmt_us(Some(to_claim.value_at_quantile(0.99))),
            fmt_us(Some(to_projection.value_at_quantile(0.5))),
            fmt_us(Some(to_projection.value_at_quantile(0.99))),
        )
    };
    let mut r = Row::new("e2e-latency");
    r.latency(&h);
    r.value = r.p99_us.map(|u| u as f64 / 1000.0);
    r.unit = "ms p99".into();
    r.result = format!(
        "{} of {} events visible",
        thousands(visible as f64),
        thousands(ids.len() as f64)
    );
    r.failures = load.failures();
    if (visible as usize) < ids.len() {
        r.failures.insert(
            "not-visible-after-30s".into(),
            (ids.len() - visible as usize) as u64,
        );
    }
    r.goal = "p99 ≤ 100 ms".into();
    r.goal_met = r
        .p99_us
        .map(|p| p <= 100_000 && visible as usize == ids.len());
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "open loop {} ev/s × {:.0}s (+{:.0}s warm-up, excluded), ≤{} connections ({} opened); sensor.reading without event_time, a distinct aggregate_id each; latency = projections.updated_at (now(): the start of the upsert's transaction, so its statement and commit are not included) − last_event_timestamp (= ingested_at, set before the outbox commit), read in the database; HTTP 202 latency p50 {} p99 {} max {}{stage_text}; {}{}; {}{}",
        a.e2e_rate,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.open_loop_connections,
        load.connections,
        fmt_us(Some(load.hist.value_at_quantile(0.5))),
        fmt_us(Some(load.hist.value_at_quantile(0.99))),
        fmt_us(Some(load.hist.max())),
        r.failures_text(),
        if negative > 0 {
            format!(" ({negative} negative deltas counted as 0)")
        } else {
            String::new()
        },
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "sent_ok": ids.len(),
        "visible": visible,
        "stage_ingested_to_claim_us": quantiles(&to_claim),
        "stage_claim_to_projection_us": quantiles(&to_projection),
        "http_p50_us": load.hist.value_at_quantile(0.5),
        "http_p99_us": load.hist.value_at_quantile(0.99),
        "http_max_us": load.hist.max(),
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
