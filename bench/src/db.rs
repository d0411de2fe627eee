//! The database baselines' table, pool and closed loop.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::ctx::Ctx;
use crate::load::Load;

/// A bench-owned copy of the outbox's shape (columns, defaults, constraints, indexes; without
/// the NOTIFY trigger), emptied before each database row.
pub async fn bench_table(db: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CREATE SCHEMA IF NOT EXISTS bench")
        .execute(db)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench.outbox (LIKE ingestion.outbox INCLUDING ALL)")
        .execute(db)
        .await?;
    sqlx::query("TRUNCATE bench.outbox").execute(db).await?;
    Ok(())
}

/// Closed loop of database workers; each call of `op` inserts rows and returns how many.
pub async fn db_loop<F, Fut>(conns: usize, warmup: Duration, dur: Duration, op: F) -> Load
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>> + Send,
{
    let start = Instant::now();
    let (mstart, mend) = (start + warmup, start + warmup + dur);
    let mut set = tokio::task::JoinSet::new();
    for wid in 0..conns {
        let op = op.clone();
        set.spawn(async move {
            let mut load = Load::new();
            let mut seq = wid as u64;
            while Instant::now() < mend {
                let t0 = Instant::now();
                let r = op(seq).await;
                seq += conns as u64;
                let t1 = Instant::now();
                if t0 >= mstart && t1 <= mend {
                    match r {
                        Ok(n) => {
                            load.hist
                                .saturating_record((t1 - t0).as_micros().max(1) as u64);
                            load.ok += 1;
                            load.events += n;
                        }
                        Err(e) => load.error(e.to_string()),
                    }
                }
            }
            load
        });
    }
    let mut total = Load::new();
    while let Some(r) = set.join_next().await {
        if let Ok(l) = r {
            total.merge(l);
        }
    }
    total.window = dur;
    total.connections = conns;
    total
}

pub async fn db_pool(ctx: &Ctx, conns: usize) -> anyhow::Result<PgPool> {
    let url = ctx.a.database_url.clone().context("needs --database-url")?;
    let pool = PgPoolOptions::new()
        .max_connections(conns as u32)
        .min_connections(conns as u32)
        .connect(&url)
        .await?;
    // Open every connection before measuring.
    let mut held = Vec::new();
    for _ in 0..conns {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}
