//! ingest-baseline: one autocommit INSERT per row into a copy of the outbox.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::bodies::envelope_pool;
use crate::cpu::{cpu_mark, cpu_text, cpu_use};
use crate::ctx::Ctx;
use crate::db::{bench_table, db_loop, db_pool};
use crate::log;
use crate::report::Row;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(5)).await;
    let a = ctx.a.clone();
    let conns = a.connections;
    let pool = db_pool(ctx, conns).await?;
    bench_table(&pool).await?;
    log(format!(
        "ingest-baseline: {conns} connections, {:?}",
        a.duration()
    ));
    let rows = envelope_pool();
    let m0 = cpu_mark(&a);
    let p = pool.clone();
    let load = db_loop(conns, a.warmup(), a.duration(), move |seq| {
        let (p, rows) = (p.clone(), rows.clone());
        async move {
            let (shard, json) = &rows[(seq % rows.len() as u64) as usize];
            sqlx::query(
                "INSERT INTO bench.outbox (shard, event_id, event_payload)
                 VALUES ($1, $2, $3::jsonb)",
            )
            .bind(*shard)
            .bind(Uuid::now_v7())
            .bind(json.as_str())
            .execute(&p)
            .await
            .map(|r| r.rows_affected())
        }
    })
    .await;
    let m1 = cpu_mark(&a);
    pool.close().await;
    let mut r = Row::new("ingest-baseline");
    let rate = load.per_sec(load.events);
    r.rate(rate, "rows/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "{conns} connections × {:.0}s (+{:.0}s warm-up), each looping one autocommit INSERT (one row, one commit, prepared) into bench.outbox (LIKE ingestion.outbox INCLUDING ALL: same columns and indexes, no NOTIFY trigger), envelope JSON ~357 bytes (4,096 made beforehand, fresh ids per row), synchronous_commit on; {}; {}{}",
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
