//! The bus: brokers, topics and the producer's limits, and the outbox processor that feeds it.

use std::time::Duration;

use super::ConfigError;
use super::vars::Vars;

/// The three base topics of SPEC §5, with the optional test/tenant prefix applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub sensor: String,
    pub user: String,
    pub system: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            sensor: format!("{prefix}sensor-events"),
            user: format!("{prefix}user-actions"),
            system: format!("{prefix}system-events"),
        }
    }

    pub fn all(&self) -> [&str; 3] {
        [&self.sensor, &self.user, &self.system]
    }

    /// The topic for an event type, by prefix (SPEC §5).
    pub fn for_event_type(&self, event_type: &str) -> &str {
        match crate::envelope::route(event_type) {
            crate::envelope::Route::Sensor => &self.sensor,
            crate::envelope::Route::User => &self.user,
            crate::envelope::Route::System => &self.system,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `CJ_KAFKA_BROKERS` (alias `CJ_REDPANDA_BROKERS`): bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// `CJ_KAFKA_PARTITIONS`: partitions for topics the platform creates (1–1024).
    pub partitions: i32,
    /// `CJ_KAFKA_RETENTION`: `retention.ms` for created topics.
    pub retention: Duration,
    /// `CJ_KAFKA_TOPIC_PREFIX`: prepended to every topic name (isolates tests and tenants).
    pub topic_prefix: String,
    /// `CJ_KAFKA_PRODUCER_LINGER_MS`: how long the producer gathers a batch.
    pub linger_ms: u32,
    /// `CJ_KAFKA_MESSAGE_TIMEOUT`: how long a publish may wait for the broker before failing.
    pub message_timeout: Duration,
    /// `CJ_KAFKA_FETCH_WAIT_MAX_MS`: the longest a consumer's fetch waits for data.
    pub fetch_wait_max_ms: u32,
    /// `CJ_KAFKA_MESSAGE_MAX_BYTES`: the largest message the producer sends (librdkafka's
    /// `message.max.bytes`; default 1,000,000, within Kafka's and Redpanda's default topic limit of
    /// 1 MiB). Must leave room for the largest event ingestion admits ([`ENVELOPE_OVERHEAD`]).
    pub message_max_bytes: usize,
    pub topics: Topics,
}

impl KafkaConfig {
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
        let brokers = v
            .raw(&["CJ_KAFKA_BROKERS", "CJ_REDPANDA_BROKERS"])
            .map(|(var, b)| {
                let ok = b.split(',').all(|hp| {
                    let hp = hp.trim();
                    hp.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                });
                if ok {
                    Ok(b)
                } else {
                    Err(Vars::err(&var, &b, "host:port[,host:port...]"))
                }
            })
            .transpose()?
            .unwrap_or_else(|| "localhost:9092".to_string());
        let topic_prefix = v.string("CJ_KAFKA_TOPIC_PREFIX", "");
        if !topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Vars::err(
                "CJ_KAFKA_TOPIC_PREFIX",
                &topic_prefix,
                "letters, digits, '.', '_' or '-'",
            ));
        }
        let topics = Topics::with_prefix(&topic_prefix);
        Ok(KafkaConfig {
            brokers,
            partitions: v.ranged("CJ_KAFKA_PARTITIONS", 3, 1, 1024)?,
            retention: v.duration("CJ_KAFKA_RETENTION", Duration::from_secs(24 * 3600))?,
            linger_ms: v.ranged("CJ_KAFKA_PRODUCER_LINGER_MS", 5, 0, 10_000)?,
            fetch_wait_max_ms: v.ranged("CJ_KAFKA_FETCH_WAIT_MAX_MS", 10, 1, 10_000)?,
            message_timeout: v.duration("CJ_KAFKA_MESSAGE_TIMEOUT", Duration::from_secs(10))?,
            message_max_bytes: v.ranged(
                "CJ_KAFKA_MESSAGE_MAX_BYTES",
                1_000_000,
                1000,
                1_000_000_000,
            )?,
            topic_prefix,
            topics: topics.clone(),
        })
    }
}

/// What an envelope adds to the client's body at most, besides its subject: ids, times,
/// metadata and the JSON around them (a few hundred bytes), with room to spare.
pub const ENVELOPE_OVERHEAD: usize = 4096;

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// `CJ_OUTBOX_WORKER_COUNT`: processor workers in this process (1–16).
    pub worker_count: usize,
    /// `CJ_OUTBOX_BATCH_SIZE`: rows claimed per batch (1–10000).
    pub batch_size: i64,
    /// `CJ_OUTBOX_MAX_RETRIES`: past this many failed attempts a row is reported (health degraded).
    pub max_retries: i32,
    /// `CJ_OUTBOX_POLL_INTERVAL`: the watchdog poll that covers missed notifications.
    pub poll_interval: Duration,
    /// `CJ_OUTBOX_ENABLED`: run the processor inside the ingestion service (default true).
    pub enabled: bool,
    /// `CJ_OUTBOX_BUS_WATCH_INTERVAL`: how often the processor compares the bus with what it
    /// published (a loss is also checked after every failed publish) and samples consumer
    /// progress (default 2s).
    pub bus_watch_interval: Duration,
    /// `CJ_AI_CONSUMER_GROUP`: the sidecar's consumer group (shared with the sidecar), whose
    /// progress on the sensor topic bounds what a bus recovery republishes; `off` when no sidecar
    /// runs (default `ai-inference`).
    pub sidecar_group: Option<String>,
}

impl OutboxConfig {
    pub(super) fn parse(v: &Vars) -> Result<Self, ConfigError> {
        let outbox = OutboxConfig {
            worker_count: v.ranged("CJ_OUTBOX_WORKER_COUNT", 4, 1, 16)?,
            batch_size: v.ranged("CJ_OUTBOX_BATCH_SIZE", 100, 1, 10_000)?,
            max_retries: v.ranged("CJ_OUTBOX_MAX_RETRIES", 5, 0, 1_000_000)?,
            poll_interval: v.duration("CJ_OUTBOX_POLL_INTERVAL", Duration::from_secs(5))?,
            enabled: v.bool("CJ_OUTBOX_ENABLED", true)?,
            bus_watch_interval: v
                .duration("CJ_OUTBOX_BUS_WATCH_INTERVAL", Duration::from_secs(2))?,
            sidecar_group: Some(v.string("CJ_AI_CONSUMER_GROUP", "ai-inference"))
                .filter(|g| !g.is_empty() && g != "off"),
        };
        if outbox.bus_watch_interval.is_zero() {
            return Err(Vars::err(
                "CJ_OUTBOX_BUS_WATCH_INTERVAL",
                "0",
                "a positive duration such as 2s",
            ));
        }
        if outbox.poll_interval.is_zero() {
            return Err(Vars::err(
                "CJ_OUTBOX_POLL_INTERVAL",
                "0",
                "a positive duration such as 5s",
            ));
        }
        Ok(outbox)
    }
}
