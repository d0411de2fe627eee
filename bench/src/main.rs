//! `cornjacket-bench`: the platform's load generator and benchmark table (`make bench`).
//!
//! It drives a running platform (started by `scripts/bench.sh` on a fresh database) and measures,
//! in one run, the platform rows and the baselines they are compared with:
//!
//! * closed-loop rows (`ingest-max`, `batch-max`, `http-ceiling`, the database baselines): N
//!   workers, each sending and waiting in a loop on its own keep-alive connection;
//! * open-loop rows (`e2e-latency`, `pipeline-max`, `query`): a fixed arrival schedule (a tick
//!   every 1/rate), each request in its own task, latency counted from the *scheduled* send time,
//!   so a stalled server cannot hide its queue (coordinated-omission safe).
//!
//! HTTP is spoken by a minimal HTTP/1.1 keep-alive client written on tokio's `TcpStream`: the
//! generator shares the machine's cores with the platform, PostgreSQL and the broker, so it does
//! as little work per request as it can (one write and usually one read). Latencies go into HDR
//! histograms in microseconds. The table is printed as Markdown on stdout and written as JSON to
//! `<out>/<YYYY-MM-DD>.json` with the machine and the versions. Goals are reported, never
//! asserted: a missed goal does not change the exit code.

mod bodies;
mod cli;
mod cpu;
mod ctx;
mod db;
mod hook;
mod http;
mod kafka;
mod load;
mod mqtt;
mod report;
mod rows;
mod sidecar;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::cli::Args;
use crate::cpu::{cpu_mark, cpu_use, status_kib};
use crate::ctx::{Ctx, wait_healthy};
use crate::http::target;
use crate::kafka::drop_topics;
use crate::report::{Row, cross_references, flag_busy, machine, markdown};

/// Every row, in the order of the table.
pub const ROWS: &[&str] = &[
    "ingest-max",
    "ingest-baseline",
    "http-ceiling",
    "db-ceiling",
    "batch-max",
    "e2e-latency",
    "pipeline-max",
    "query",
    "timeseries-30d",
    "console",
    "mqtt",
    "anomaly-to-webhook",
    "footprint",
    "broker-baseline",
];

pub fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[bench {}] {}",
        chrono::Local::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

