//! anomaly-to-webhook: the ai-inference sidecar, the action orchestrator and a webhook receiver.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::http::REQUEST_TIMEOUT;
use crate::load::histogram;
use crate::report::{Row, percentiles_text, quantiles, thousands};
use crate::sidecar::Sidecar;
use crate::{hook, http, log};

const ANOMALY_ROW: &str = "anomaly-to-webhook";
const ANOMALY_GOAL: &str = "p99 ≤ 250 ms";

/// An outlier as sent: its device index, schedule, and the answer.
struct Outlier {
    index: usize,
    scheduled: Instant,
    status: Option<u16>,
    error: Option<String>,
    accepted: Option<Instant>,
    event_id: Option<String>,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let cwd = std::env::current_dir()?;
    let (python, dir) = (cwd.join(&a.ai_python), cwd.join(&a.ai_dir));
    if !python.exists() {
        let why = format!(
            "not measured: the ai-inference sidecar's venv is missing ({}); create it with scripts/ai.sh venv (scripts/bench.sh runs it)",
            a.ai_python.display()
        );
        ctx.rows.insert(
            ANOMALY_ROW.into(),
            Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
        );
        return Ok(());
    }
    if !dir.join("ai_inference").is_dir() {
        let why = format!(
            "not measured: no ai-inference sidecar at {} (--ai-dir)",
            a.ai_dir.display()
        );
        ctx.rows.insert(
            ANOMALY_ROW.into(),
            Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
        );
        return Ok(());
    }
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let token = http::AUTHORIZATION.get().cloned();
    let auth = |rb: reqwest::RequestBuilder| match &token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };

    // The receiver and a rule on ai.anomaly that calls it, without dedup.
    let receiver = hook::Receiver::start().await?;
    let rules_url = format!("{}/api/v1/actions/rules", a.actions_url);
    let rule = json!({
        "name": format!("cornjacket-bench {}", ctx.run),
        "event_type": "ai.anomaly",
        "dedup_window_s": 0,
        "webhook": { "url": receiver.url("/anomaly") },
    });
    let created = match auth(client.post(&rules_url)).json(&rule).send().await {
        Err(e) if e.is_connect() => {
            let why = format!(
                "not measured: the action orchestrator does not answer on {} (cornjacket serve runs it; --actions-url)",
                a.actions_url
            );
            ctx.rows.insert(
                ANOMALY_ROW.into(),
                Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
            );
            return Ok(());
        }
        r => r.context("creating the rule")?,
    };
    let status = created.status();
    let body: Value = created.json().await.unwrap_or(Value::Null);
    if status != 201 {
        bail!("creating the rule on {rules_url}: {status} {body}");
    }
    let (Some(rule_id), Some(secret)) = (
        body["rule_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok()),
        body.pointer("/webhook/secret")
            .and_then(Value::as_str)
            .map(str::to_string),
    ) else {
        bail!("the rule's answer has no rule_id or webhook.secret: {body}");
    };

    let result = match Sidecar::start(&a, &python, &dir, &ctx.run) {
        Ok(mut sidecar) => {
            let result = measure(
                ctx,
                &client,
                &receiver,
                &mut sidecar,
                rule_id,
                &secret,
                &settle,
            )
            .await;
            sidecar.stop().await;
            if result.is_ok() {
                let _ = std::fs::remove_file(&sidecar.log);
            }
            result
        }
        Err(e) => Err(e),
    };
    // The rule goes, so later rows do not evaluate it for every event.
    let _ = auth(client.delete(format!("{rules_url}/{rule_id}")))
        .send()
        .await;
    result
}

