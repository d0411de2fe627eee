//! Event handler (health on port 8084): the consumer group that builds the read models
//! (projections) and keeps the dead-letter queue. Owns the `eventhandler` schema.

mod consumer;
pub mod handlers;
pub mod rebuild;
pub mod retention;
pub mod store;

crate::service_migrations!("eventhandler", "migrations/eventhandler");

use std::sync::Arc;

use super::ServiceContext;
use super::scaffold::{self, ConsumerService, Spec, Started};
use crate::config::EventHandlerConfig;
use crate::infra::dlq;
use consumer::Projections;

struct EventHandler {
    cfg: EventHandlerConfig,
}

/// The event handler's dead letters, replayed through its handlers.
pub fn dead_letters(config: &EventHandlerConfig, pool: sqlx::PgPool) -> dlq::Owner {
    dlq::Owner {
        name: "eventhandler",
        table: "eventhandler.dlq",
        replay: dlq::Replay::InProcess(Arc::new(Projections::new(
            pool.clone(),
            &config.consumer_group,
        ))),
        pool,
    }
}

pub async fn run(ctx: ServiceContext<EventHandlerConfig>) -> anyhow::Result<()> {
    let cfg = ctx.config.clone();
    let spec = Spec {
        service: super::Service::Eventhandler,
        dead_letters: dead_letters(&cfg, ctx.db.clone()),
        group: cfg.consumer_group.clone(),
        topics: cfg.topics.clone(),
        retry_delays: cfg.retry_delays.clone(),
        max_batch: cfg.max_batch,
    };
    scaffold::run(ctx, spec, EventHandler { cfg }, None).await
}

impl ConsumerService for EventHandler {
    type Sink = Projections;

    async fn start(&self, ctx: &Started) -> anyhow::Result<Projections> {
        ctx.spawn_retention(ctx.common.retention.projections, retention::run);
        Ok(Projections::new(ctx.pool.clone(), &self.cfg.consumer_group))
    }
}