async fn run(a: Args) -> anyhow::Result<()> {
    if let Some(t) = a.token.as_ref().filter(|t| !t.is_empty()) {
        let _ = http::AUTHORIZATION.set(t.trim().to_string());
    }
    let db = match &a.database_url {
        Some(url) => Some(
            PgPoolOptions::new()
                .max_connections(4)
                .connect(url)
                .await
                .context("connecting to the bench database")?,
        ),
        None => None,
    };
    let mut ctx = Ctx {
        ingest: target(&a.ingest_url).await?,
        query: target(&a.query_url).await?,
        eventhandler: target(&a.eventhandler_url).await?,
        console: target(&a.console_url).await?,
        run: format!(
            "{:x}",
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs()
        ),
        a,
        db,
        rows: BTreeMap::new(),
        startup: json!({}),
    };
    for r in &ctx.a.rows {
        if !ROWS.contains(&r.as_str()) {
            bail!("unknown row '{r}'; rows: {}", ROWS.join(", "));
        }
    }
    let began = chrono::Local::now();
    wait_healthy(&mut ctx).await?;
    // The machine should be otherwise idle: measure what else runs for a second, and say so.
    let m0 = cpu_mark(&ctx.a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_check = cpu_use(&m0, &cpu_mark(&ctx.a));
    let other_before = idle_check["other_pct"].as_f64().unwrap_or(0.0);
    if other_before > 15.0 {
        log(format!(
            "warning: other processes use {other_before:.0}% CPU (of {}00%) before the run; results will be low",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
    }
    // The broker's memory: an in-memory Tansu keeps everything it was sent and slows down as it grows.
    let broker_rss_mib = ctx
        .a
        .broker_pid
        .and_then(|p| status_kib(p, "VmRSS:"))
        .map(|k| k / 1024);
    let bench_start = Instant::now();

    // Run order: rows that want an idle pipeline first, then the saturation rows (which leave a
    // backlog that is drained or truncated before each following row), the broker last.
    // anomaly-to-webhook comes first of all: its sidecar reads sensor-events from the earliest
    // offset, so it starts while that topic is still empty.
    type RowFn = for<'c> fn(
        &'c mut Ctx,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'c>,
    >;
    let order: &[(&str, RowFn)] = &[
        ("anomaly-to-webhook", |c| {
            Box::pin(rows::anomaly_to_webhook::run(c))
        }),
        ("http-ceiling", |c| Box::pin(rows::http_ceiling::run(c))),
        ("e2e-latency", |c| Box::pin(rows::e2e_latency::run(c))),
        ("query", |c| Box::pin(rows::query::run(c))),
        ("timeseries-30d", |c| Box::pin(rows::timeseries::run(c))),
        ("console", |c| Box::pin(rows::console::run(c))),
        ("pipeline-max", |c| Box::pin(rows::pipeline_max::run(c))),
        ("ingest-max", |c| Box::pin(rows::ingest_max::run(c))),
        ("ingest-baseline", |c| {
            Box::pin(rows::ingest_baseline::run(c))
        }),
        ("db-ceiling", |c| Box::pin(rows::db_ceiling::run(c))),
        ("batch-max", |c| Box::pin(rows::batch_max::run(c))),
        ("broker-baseline", |c| {
            Box::pin(rows::broker_baseline::run(c))
        }),
        ("mqtt", |c| Box::pin(rows::mqtt::run(c))),
    ];
    for (name, f) in order {
        if !ctx.a.wants(name) {
            continue;
        }
        let t = Instant::now();
        if let Err(e) = f(&mut ctx).await {
            log(format!("{name}: failed: {e:#}"));
            let mut r = Row::not_measured(name, &format!("failed: {e:#}"), "");
            r.measured = false;
            ctx.rows.insert(name.to_string(), r);
        }
        log(format!("{name}: done in {:.1}s", t.elapsed().as_secs_f64()));
    }
    if ctx.a.wants("footprint") {
        rows::footprint::run(&mut ctx);
    }
    cross_references(&mut ctx.rows);
    flag_busy(&mut ctx.rows);

    let machine = machine(&ctx).await;
    let table = markdown(&ctx.rows);
    let v = &machine["versions"];
    let header = format!(
        "cornjacket bench — {} — {} cores ({}), {} MiB RAM — {}; {}; tansu {}; librdkafka {}; commit {}{}",
        began.format("%Y-%m-%d %H:%M %Z"),
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_mib"],
        v["rustc"].as_str().unwrap_or("rustc ?"),
        v["postgresql"]
            .as_str()
            .and_then(|s| s.split(" on ").next())
            .unwrap_or("PostgreSQL ?"),
        v["tansu"].as_str().unwrap_or("?"),
        v["librdkafka"].as_str().unwrap_or("?"),
        v["git_commit"].as_str().unwrap_or("?"),
        if ctx.a.quick {
            " — QUICK (smoke) run"
        } else {
            ""
        }
    );
    let platform = if ctx.a.platform_config.is_empty() {
        String::new()
    } else {
        format!("\nPlatform: {}\n", ctx.a.platform_config)
    };
    println!("\n{header}\n{platform}\n{table}");

    let rows: Vec<&Row> = ROWS.iter().filter_map(|n| ctx.rows.get(*n)).collect();
    let result = json!({
        "date": began.to_rfc3339(),
        "quick": ctx.a.quick,
        "elapsed_s": bench_start.elapsed().as_secs_f64(),
        "machine": machine,
        "cpu_before_run": idle_check,
        "broker_rss_mib_at_start": broker_rss_mib,
        "platform_config": ctx.a.platform_config,
        "args": format!("{:?}", std::env::args().skip(1).collect::<Vec<_>>()),
        "rows": rows,
        "markdown": table,
    });
    std::fs::create_dir_all(&ctx.a.out)?;
    // A run of some rows, or a smoke run, does not replace the day's full run.
    let mut name = began.format("%Y-%m-%d").to_string();
    if !ctx.a.rows.is_empty() {
        let mut rows: Vec<&str> = ROWS.iter().copied().filter(|r| ctx.a.wants(r)).collect();
        rows.dedup();
        name = format!("{name}-{}", rows.join("+"));
    }
    if ctx.a.quick {
        name.push_str("-quick");
    }
    let path = ctx.a.out.join(format!("{name}.json"));
    let mut f = std::fs::File::create(&path)?;
    f.write_all(serde_json::to_string_pretty(&result)?.as_bytes())?;
    f.write_all(b"\n")?;
    log(format!("results written to {}", path.display()));
    Ok(())
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let r = if let Some(port) = a.serve_ceiling {
        rows::http_ceiling::serve(port).await
    } else if a.drop_topics {
        drop_topics(&a).await
    } else {
        run(a).await
    };
    if let Err(e) = r {
        eprintln!("cornjacket-bench: {e:#}");
        std::process::exit(1);
    }
}
