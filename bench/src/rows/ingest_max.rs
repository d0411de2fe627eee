//! ingest-max: single-event ingest, closed loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;

use crate::bodies::{DEVICES, device, single_ingest};
use crate::cpu::{cpu_mark, cpu_text, cpu_use, status_kib};
use crate::ctx::Ctx;
use crate::load::closed_loop;
use crate::log;
use crate::report::{Row, thousands};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(10)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let w = single_ingest(addr, host, Arc::new(device));
    // Reset the platform's peak RSS so the footprint row reads the peak of this row.
    let hwm_reset = a
        .platform_pid
        .is_some_and(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok());
    let backlog0 = ctx.outbox_backlog().await;
    log(format!(
        "ingest-max: {} connections, {:?}",
        a.connections,
        a.duration()
    ));
    let m0 = cpu_mark(&a);
    let waits = sample_waits(ctx.db.clone(), a.warmup(), a.duration());
    let load = closed_loop(&w, a.connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark(&a);
    let waits = waits.await.unwrap_or_default();
    let backlog1 = ctx.outbox_backlog().await;
    let rss_peak = a.platform_pid.and_then(|p| status_kib(p, "VmHWM:"));
    let mut r = Row::new("ingest-max");
    let rate = load.per_sec(load.events);
    r.rate(rate, "ev/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = "≥ 20,000 ev/s".into();
    r.goal_met = Some(rate >= 20_000.0);
    let cpu = cpu_use(&m0, &m1);
    // Rows the processor moved during the whole run (warm-up included) ≈ accepted − backlog growth.
    let total_secs = (a.warmup() + a.duration()).as_secs_f64();
    let drained = match (backlog0, backlog1) {
        (Some(b0), Some(b1)) => {
            let accepted_all = rate * total_secs; // approximation: warm-up at the same rate
            Some(((accepted_all - (b1 - b0) as f64) / total_secs).max(0.0))
        }
        _ => None,
    };
    r.config = format!(
        "closed loop, {} keep-alive connections × {:.0}s (+{:.0}s warm-up); sensor.reading over {} devices, ~110-byte body; full platform running (outbox processor, consumer); {}; outbox backlog {} → {} (processor moved ≈{} ev/s meanwhile); {}{}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        DEVICES,
        r.failures_text(),
        backlog0.map_or("?".into(), |b| b.to_string()),
        backlog1.map_or("?".into(), |b| b.to_string()),
        drained.map_or("?".into(), thousands),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "postgres_wait_events": waits,
        "outbox_backlog_before": backlog0,
        "outbox_backlog_after": backlog1,
        "processor_rate_estimate": drained,
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    ctx.startup["ingest_max_rss_peak_kib"] = json!(rss_peak);
    ctx.startup["rss_peak_reset_before_ingest_max"] = json!(hwm_reset);
    Ok(())
}

/// Samples what the platform's PostgreSQL sessions are doing (wait events), every 100 ms over
/// the measured window: a cheap profile of where the database time goes.
fn sample_waits(
    db: Option<PgPool>,
    warmup: Duration,
    dur: Duration,
) -> tokio::task::JoinHandle<BTreeMap<String, u64>> {
    tokio::spawn(async move {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let Some(db) = db else { return counts };
        tokio::time::sleep(warmup).await;
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, count(*)
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'cornjacket'
                   AND state = 'active'
                 GROUP BY 1",
            )
            .fetch_all(&db)
            .await
            .unwrap_or_default();
            for (w, n) in rows {
                *counts.entry(w).or_default() += n as u64;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counts
    })
}
