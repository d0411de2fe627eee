//! Kafka clients of the bench.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::cli::Args;
use crate::log;

pub fn kafka_base(brokers: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "cornjacket-bench");
    c
}

/// Deletes every topic whose name starts with `--topic-prefix` (the run's own, `bench<epoch>.`).
pub async fn drop_topics(a: &Args) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let p = a.topic_prefix.clone();
    if p.is_empty() {
        bail!("--drop-topics needs a --topic-prefix");
    }
    let c = kafka_base(&a.kafka_brokers);
    let admin: AdminClient<DefaultClientContext> =
        tokio::task::spawn_blocking(move || c.create()).await??;
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
