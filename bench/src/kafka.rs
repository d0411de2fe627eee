//! Kafka clients of the bench, created only here (clippy.toml keeps client creation to
//! infra::bus and here): the bench needs bare clients of its own, not the platform's.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::config::FromClientConfig;
use rdkafka::error::KafkaResult;

use crate::cli::Args;
use crate::log;

pub fn kafka_base(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "cornjacket-bench");
    c
}

/// Creates a client on the blocking pool: creation does blocking I/O in librdkafka.
pub async fn create<T: FromClientConfig + Send + 'static>(c: ClientConfig) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(move || create_blocking(&c)).await??)
}

/// Creates a client, blocking (for code already on the blocking pool).
#[allow(
    clippy::disallowed_methods,
    reason = "the bench's own bare clients (its client.id, fixed partitions, manual assignment): infra::bus's helpers build the platform's"
)]
pub fn create_blocking<T: FromClientConfig>(c: &ClientConfig) -> KafkaResult<T> {
    c.create()
}

/// Deletes every topic whose name starts with `--topic-prefix` (the run's own, `bench<epoch>.`).
pub async fn drop_topics(a: &Args) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let p = a.topic_prefix.clone();
    if p.is_empty() {
        bail!("--drop-topics needs a --topic-prefix");
    }
    let admin: AdminClient<DefaultClientContext> = create(kafka_base(&a.kafka_brokers)).await?;
    let names: Vec<String> = {
        let admin = &admin;
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .context("listing topics")?;
        md.topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(&p))
            .collect()
    };
    if names.is_empty() {
        return Ok(());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&refs, &opts).await? {
        if let Err((t, e)) = r {
            log(format!("could not delete topic {t}: {e}"));
        }
    }
    log(format!("deleted {} topic(s) named {p}*", names.len()));
    Ok(())
}
