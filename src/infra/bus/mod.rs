//! The Kafka-API bus: producers, consumers and topic administration built from config.
//! Client creation does blocking I/O in librdkafka, so it runs on the blocking pool (STYLE §8).
//! What an event looks like on the bus (key, body, headers) is [`message`]'s.

pub mod message;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::KafkaConfig;

fn base(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "cornjacket")
        .set("socket.keepalive.enable", "true")
        // Reconnect quickly after a broker restart; the default backs off to 10 s.
        .set("reconnect.backoff.max.ms", "2000")
        // A consumer that rejoins a restarted broker before the processor has recreated the
        // topics is assigned nothing, and librdkafka looks at a topic again only on the next
        // metadata refresh (5 minutes by default): the consumer would sit idle that long.
        .set("topic.metadata.refresh.interval.ms", "5000");
    c
}

/// The outbox processor's producer: acks=all and idempotence, so retries never reorder or
/// duplicate within a partition.
#[allow(
    clippy::disallowed_methods,
    reason = "infra::bus is where Kafka clients are created (clippy.toml)"
)]
pub async fn producer(cfg: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    let mut c = base(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        .set(
            "message.timeout.ms",
            cfg.message_timeout.as_millis().to_string(),
        );
    Ok(tokio::task::spawn_blocking(move || c.create::<FutureProducer>()).await??)
}

/// A producer that is replaced after a failed publish. A broker that lost its state (a restart
/// of Tansu in memory) no longer knows the idempotent producer's id and answers every produce
/// with `UnknownProducerId`, which librdkafka retries until the message times out; only a new
/// producer session (a new id) gets through again.
pub struct SharedProducer(std::sync::RwLock<Arc<FutureProducer>>);

impl SharedProducer {
    pub fn new(p: FutureProducer) -> Self {
        Self(std::sync::RwLock::new(Arc::new(p)))
    }

    pub fn get(&self) -> Arc<FutureProducer> {
        self.0.read().expect("producer lock").clone()
    }

    /// Replaces `failed` with a new producer, unless another caller already did.
    pub async fn replace(&self, failed: &Arc<FutureProducer>, cfg: &KafkaConfig) {
        if !Arc::ptr_eq(&self.get(), failed) {
            return;
        }
        match producer(cfg).await {
            Ok(p) => {
                let mut cur = self.0.write().expect("producer lock");
                if Arc::ptr_eq(&cur, failed) {
                    *cur = Arc::new(p);
                    tracing::info!("Started a new producer session after a failed publish.");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Could not create a new producer."),
        }
    }
}

/// How long a consumer holds offset commits back after losing the brokers (see
/// [`ConsumerState::commits_held`]): longer than a restarted broker takes to get the platform's
/// topics back and the consumer to notice their new ids.
pub const COMMIT_HOLD: Duration = Duration::from_secs(30);

/// What a consumer knows about itself, for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct ConsumerState {
    pub assigned: Mutex<Vec<(String, i32)>>,
    /// (topic, partition) → lag, from librdkafka's statistics.
    pub lag: Mutex<HashMap<(String, i32), i64>>,
    pub last_error: Mutex<Option<String>>,
    /// When the client last lost its connection to the brokers.
    pub broker_lost_at: Mutex<Option<std::time::Instant>>,
}

impl ConsumerState {
    pub fn total_lag(&self) -> i64 {
        self.lag
            .lock()
            .expect("lag lock")
            .values()
            .filter(|l| **l > 0)
            .sum()
    }
    /// Whether offset commits are held back: for [`COMMIT_HOLD`] after the brokers were lost.
    /// A broker that comes back empty (memory storage) would otherwise receive positions of the
    /// topics it lost, from messages fetched before the loss and handled after it, before the
    /// client notices that the topics were recreated; the next owner of such a partition would
    /// start past the head of the new log. Holding commits costs only redelivery.
    pub fn commits_held(&self) -> bool {
        self.broker_lost_at
            .lock()
            .expect("broker lock")
            .is_some_and(|t| t.elapsed() < COMMIT_HOLD)
    }

    pub fn assigned_count(&self) -> usize {
        self.assigned.lock().expect("assigned lock").len()
    }
}

/// Records rebalances and statistics into a [`ConsumerState`].
pub struct ObservedContext {
    pub group: String,
    pub state: Arc<ConsumerState>,
}

impl ClientContext for ObservedContext {
    fn stats(&self, stats: Statistics) {
        let mut lag = self.state.lag.lock().expect("lag lock");
        lag.clear();
        for (topic, t) in stats.topics {
            for (p, part) in t.partitions {
                if p >= 0 && part.consumer_lag >= 0 {
                    metrics::gauge!("cj_consumer_lag", "group" => self.group.clone(), "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                    lag.insert((topic.clone(), p), part.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, error = %error, reason, "Kafka client error.");
        *self.state.last_error.lock().expect("error lock") = Some(format!("{error}: {reason}"));
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)
        ) {
            *self.state.broker_lost_at.lock().expect("broker lock") =
                Some(std::time::Instant::now());
        }
    }
}

impl ConsumerContext for ObservedContext {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut assigned = self.state.assigned.lock().expect("assigned lock");
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements() {
                    let k = (e.topic().to_string(), e.partition());
                    if !assigned.contains(&k) {
                        assigned.push(k);
                    }
                }
                tracing::info!(group = %self.group, partitions = assigned.len(), "Partitions assigned.");
            }
            Rebalance::Revoke(tpl) => {
                let gone: Vec<_> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                assigned.retain(|k| !gone.contains(k));
                tracing::info!(group = %self.group, partitions = assigned.len(), "Partitions revoked.");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "Rebalance failed.");
            }
        }
    }
}

