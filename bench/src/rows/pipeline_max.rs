//! pipeline-max: the highest open-loop ingest rate the whole pipeline drains in time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::bodies::single_ingest;
use crate::cpu::{cpu_mark, cpu_use};
use crate::ctx::Ctx;
use crate::load::open_loop;
use crate::report::{Row, thousands};
use crate::{http, log};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let step = a.pipeline_step();
    let mut best: Option<f64> = None;
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut best_hist: Option<Histogram<u64>> = None;
    // The given rates in order; after the first failing one, `--pipeline-refine` bisection steps
    // between the best passing rate and the lowest failing one (rounded to 500 ev/s).
    let mut queue: std::collections::VecDeque<f64> = a.pipeline_rates.iter().copied().collect();
    let mut refine_left = a.pipeline_refine;
    let mut failed_at: Option<f64> = None;
    let mut k = 0usize;
    while let Some(rate) = queue.pop_front() {
        k += 1;
        let settle = ctx.settle(Duration::from_secs(30)).await;
        if !settle.is_empty() {
            notes.push(settle);
        }
        let run = ctx.run.clone();
        let id = move |seq: u64| format!("p{k}-{run}-{seq}");
        let (addr, host) = ctx.ingest.clone();
        let w = single_ingest(addr, host, Arc::new(id.clone()));
        log(format!("pipeline-max: step {rate} ev/s for {step:?}"));
        // Sample the outbox backlog and the consumer's lag once a second during the step.
        let stop = Arc::new(tokio::sync::Notify::new());
        let sampler = {
            let (db, eh, stop) = (ctx.db.clone(), ctx.eventhandler.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut max_backlog, mut max_lag) = (0i64, 0i64);
                loop {
                    if let Some(db) = &db
                        && let Ok(n) =
                            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ingestion.outbox")
                                .fetch_one(db)
                                .await
                    {
                        max_backlog = max_backlog.max(n);
                    }
                    if let Ok((200, body)) = http::get_once(eh.0, &eh.1, "/health").await {
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        if let Some(l) = v.pointer("/checks/consumer/lag").and_then(Value::as_i64) {
                            max_lag = max_lag.max(l);
                        }
                    }
                    tokio::select! {
                        _ = stop.notified() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                (max_backlog, max_lag)
            })
        };
        let m0 = cpu_mark(&a);
        // Ingestion more than the drain allowance behind its schedule: the step has failed.
        let load = open_loop(
            &w,
            rate,
            a.open_loop_connections,
            Duration::ZERO,
            step,
            true,
            Some(a.drain_timeout),
        )
        .await;
        let m1 = cpu_mark(&a);
        stop.notify_one();
        let (max_backlog, max_lag) = sampler.await.unwrap_or((-1, -1));
        // Drained: the outbox is empty and the last events sent (which cover every shard and
        // partition) are in their projections; per-shard and per-partition order then means
        // everything before them is too. Counted from the end of the schedule, so a slow ingest
        // counts against the step as much as a slow pipeline.
        let mut seqs = load.ok_seqs.clone();
        seqs.sort_unstable();
        let tail: Vec<String> = seqs.iter().rev().take(200).map(|s| id(*s)).collect();
        let sched_end = load.schedule_end.unwrap_or_else(Instant::now);
        let answered_after = load
            .last_answer
            .map(|t| t.saturating_duration_since(sched_end));
        let mut drain: Option<Duration> = None;
        let mut backlog_at_end = None;
        let give_up =
            Instant::now() + Duration::from_secs(if load.aborted.is_some() { 0 } else { 20 });
        loop {
            let backlog = ctx.outbox_backlog().await.unwrap_or(-1);
            backlog_at_end.get_or_insert(backlog);
            if backlog == 0 && ctx.visible(&tail).await? as usize == tail.len() {
                drain = Some(sched_end.elapsed());
                break;
            }
            if Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let achieved = load.ok as f64
            / load
                .last_answer
                .map_or(step, |t| t.saturating_duration_since(sched_end) + step)
                .as_secs_f64()
                .max(1e-9);
        let clean = load.failures().is_empty() && load.aborted.is_none();
        let drained = drain.is_some_and(|d| d <= a.drain_timeout);
        // Ingestion itself must keep the pace: 202s per second (until the last answer) ≥ 95%.
        let kept_pace = achieved >= rate * 0.95;
        let pass = clean && drained && kept_pace;
        for (k2, v) in load.failures() {
            *failures.entry(k2).or_default() += v;
        }
        let cpu = cpu_use(&m0, &m1);
        steps.push(json!({
            "rate": rate,
            "achieved": achieved,
            "pass": pass,
            "http_p50_us": load.hist.value_at_quantile(0.5),
            "http_p99_us": load.hist.value_at_quantile(0.99),
            "http_max_us": load.hist.max(),
            "failures": load.failures(),
            "max_outbox_backlog": max_backlog,
            "outbox_backlog_at_end": backlog_at_end,
            "max_consumer_lag": max_lag,
            "drain_s": drain.map(|d| d.as_secs_f64()),
            "last_answer_after_schedule_s": answered_after.map(|d| d.as_secs_f64()),
            "aborted": load.aborted,
            "connections_opened": load.connections,
            "cpu": cpu,
        }));
        log(format!(
            "pipeline-max: {rate} ev/s → achieved {achieved:.0}, backlog max {max_backlog}, lag max {max_lag}, drain {drain:?}{}: {}",
            load.aborted
                .as_deref()
                .map(|a| format!(", {a}"))
                .unwrap_or_default(),
            if pass { "pass" } else { "FAIL" }
        ));
        if pass {
            best = Some(rate);
            best_hist = Some(load.hist.clone());
        } else {
            failed_at = Some(failed_at.map_or(rate, |f: f64| f.min(rate)));
            queue.clear();
        }
        if queue.is_empty()
            && refine_left > 0
            && let (Some(lo), Some(hi)) = (best, failed_at)
        {
            let mid = ((lo + hi) / 2.0 / 500.0).round() * 500.0;
            if mid > lo && mid < hi {
                refine_left -= 1;
                queue.push_back(mid);
            }
        }
    }
    let mut r = Row::new("pipeline-max");
    match best {
        Some(b) => r.rate(b, "ev/s"),
        None => {
            r.value = Some(0.0);
            r.unit = "ev/s".into();
            r.result = format!(
                "< {} ev/s",
                thousands(a.pipeline_rates.first().copied().unwrap_or(0.0))
            );
        }
    }
    if let Some(h) = &best_hist {
        r.latency(h);
    }
    r.failures = failures;
    r.goal = "≥ 10,000 ev/s".into();
    r.goal_met = Some(best.unwrap_or(0.0) >= 10_000.0);
    let step_text: Vec<String> = steps
        .iter()
        .map(|s| {
            format!(
                "{} {} (got {}, backlog max {}, lag max {}, drain {})",
                thousands(s["rate"].as_f64().unwrap_or(0.0)),
                if s["pass"].as_bool() == Some(true) {
                    "✓"
                } else {
                    "✗"
                },
                thousands(s["achieved"].as_f64().unwrap_or(0.0)),
                s["max_outbox_backlog"],
                s["max_consumer_lag"],
                match (s["drain_s"].as_f64(), s["aborted"].is_null()) {
                    (Some(d), _) => format!("{d:.2}s"),
                    (None, true) => ">20s".to_string(),
                    (None, false) => "ingest fell behind, step stopped".to_string(),
                }
            )
        })
        .collect();
    r.config = format!(
        "open loop single-event ingest, steps of {:.0}s (the given rates in order until one fails, then {} bisection step(s)), ≤{} connections, a distinct aggregate_id per event; a step passes when every request got 202, at ≥95% of the rate, and, within {:.0}s of the end of its schedule, the outbox is empty and the step's last 200 events are in projections (a step stops early when unanswered requests exceed that much of the schedule); 'got' = 202s per second until the last answer; p50/p99/max are the HTTP latencies of the best step; steps: {}{}",
        step.as_secs_f64(),
        a.pipeline_refine,
        a.open_loop_connections,
        a.drain_timeout.as_secs_f64(),
        step_text.join("; "),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    );
    r.details = json!({ "steps": steps });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
