//! db-ceiling: multi-row INSERTs into a copy of the outbox.

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
    let conns = a.db_ceiling_connections;
    let rows = a.db_ceiling_rows.max(1);
    let pool = db_pool(ctx, conns).await?;
    bench_table(&pool).await?;
    log(format!(
        "db-ceiling: {conns} connections, {rows}-row transactions, {:?}",
        a.duration()
    ));
    let pool_rows = envelope_pool();
    let m0 = cpu_mark(&a);
    let p = pool.clone();
    let load = db_loop(conns, a.warmup(), a.duration(), move |seq| {
        let (p, pool_rows) = (p.clone(), pool_rows.clone());
        async move {
            let (mut shards, mut eids, mut payloads) = (
                Vec::with_capacity(rows),
                Vec::with_capacity(rows),
                Vec::with_capacity(rows),
            );
            for i in 0..rows as u64 {
                let (shard, json) =
                    &pool_rows[((seq * rows as u64 + i) % pool_rows.len() as u64) as usize];
                shards.push(*shard);
                eids.push(Uuid::now_v7());
                payloads.push(json.as_str());
            }
            sqlx::query(
                "INSERT INTO bench.outbox (shard, event_id, event_payload)
                 SELECT u.shard, u.eid, u.payload::jsonb
                 FROM UNNEST($1::int2[], $2::uuid[], $3::text[]) AS u(shard, eid, payload)",
            )
            .bind(&shards)
            .bind(&eids)
            .bind(&payloads)
            .execute(&p)
            .await
            .map(|r| r.rows_affected())
        }
    })
    .await;
    let m1 = cpu_mark(&a);
    pool.close().await;
    let mut r = Row::new("db-ceiling");
    r.rate(load.per_sec(load.events), "rows/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "{conns} connections × {:.0}s (+{:.0}s warm-up), each looping one {rows}-row INSERT … SELECT FROM UNNEST (one statement, one commit) into bench.outbox, the same rows as ingest-baseline; latency per transaction; {}; {}{}",
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
    r.details = json!({ "cpu": cpu, "transactions_per_s": load.per_sec(load.ok), "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}
