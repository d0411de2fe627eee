//! mqtt: simulated devices publishing with QoS 1, and what the platform took in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpStream;

use crate::bodies::mix;
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::http::REQUEST_TIMEOUT;
use crate::load::Load;
use crate::report::{Row, thousands};
use crate::{log, mqtt};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    const GOAL: &str = "≥ 10,000 msg/s";
    let a = ctx.a.clone();
    if a.mqtt_url == "off" {
        ctx.rows.insert(
            "mqtt".into(),
            Row::not_measured("mqtt", "not measured: skipped (--mqtt-url off)", GOAL),
        );
        return Ok(());
    }
    let u = Arc::new(mqtt::parse(&a.mqtt_url)?);
    let reachable = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&u.host)).await;
    if !matches!(reachable, Ok(Ok(_))) {
        let why = format!(
            "not measured: no MQTT broker answers on {} (make infra-up starts Mosquitto; --mqtt-url points elsewhere)",
            u.host
        );
        ctx.rows
            .insert("mqtt".into(), Row::not_measured("mqtt", &why, GOAL));
        return Ok(());
    }
    let run = ctx.run.clone();
    let devices = a.mqtt_devices.max(1);
    log(format!("mqtt: {devices} devices, {:?}", a.duration()));
    let start = Instant::now();
    let (mstart, mend) = (start + a.warmup(), start + a.warmup() + a.duration());
    let m0 = cpu_mark(&a);
    let mut set = tokio::task::JoinSet::new();
    // Sent (a PUBLISH written) and acknowledged by the broker (its PUBACK read).
    let sent = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    for d in 0..devices {
        let (u, run, prefix) = (u.clone(), run.clone(), a.mqtt_topic_prefix.clone());
        let (published, sent) = (published.clone(), sent.clone());
        set.spawn(async move {
            let mut load = Load::new();
            let device = format!("mq-{run}-{d:04}");
            let topic = format!("{prefix}devices/{device}/events");
            let mut s = match mqtt::connect(&u, &format!("cjbench-{run}-{d}")).await {
                Ok(s) => s,
                Err(e) => {
                    load.error(e.to_string());
                    return load;
                }
            };
            let mut buf = Vec::new();
            let mut id: u16 = 0;
            let mut seq = d as u64;
            while Instant::now() < mend {
                id = id.wrapping_add(1).max(1);
                let r = mix(seq);
                seq += devices as u64;
                let payload = format!(
                    r#"{{"event_type":"sensor.reading","payload":{{"value":{}.{:02},"unit":"celsius"}}}}"#,
                    r % 40,
                    (r >> 8) % 100
                );
                let t0 = Instant::now();
                sent.fetch_add(1, Ordering::Relaxed);
                let res = tokio::time::timeout(REQUEST_TIMEOUT, mqtt::publish(&mut s, &topic, id, payload.as_bytes(), &mut buf)).await;
                let t1 = Instant::now();
                let measured = t0 >= mstart && t1 <= mend;
                match res {
                    Ok(Ok(())) => {
                        published.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            load.ok += 1;
                            load.hist.saturating_record((t1 - t0).as_micros().max(1) as u64);
                        }
                    }
                    Ok(Err(e)) => {
                        load.error(e.to_string());
                        break;
                    }
                    Err(_) => {
                        load.error("timed out".into());
                        break;
                    }
                }
            }
            load
        });
    }
    let mut load = Load::new();
    while let Some(l) = set.join_next().await {
        if let Ok(l) = l {
            load.merge(l);
        }
    }
    load.window = a.duration();
    let m1 = cpu_mark(&a);
    let cpu = cpu_use(&m0, &m1);
    // Whether the platform took them in: events from these devices in the outbox and event store,
    // counted until all are there or the count stops growing for 15 s (at most 180 s).
    let published = published.load(Ordering::Relaxed) as i64;
    let sent = sent.load(Ordering::Relaxed) as i64;
    let last_publish = Instant::now();
    let count = || async {
        let db = ctx.db.as_ref()?;
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM ingestion.outbox
                     WHERE event_payload->>'aggregate_id' LIKE 'mq-' || $1 || '-%')
                  + (SELECT count(*) FROM ingestion.event_store
                     WHERE aggregate_id LIKE 'mq-' || $1 || '-%')",
        )
        .bind(&run)
        .fetch_one(db)
        .await
        .ok()
    };
    let (mut ingested, mut grew_at) = (count().await, Instant::now());
    // Patient: the broker may acknowledge faster than the platform takes in, and then holds the
    // difference in the platform's session; the platform drains it at its own pace, and each
    // count (a scan of the outbox) takes seconds once it is large. Stopping early would count
    // messages still queued at the broker as never taken in.
    while ingested.is_some_and(|n| n < published)
        && grew_at.elapsed() < Duration::from_secs(15)
        && last_publish.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = count().await;
        if n > ingested {
            grew_at = Instant::now();
        }
        ingested = n;
    }
    let caught_up = ingested
        .filter(|n| *n >= published)
        .map(|_| last_publish.elapsed());
    // Both rates over the whole publishing time (warm-up included, as the counts are): what the
    // broker acknowledged, and what the platform had taken in by the time it caught up (or by
    // the last count).
    let publishing = (last_publish - start).as_secs_f64().max(1e-9);
    let acked_rate = published as f64 / publishing;
    let taken_rate = ingested.map(|n| {
        n as f64
            / (last_publish - start + caught_up.unwrap_or(last_publish.elapsed()))
                .as_secs_f64()
                .max(1e-9)
    });
    let mut r = Row::new("mqtt");
    r.rate(load.per_sec(load.ok), "msg/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = GOAL.into();
    r.config = format!(
        "{devices} simulated devices, one connection each, QoS 1 publish to {}devices/{{id}}/events on the broker at {} with one PUBACK awaited at a time, {:.0}s (+{:.0}s warm-up); the rate counts broker PUBACKs; sent {}, acknowledged by the broker {} ({:.0} msg/s), taken in by the platform {} ({} msg/s; warm-up included; counted in its outbox + event store){}; {}; {}",
        a.mqtt_topic_prefix,
        u.host,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        thousands(sent as f64),
        thousands(published as f64),
        acked_rate,
        ingested.map_or("?".into(), |n| thousands(n as f64)),
        taken_rate.map_or("?".into(), |r| format!("{r:.0}")),
        match caught_up {
            Some(d) => format!(
                ", all of them {:.1}s after the last publish",
                d.as_secs_f64()
            ),
            None => " (the count stopped growing)".to_string(),
        },
        r.failures_text(),
        cpu_text(&cpu)
    );
    // Taken in must equal acknowledged: a PUBACKed message the platform never got is a loss.
    r.goal_met =
        Some(load.per_sec(load.ok) >= 10_000.0 && ingested.is_some_and(|n| n >= published));
    r.details = json!({
        "sent": sent,
        "published": published,
        "acknowledged_per_s": acked_rate,
        "platform_ingested_per_s": taken_rate,
        "platform_ingested": ingested,
        "platform_caught_up_after_s": caught_up.map(|d| d.as_secs_f64()),
        "cpu": cpu,
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