async fn measure(
    ctx: &mut Ctx,
    client: &reqwest::Client,
    receiver: &hook::Receiver,
    sidecar: &mut Sidecar,
    rule_id: Uuid,
    secret: &str,
    settle: &str,
) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let token = http::AUTHORIZATION.get().cloned();
    let auth = |rb: reqwest::RequestBuilder| match &token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let t_start = Instant::now();
    sidecar
        .wait_healthy(client, Duration::from_secs(90))
        .await?;
    let sidecar_start_s = t_start.elapsed().as_secs_f64();
    let model: Value = match client.get(sidecar.url("/model")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let warmup = model["warmup"].as_u64().unwrap_or(30) as usize;
    let threshold = model["threshold"].as_f64().unwrap_or(4.0);

    // One outlier per device, each the first after its warm-up: an outlier is learned only
    // clipped to mean ± threshold·σ, but it still widens σ, so a device is never reused.
    let rate = a.anomaly_rate.max(0.1);
    let n_warm = (a.warmup().as_secs_f64() * rate).round() as usize;
    let n_measured = ((a.anomaly_duration().as_secs_f64() * rate).round() as usize).max(1);
    let devices = n_warm + n_measured;
    let readings = warmup + 2;
    let device = |d: usize| format!("anom-{}-{d:04}", ctx.run);
    log(format!(
        "{}: sidecar healthy after {sidecar_start_s:.1}s; warming up {devices} devices with {readings} readings each",
        "anomaly-to-webhook"
    ));

    // Normal readings, deterministic, within ±0.5 of 20 (σ ≈ 0.29), in batches of 100.
    let batch_url = format!("{}/api/v1/ingest/batch", a.ingest_url);
    let all: Vec<Value> = (0..readings)
        .flat_map(|i| {
            (0..devices).map(move |d| (d, 20.0 + ((i * 37 + d * 11) % 100) as f64 / 100.0 - 0.5))
        })
        .map(|(d, v)| {
            json!({"event_type": "sensor.reading", "aggregate_id": device(d),
                   "payload": {"value": v, "unit": "celsius"}})
        })
        .collect();
    let t_warm = Instant::now();
    for chunk in all.chunks(100) {
        let r = auth(client.post(&batch_url))
            .json(&json!({ "events": chunk }))
            .send()
            .await
            .context("warm-up batch")?;
        let status = r.status();
        if status != 202 {
            let body = r.text().await.unwrap_or_default();
            bail!("warm-up batch answered {status}: {body}");
        }
    }
    let db = ctx.db()?.clone();
    let prefix = format!("anom-{}-%", ctx.run);
    let scored = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), count(*) FILTER (WHERE is_anomaly) FROM ai.inference_results
             WHERE device_id LIKE $1",
        )
        .bind(&prefix)
        .fetch_one(&db)
        .await
        .ok()
    };
    let (mut done, mut grew) = ((0i64, 0i64), Instant::now());
    while (done.0 as usize) < all.len() {
        if grew.elapsed() > Duration::from_secs(30) {
            bail!(
                "the sidecar scored only {} of {} warm-up readings (no progress for 30 s); {}: {}",
                done.0,
                all.len(),
                sidecar.log.display(),
                sidecar.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(n) = scored().await
            && n.0 > done.0
        {
            (done, grew) = (n, Instant::now());
        }
    }
    let warm_s = t_warm.elapsed().as_secs_f64();
    let false_alarms = done.1;
    log(format!(
        "anomaly-to-webhook: {} warm-up readings scored in {warm_s:.1}s ({false_alarms} flagged)",
        all.len()
    ));
    // The pipeline idle again (projections, time series), and the action orchestrator's consumer
    // in its group, before the first outlier.
    let settle_after = ctx.settle(Duration::from_secs(10)).await;
    let health_url = format!("{}/health", a.actions_health_url);
    let t_h = Instant::now();
    let mut actions_healthy = false;
    while t_h.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = client.get(&health_url).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["status"] == "healthy"
        {
            actions_healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = receiver.count();

    // Outliers, open loop: one every 1/rate seconds, each on its own task.
    log(format!(
        "anomaly-to-webhook: {devices} outliers at {rate}/s ({n_warm} warm-up)"
    ));
    let ingest_url = format!("{}/api/v1/ingest", a.ingest_url);
    let m0 = cpu_mark(&a);
    let start = Instant::now() + Duration::from_millis(20);
    let mut set = tokio::task::JoinSet::new();
    for k in 0..devices {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let rb = auth(client.post(&ingest_url)).json(&json!({
            "event_type": "sensor.reading", "aggregate_id": device(k),
            "payload": {"value": 80.0, "unit": "celsius"}}));
        set.spawn(async move {
            let mut o = Outlier {
                index: k,
                scheduled: at,
                status: None,
                error: None,
                accepted: None,
                event_id: None,
            };
            match rb.send().await {
                Ok(r) => {
                    let t = Instant::now();
                    o.status = Some(r.status().as_u16());
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if o.status == Some(202) {
                        o.accepted = Some(t);
                        o.event_id = v["event_id"].as_str().map(str::to_string);
                    }
                }
                Err(e) => o.error = Some(e.to_string()),
            }
            o
        });
    }
    let mut sent: Vec<Outlier> = Vec::with_capacity(devices);
    while let Some(o) = set.join_next().await {
        sent.push(o?);
    }
    sent.sort_by_key(|o| o.index);
    let ids: HashMap<String, usize> = sent
        .iter()
        .filter_map(|o| Some((o.event_id.clone()?, o.index)))
        .collect();

    // Wait for a webhook per accepted outlier: up to 30 s after the last one was sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut seen, mut arrived) = (before, std::collections::HashSet::new());
    while arrived.len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (total, new) = receiver.sources_from(seen);
        seen = total;
        arrived.extend(new.into_iter().filter(|s| ids.contains_key(s)));
    }
    let m1 = cpu_mark(&a);
    // Late duplicates, if any, arrive within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = receiver.take();

    // The first call per outlier counts; later ones are duplicates.
    let mut first: HashMap<&str, usize> = HashMap::new();
    let (mut duplicates, mut unexpected, mut bad_signature) = (0u64, 0u64, 0u64);
    for (i, c) in calls.iter().enumerate() {
        if !hook::verify(secret, c) {
            bad_signature += 1;
        }
        let v = c.json();
        let source = v
            .pointer("/payload/source_event_id")
            .and_then(Value::as_str)
            .and_then(|s| ids.get_key_value(s));
        match source {
            Some((s, _)) if v["event_type"] == "ai.anomaly" => {
                if first.contains_key(s.as_str()) {
                    duplicates += 1;
                } else {
                    first.insert(s.as_str(), i);
                }
            }
            _ => unexpected += 1,
        }
    }

    let (mut h, mut h_sent, mut h_accept) = (histogram(), histogram(), histogram());
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0u64;
    let mut lost_measured = 0u64;
    let mut delivered_measured = 0u64;
    let mut wall_of: HashMap<Uuid, i64> = HashMap::new();
    let mut errors: Vec<String> = Vec::new();
    for o in &sent {
        let measured = o.index >= n_warm;
        if let Some(e) = &o.error {
            *failures.entry("error".into()).or_default() += 1;
            if errors.len() < 5 {
                errors.push(format!("outlier {}: {e}", o.index));
            }
            continue;
        }
        if let Some(s) = o.status.filter(|s| *s != 202) {
            *failures.entry(s.to_string()).or_default() += 1;
            continue;
        }
        let (Some(id), Some(acc)) = (&o.event_id, o.accepted) else {
            continue;
        };
        if measured {
            h_accept.saturating_record((acc - o.scheduled).as_micros().max(1) as u64);
        }
        match first.get(id.as_str()) {
            Some(&i) => {
                let c = &calls[i];
                if let Ok(u) = Uuid::parse_str(id) {
                    wall_of.insert(u, c.wall_us);
                }
                if measured {
                    delivered_measured += 1;
                    h.saturating_record(
                        c.at.saturating_duration_since(acc).as_micros().max(1) as u64
                    );
                    h_sent.saturating_record(
                        c.at.saturating_duration_since(o.scheduled)
                            .as_micros()
                            .max(1) as u64,
                    );
                }
            }
            None => {
                lost += 1;
                if measured {
                    lost_measured += 1;
                }
            }
        }
    }
    let accepted_measured = sent
        .iter()
        .filter(|o| o.index >= n_warm && o.accepted.is_some())
        .count();

    // Where the time goes, from the stored timestamps (the same machine clock): the reading's
    // ingested_at, the sidecar's scoring transaction (ai.inference_results.created_at), the
    // ai.anomaly's ingested_at (accepted by the API) and stored_at (the outbox processor's claim),
    // the delivery's created_at (recorded by the action orchestrator), the webhook's arrival.
    let measured_ids: Vec<Uuid> = sent
        .iter()
        .filter(|o| o.index >= n_warm)
        .filter_map(|o| Uuid::parse_str(o.event_id.as_deref()?).ok())
        .collect();
    type Stamps = (
        Uuid,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let stamps: Vec<Stamps> = sqlx::query_as(
        "SELECT r.event_id,
                (extract(epoch FROM r.ingested_at) * 1e6)::float8,
                (extract(epoch FROM ir.created_at) * 1e6)::float8,
                (extract(epoch FROM an.ingested_at) * 1e6)::float8,
                (extract(epoch FROM an.stored_at) * 1e6)::float8,
                (extract(epoch FROM d.created_at) * 1e6)::float8
         FROM ingestion.event_store r
         LEFT JOIN ai.inference_results ir ON ir.event_id = r.event_id
         LEFT JOIN ingestion.event_store an
                ON an.event_type = 'ai.anomaly'
               AND an.payload->>'source_event_id' = r.event_id::text
         LEFT JOIN actions.deliveries d ON d.event_id = an.event_id AND d.rule_id = $2
         WHERE r.event_id = ANY($1)",
    )
    .bind(&measured_ids)
    .bind(rule_id)
    .fetch_all(&db)
    .await
    .unwrap_or_else(|e| {
        log(format!("anomaly-to-webhook: stage breakdown skipped: {e}"));
        Vec::new()
    });
    let mut stages: Vec<Histogram<u64>> = (0..5).map(|_| histogram()).collect();
    for (id, ingested, scored, accepted, stored, recorded) in &stamps {
        let hook_at = wall_of.get(id).map(|w| *w as f64);
        let points = [*ingested, *scored, *accepted, *stored, *recorded, hook_at];
        for (s, hist) in stages.iter_mut().enumerate() {
            if let (Some(x), Some(y)) = (points[s], points[s + 1]) {
                hist.saturating_record((y - x).max(1.0) as u64);
            }
        }
    }
    const STAGES: [&str; 5] = [
        "reading ingested → scored by the sidecar",
        "→ ai.anomaly accepted by the API",
        "→ in the event store (processor claim)",
        "→ delivery recorded by the action orchestrator",
        "→ webhook received",
    ];
    let stage_text: Vec<String> = STAGES
        .iter()
        .zip(&stages)
        .map(|(name, h)| format!("{name} {}", percentiles_text(h)))
        .collect();

    let mut r = Row::new(ANOMALY_ROW);
    r.latency(&h);
    r.value = r.p99_us.map(|u| u as f64 / 1000.0);
    r.unit = "ms p99".into();
    r.result = format!(
        "{} of {} outliers → signed webhook, {lost} lost",
        thousands(delivered_measured as f64),
        thousands(n_measured as f64)
    );
    if lost > 0 {
        failures.insert("lost".into(), lost);
    }
    if duplicates > 0 {
        failures.insert("duplicate-webhook".into(), duplicates);
    }
    if unexpected > 0 {
        failures.insert("unexpected-webhook".into(), unexpected);
    }
    if bad_signature > 0 {
        failures.insert("bad-signature".into(), bad_signature);
    }
    if false_alarms > 0 {
        failures.insert("normal-reading-flagged".into(), false_alarms as u64);
    }
    r.failures = failures;
    r.goal = ANOMALY_GOAL.into();
    r.goal_met = r.p99_us.map(|p| {
        p <= 250_000
            && lost == 0
            && bad_signature == 0
            && accepted_measured == n_measured
            && delivered_measured as usize == n_measured
    });
    let cpu = cpu_use(&m0, &m1);
    let mut notes = Vec::new();
    if !settle.is_empty() {
        notes.push(format!("before: {settle}"));
    }
    if !settle_after.is_empty() {
        notes.push(format!("after the warm-up: {settle_after}"));
    }
    if !actions_healthy {
        notes.push(
            "the action orchestrator's /health was not \"healthy\" within 30 s of the warm-up"
                .into(),
        );
    }
    r.config = format!(
        "{devices} devices warmed up with {readings} normal readings each (20 ± 0.5; batches of 100; the sidecar flags a reading after {warmup} and above {threshold}σ), scored in {warm_s:.1}s; then one outlier (80.0, ≈200σ) per device, each the device's first, open loop {rate}/s × {:.0}s (+{:.0}s warm-up, excluded from the histogram, checked for loss); latency = the reading's 202 answer → the webhook request at the bench's receiver (axum on 127.0.0.1, answers 200); every call's Standard Webhooks signature verified afterwards (HMAC-SHA256 with the rule's whsec_ secret, timestamp within 5 min); rule on ai.anomaly, no condition, dedup_window_s 0; sidecar: {} -m ai_inference (ai-inference/, defaults but its own port, consumer group {}, the run's database, broker and topic prefix; started for this row, healthy after {sidecar_start_s:.1}s, stopped after it); send → webhook p50/p99 {}; send → 202 p50/p99 {}; stages p50/p99: {}; {}; {}{}",
        a.anomaly_duration().as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.ai_python.display(),
        sidecar.group,
        percentiles_text(&h_sent),
        percentiles_text(&h_accept),
        stage_text.join(", "),
        r.failures_text(),
        cpu_text(&cpu),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    );
    let stage_json: Vec<Value> = STAGES
        .iter()
        .zip(&stages)
        .map(|(name, h)| json!({ "stage": name, "us": quantiles(h) }))
        .collect();
    r.details = json!({
        "cpu": cpu,
        "devices": devices,
        "warmup_readings_per_device": readings,
        "sidecar_model": model,
        "sidecar_healthy_after_s": sidecar_start_s,
        "warmup_scored_s": warm_s,
        "outliers_sent": sent.len(),
        "outliers_measured": n_measured,
        "accepted_measured": accepted_measured,
        "delivered_measured": delivered_measured,
        "lost": lost,
        "lost_measured": lost_measured,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "bad_signature": bad_signature,
        "webhook_calls": calls.len(),
        "send_to_webhook_us": quantiles(&h_sent),
        "send_to_202_us": quantiles(&h_accept),
        "stages": stage_json,
        "errors": errors,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
