//! broker-baseline: a bare producer with the platform's settings, the processor's pattern and
//! a produce → consume round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::bodies::envelope;
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::kafka::{self, kafka_base};
use crate::load::{Load, histogram};
use crate::log;
use crate::report::{Row, fmt_us, quantiles, thousands};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let settle = ctx.settle(Duration::from_secs(5)).await;
    let a = ctx.a.clone();
    let topic = format!("{}bench-broker-baseline", a.topic_prefix);
    let brokers = a.kafka_brokers.clone();
    let admin: AdminClient<DefaultClientContext> = kafka::create(kafka_base(&brokers)).await?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?
    {
        if let Err((t, e)) = r
            && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            bail!("creating {t}: {e}");
        }
    }
    // The platform's producer settings (src/infra/bus.rs): acks=all, idempotence, its default
    // linger (CJ_KAFKA_PRODUCER_LINGER_MS).
    let linger = platform_defaults().kafka.linger_ms;
    let producer: FutureProducer = {
        let mut c = kafka_base(&brokers);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger.to_string())
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "10000");
        kafka::create::<FutureProducer>(c).await?
    };
    let messages: Arc<Vec<(String, String)>> = Arc::new(
        (0..4096u64)
            .map(|s| {
                let (_, agg, json) = envelope(s);
                (agg, json)
            })
            .collect(),
    );
    let size = messages.iter().map(|m| m.1.len()).sum::<usize>() / messages.len();

    // (1) Windowed throughput: up to 10,000 messages in flight.
    // Short: every message stays in an in-memory broker's RAM, and the rate settles in seconds.
    let dur = a.broker_duration();
    log(format!("broker-baseline: {dur:?}"));
    let m0 = cpu_mark(&a);
    let start = Instant::now();
    let (mstart, mend) = (start + a.warmup(), start + a.warmup() + dur);
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut load = Load::new();
    let mut seq = 0u64;
    use futures::StreamExt;
    loop {
        let now = Instant::now();
        if now >= mend && inflight.is_empty() {
            break;
        }
        while now < mend && inflight.len() < 10_000 {
            let (agg, json) = &messages[(seq % messages.len() as u64) as usize];
            let rec = FutureRecord::to(&topic)
                .key(agg.as_str())
                .payload(json.as_str());
            match producer.send_result(rec) {
                Ok(f) => {
                    let t0 = Instant::now();
                    inflight.push(async move { (t0, f.await) });
                    seq += 1;
                }
                Err(_) => break, // local queue full: wait for deliveries
            }
        }
        if let Some((t0, res)) = inflight.next().await {
            let t1 = Instant::now();
            if t0 >= mstart && t1 <= mend {
                match res {
                    Ok(Ok(_)) => {
                        load.ok += 1;
                        load.hist
                            .saturating_record((t1 - t0).as_micros().max(1) as u64);
                    }
                    Ok(Err((e, _))) => load.error(e.to_string()),
                    Err(_) => load.error("canceled".into()),
                }
            }
        }
    }
    let m1 = cpu_mark(&a);
    load.window = dur;

    // (2) The outbox processor's pattern: 4 workers, each publishing 100 and awaiting all acks.
    let pattern_dur = Duration::from_secs(if a.quick { 2 } else { 5 });
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + pattern_dur;
    let mut set = tokio::task::JoinSet::new();
    for wid in 0..4u64 {
        let (producer, topic, messages, done) = (
            producer.clone(),
            topic.clone(),
            messages.clone(),
            done.clone(),
        );
        set.spawn(async move {
            let mut s = wid * 100_000;
            while Instant::now() < end {
                let mut fs = Vec::with_capacity(100);
                for _ in 0..100 {
                    let (agg, json) = &messages[(s % messages.len() as u64) as usize];
                    s += 1;
                    let rec = FutureRecord::to(&topic)
                        .key(agg.as_str())
                        .payload(json.as_str());
                    if let Ok(f) = producer.send_result(rec) {
                        fs.push(f);
                    }
                }
                for f in fs {
                    if let Ok(Ok(_)) = f.await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let pattern_rate = done.load(Ordering::Relaxed) as f64 / pattern_dur.as_secs_f64();

    // (3) The broker's share of e2e-latency: produce → consume at 1,000 msg/s with the event
    // handler's consumer settings.
    let rtt_dur = Duration::from_secs(if a.quick { 3 } else { 8 });
    let rtt = match broker_round_trip(
        &brokers,
        &topic,
        &producer,
        &messages,
        rtt_dur,
        a.rtt_fetch_wait_ms,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            log(format!("broker-baseline: round trip not measured: {e:#}"));
            histogram()
        }
    };
    let _ = admin.delete_topics(&[&topic], &opts).await;

    let mut r = Row::new("broker-baseline");
    r.rate(load.per_sec(load.ok), "msg/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.goal = "reference for publish cost".into();
    r.config = format!(
        "rdkafka {} FutureProducer, acks=all, enable.idempotence=true, linger.ms={}, batch.num.messages=10000 (the platform's producer settings), ≤10,000 in flight, {:.0}s (+{:.0}s warm-up), bench-owned topic {topic} (3 partitions), key = aggregate_id, {size}-byte envelope JSON; latency send→ack; the processor's pattern (4 workers × 100-message batches, each awaiting all acks): {} msg/s; produce → consume round trip at 1,000 msg/s for {:.0}s with consumer fetch.wait.max.ms={} (the platform's consumers use {}): p50 {} p99 {} max {}; {}; {}{}",
        rdkafka::util::get_rdkafka_version().1,
        linger,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        thousands(pattern_rate),
        rtt_dur.as_secs_f64(),
        a.rtt_fetch_wait_ms,
        platform_defaults().kafka.fetch_wait_max_ms,
        fmt_us((!rtt.is_empty()).then(|| rtt.value_at_quantile(0.5))),
        fmt_us((!rtt.is_empty()).then(|| rtt.value_at_quantile(0.99))),
        fmt_us((!rtt.is_empty()).then(|| rtt.max())),
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "message_bytes": size,
        "processor_pattern_msg_per_s": pattern_rate,
        "round_trip_1000_per_s_us": quantiles(&rtt),
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// Produces at 1,000 msg/s and consumes the same partitions with the event handler's consumer
/// settings; returns the produce → receive latencies.
async fn broker_round_trip(
    brokers: &str,
    topic: &str,
    producer: &rdkafka::producer::FutureProducer,
    messages: &Arc<Vec<(String, String)>>,
    dur: Duration,
    fetch_wait_ms: u32,
) -> anyhow::Result<Histogram<u64>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    use rdkafka::{Message, Offset, TopicPartitionList};

    let consumer: StreamConsumer = {
        let mut c = kafka_base(brokers);
        c.set("group.id", format!("{topic}.rtt"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string());
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
            let consumer: StreamConsumer = kafka::create_blocking(&c)?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition_offset(&topic, p, Offset::End)?;
            }
            consumer.assign(&tpl)?;
            Ok(consumer)
        })
        .await??
    };
    let origin = Instant::now();
    let reader = tokio::spawn(async move {
        let mut h = histogram();
        let deadline = tokio::time::Instant::now() + dur + Duration::from_secs(3);
        while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
            let sent = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == "sent_us"))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
            if let Some(sent) = sent {
                let now = origin.elapsed().as_micros() as u64;
                h.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
        h
    });
    // Let the consumer's first fetch reach the broker before producing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let total = dur.as_millis() as u64;
    let mut acks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let at = start + Duration::from_millis(seq);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let (agg, json) = &messages[(seq % messages.len() as u64) as usize];
        let sent = origin.elapsed().as_micros().to_string();
        let rec = FutureRecord::to(topic)
            .key(agg.as_str())
            .payload(json.as_str())
            .headers(OwnedHeaders::new().insert(Header {
                key: "sent_us",
                value: Some(sent.as_str()),
            }));
        if let Ok(f) = producer.send_result(rec) {
            acks.push(f);
        }
    }
    for f in acks {
        let _ = f.await;
    }
    Ok(reader.await?)
}

/// The platform's configuration defaults, which rows quote.
fn platform_defaults() -> cornjacket::config::Config {
    cornjacket::config::Config::from_map(&Default::default()).expect("defaults are valid")
}
