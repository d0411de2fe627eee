//! tsdb-writer (SPEC §9): the consumer group that keeps sensor readings as typed time-series
//! rows in `tsdb.sensor_readings`, one per quantity, and their 1-minute and 1-hour rollups. Owns the `tsdb` schema. Its health shares the event
//! handler's port (8084) when both run in one process, and uses that port alone otherwise.

mod retention;
mod sink;

crate::service_migrations!("tsdb", "migrations/tsdb");

use super::ServiceContext;
use super::scaffold::{self, ConsumerService, Spec, Started};

struct Tsdb;

/// The tsdb-writer's dead letters, replayed through its sink.
pub fn dead_letters(pool: sqlx::PgPool) -> crate::infra::dlq::Owner {
    crate::infra::dlq::Owner {
        name: "tsdb",
        table: "tsdb.dlq",
        replay: crate::infra::dlq::Replay::InProcess(std::sync::Arc::new(sink::Readings {
            pool: pool.clone(),
        })),
        pool,
    }
}

pub async fn run(ctx: ServiceContext<crate::config::TsdbConfig>) -> anyhow::Result<()> {
    let cfg = &ctx.config;
    let spec = Spec {
        service: super::Service::Tsdb,
        dead_letters: dead_letters(ctx.db.clone()),
        group: cfg.consumer_group.clone(),
        topics: cfg.topics.clone(),
        retry_delays: cfg.retry_delays.clone(),
        max_batch: cfg.max_batch,
    };
    scaffold::run(ctx, spec, Tsdb, None).await
}

impl ConsumerService for Tsdb {
    type Sink = sink::Readings;

    async fn start(&self, ctx: &Started) -> anyhow::Result<sink::Readings> {
        let r = &ctx.common.retention;
        let keep = r.enabled.then_some(r.timeseries);
        let policy = retention::apply_policy(&ctx.pool, keep)
            .await
            .unwrap_or_else(|e| {
                // The job (correct on either kind of table) covers for the policy.
                tracing::warn!(error = %e, "Could not set the TimescaleDB retention policy.");
                false
            });
        if let (Some(keep), false) = (keep, policy) {
            ctx.spawn_retention(keep, retention::run);
        }
        if r.enabled {
            let windows = retention::RollupWindows {
                minute: r.rollup_1m,
                hour: r.rollup_1h,
            };
            ctx.jobs.spawn(retention::run_rollups(
                ctx.pool.clone(),
                ctx.clock_guard(),
                windows,
                r.interval,
                ctx.jobs.shutdown.clone(),
            ));
        }
        Ok(sink::Readings {
            pool: ctx.pool.clone(),
        })
    }
}
