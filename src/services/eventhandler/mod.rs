//! Event handler (health on port 8084): the consumer group that builds the read models
//! (projections) and keeps the dead-letter queue. Owns the `eventhandler` schema.

mod consumer;
pub mod handlers;
pub mod rebuild;
pub mod retention;
pub mod store;

crate::service_migrations!("eventhandler", "migrations/eventhandler");

use std::collections::HashSet;
use std::sync::Mutex;

use super::ServiceContext;
use super::scaffold::{self, ConsumerHealth, ConsumerService, Spec, Started};
use crate::config::EventHandlerConfig;
use consumer::Projections;

struct EventHandler {
    cfg: EventHandlerConfig,
    /// `(consumer, status)` label sets of `cj_dlq_entries` exported so far.
    dlq_labels: Mutex<HashSet<(String, String)>>,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let cfg = ctx.config.eventhandler.clone();
    let spec = Spec {
        service: super::Service::Eventhandler,
        group: cfg.consumer_group.clone(),
        topics: cfg.topics.clone(),
        retry_delays: cfg.retry_delays.clone(),
        max_batch: cfg.max_batch,
    };
    // The own group's entries are exported (at 0) from the start.
    let dlq_labels = ["pending", "replayed", "discarded"]
        .map(|s| (cfg.consumer_group.clone(), s.to_string()))
        .into_iter()
        .collect();
    let service = EventHandler {
        cfg,
        dlq_labels: Mutex::new(dlq_labels),
    };
    scaffold::run(ctx, spec, service, None).await
}

impl ConsumerService for EventHandler {
    type Sink = Projections;

    async fn start(&self, ctx: &Started) -> anyhow::Result<Projections> {
        let r = &ctx.config.retention;
        if r.enabled {
            ctx.jobs.spawn(retention::run(
                ctx.pool.clone(),
                ctx.clock_guard(),
                r.projections,
                r.interval,
                ctx.jobs.shutdown.clone(),
            ));
        }
        Ok(Projections::new(ctx.pool.clone(), &self.cfg.consumer_group))
    }

    async fn sample(&self, health: &ConsumerHealth) {
        if let Err(e) = self.dlq_gauges(&health.pool).await {
            tracing::debug!(error = %e, "Could not sample the dead letters.");
        }
    }
}

impl EventHandler {
    /// Samples the dead-letter counts into `cj_dlq_entries{consumer,status}`; a label set that
    /// emptied is set to 0 rather than left at its last value.
    async fn dlq_gauges(&self, pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let sizes = store::dlq_sizes(pool).await?;
        let mut labels = self.dlq_labels.lock().expect("dlq labels lock");
        labels.extend(sizes.iter().map(|(c, st, _)| (c.clone(), st.clone())));
        for (consumer, status) in labels.iter() {
            let n = sizes
                .iter()
                .find(|(c, st, _)| c == consumer && st == status)
                .map_or(0, |(_, _, n)| *n);
            metrics::gauge!("cj_dlq_entries", "consumer" => consumer.clone(), "status" => status.clone())
            .set(n as f64);
        }
        Ok(())
    }
}