pub type ObservedConsumer = StreamConsumer<ObservedContext>;

/// A group consumer with auto-commit and auto offset store off: the caller stores each offset
/// once its side effect is durable and commits in batches (STYLE §8).
#[allow(
    clippy::disallowed_methods,
    reason = "infra::bus is where Kafka clients are created (clippy.toml)"
)]
pub async fn consumer(
    cfg: &KafkaConfig,
    group: &str,
    topics: &[String],
) -> anyhow::Result<(Arc<ObservedConsumer>, Arc<ConsumerState>)> {
    let mut c = base(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "2000")
        // The longest a fetch waits for data. Redpanda answers as soon as data arrives; Tansu only
        // when this expires, so it bounds the bus's share of end-to-end latency there.
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("partition.assignment.strategy", "range,roundrobin");
    let state = Arc::new(ConsumerState::default());
    let ctx = ObservedContext {
        group: group.to_string(),
        state: state.clone(),
    };
    let topics = topics.to_vec();
    let consumer = tokio::task::spawn_blocking(move || -> anyhow::Result<ObservedConsumer> {
        let consumer: ObservedConsumer = c.create_with_context(ctx)?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        Ok(consumer)
    })
    .await??;
    Ok((Arc::new(consumer), state))
}

/// Creates the topics that are missing (partitions and `retention.ms` from config); existing
/// ones are left as they are. Safe to call at any time — after a broker restart with in-memory
/// storage it recreates what was lost.
#[allow(
    clippy::disallowed_methods,
    reason = "infra::bus is where Kafka clients are created (clippy.toml)"
)]
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[&str]) -> anyhow::Result<()> {
    let c = base(cfg);
    let admin: AdminClient<DefaultClientContext> =
        tokio::task::spawn_blocking(move || c.create()).await??;
    let retention = cfg.retention.as_millis().to_string();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, cfg.partitions, TopicReplication::Fixed(1))
                .set("retention.ms", &retention)
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, "Topic created."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("could not create topic {t}: {e}"),
        }
    }
    Ok(())
}

/// Whether the broker answers a metadata request within the deadline (for `/health`).
pub async fn reachable(producer: Arc<FutureProducer>) -> Result<usize, String> {
    tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::client(producer.as_ref())
            .fetch_metadata(None, Duration::from_secs(2))
            .map(|m| m.brokers().len())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Commits stored offsets synchronously; used once on shutdown.
pub fn commit_now(consumer: &ObservedConsumer) {
    if consumer.context().state.commits_held() {
        return;
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        // Nothing stored since the last commit is the common case on shutdown.
        if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
            tracing::warn!(error = %e, "Final offset commit failed; the next owner re-reads from the last commit.");
        }
    }
}

/// How many partitions `topic` has, `None` when the broker does not know it. Blocking: call it
/// on the blocking pool.
pub fn partition_count<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// A client that reads a consumer group's committed offsets without joining the group.
pub struct GroupOffsets {
    pub group: String,
    consumer: BaseConsumer,
}

impl GroupOffsets {
    #[allow(
        clippy::disallowed_methods,
        reason = "infra::bus is where Kafka clients are created (clippy.toml)"
    )]
    pub async fn new(cfg: &KafkaConfig, group: &str) -> anyhow::Result<Self> {
        let mut c = base(cfg);
        c.set("group.id", group).set("enable.auto.commit", "false");
        let consumer = tokio::task::spawn_blocking(move || c.create::<BaseConsumer>()).await??;
        Ok(Self {
            group: group.to_string(),
            consumer,
        })
    }

    /// The committed offset of each of `partitions` partitions of `topic` (0 where the group has
    /// committed nothing). Blocking: call it on the blocking pool.
    pub fn committed(
        &self,
        topic: &str,
        partitions: usize,
        timeout: Duration,
    ) -> Result<Vec<i64>, KafkaError> {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p as i32);
        }
        let got = self.consumer.committed_offsets(tpl, timeout)?;
        Ok((0..partitions)
            .map(
                |p| match got.find_partition(topic, p as i32).map(|e| e.offset()) {
                    Some(rdkafka::Offset::Offset(o)) => o,
                    _ => 0,
                },
            )
            .collect())
    }
}

/// Enqueues `record` now (so records are sent in the order they are enqueued), waiting for room
/// while librdkafka's local queue is full, up to `deadline`.
pub async fn enqueue<'a>(
    producer: &FutureProducer,
    mut record: rdkafka::producer::FutureRecord<'a, str, str>,
    deadline: std::time::Instant,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec))
                if std::time::Instant::now() < deadline =>
            {
                record = rec;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}
