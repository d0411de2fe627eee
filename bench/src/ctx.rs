//! What every row works with: the arguments, the platform's addresses, the database and the
//! rows measured so far; and the wait for a healthy platform (its startup time).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::cli::Args;
use crate::report::Row;
use crate::{http, log};

pub struct Ctx {
    pub a: Args,
    pub ingest: (SocketAddr, String),
    pub query: (SocketAddr, String),
    pub eventhandler: (SocketAddr, String),
    pub console: (SocketAddr, String),
    pub db: Option<PgPool>,
    pub run: String,
    pub rows: BTreeMap<String, Row>,
    /// VmHWM reset before ingest-max worked.
    pub startup: Value,
}

impl Ctx {
    pub fn db(&self) -> anyhow::Result<&PgPool> {
        self.db
            .as_ref()
            .context("this row needs --database-url (or BENCH_DATABASE_URL)")
    }

    pub async fn outbox_backlog(&self) -> Option<i64> {
        let db = self.db.as_ref()?;
        sqlx::query_scalar("SELECT count(*) FROM ingestion.outbox")
            .fetch_one(db)
            .await
            .ok()
    }

    pub async fn consumer_lag(&self) -> Option<i64> {
        let (addr, host) = &self.eventhandler;
        let (status, body) = http::get_once(*addr, host, "/health").await.ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).ok()?;
        v.pointer("/checks/consumer/lag").and_then(Value::as_i64)
    }

    pub async fn visible(&self, ids: &[String]) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM eventhandler.projections
             WHERE projection_type = 'sensor_state' AND aggregate_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(self.db()?)
        .await?)
    }

    /// Waits (up to `max`) until every id has its projection; returns how many are visible.
    pub async fn wait_visible(&self, ids: &[String], max: Duration) -> anyhow::Result<i64> {
        let deadline = Instant::now() + max;
        loop {
            let n = self.visible(ids).await?;
            if n as usize >= ids.len() || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Brings the platform back to idle between rows: waits for the outbox to drain and, past
    /// `max`, truncates what is left (a bench database; the events are not needed), then waits
    /// for the consumer to catch up. Returns what it had to do, for the row's config.
    pub async fn settle(&self, max: Duration) -> String {
        let Some(db) = self.db.as_ref() else {
            return String::new();
        };
        let t0 = Instant::now();
        let mut note = String::new();
        loop {
            let n = self.outbox_backlog().await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if t0.elapsed() >= max {
                log(format!(
                    "settle: {n} rows still in the outbox after {max:?}; truncating them"
                ));
                let _ = sqlx::query("TRUNCATE ingestion.outbox").execute(db).await;
                note = format!(
                    "outbox backlog of {n} truncated after {:.0}s",
                    max.as_secs_f64()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The consumer's lag is from librdkafka statistics (every 2 s): wait for a zero.
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_secs(20) {
            if self.consumer_lag().await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        note
    }
}

pub async fn wait_healthy(ctx: &mut Ctx) -> anyhow::Result<()> {
    let started = ctx.a.platform_started_ns;
    let spawn_age = |now: SystemTime| -> Option<f64> {
        let now_ns = now.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some((now_ns.checked_sub(started?)?) as f64 / 1e9)
    };
    let t0 = Instant::now();
    let base = spawn_age(SystemTime::now());
    let targets = [
        ("ingestion", ctx.ingest.clone()),
        ("query", ctx.query.clone()),
        ("eventhandler", ctx.eventhandler.clone()),
    ];
    let mut first_200: Option<f64> = None;
    let mut all_healthy: Option<f64> = None;
    let deadline = Duration::from_secs(120);
    while t0.elapsed() < deadline {
        let mut codes = 0;
        let mut healthy = 0;
        for (_, (addr, host)) in &targets {
            if let Ok((200, body)) = http::get_once(*addr, host, "/health").await {
                codes += 1;
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v.get("status").and_then(Value::as_str) == Some("healthy") {
                    healthy += 1;
                }
            }
        }
        let since = base.map(|b| b + t0.elapsed().as_secs_f64());
        if codes == targets.len() && first_200.is_none() {
            first_200 = Some(since.unwrap_or(f64::NAN));
        }
        if healthy == targets.len() {
            all_healthy = Some(since.unwrap_or(f64::NAN));
            break;
        }
        tokio::time::sleep(Duration::from_millis(if first_200.is_some() {
            50
        } else {
            5
        }))
        .await;
    }
    if first_200.is_none() {
        bail!("the platform did not answer 200 on every /health within {deadline:?}");
    }
    ctx.startup = json!({
        "all_health_200_s": first_200.filter(|x| x.is_finite()),
        "all_health_healthy_s": all_healthy.filter(|x| x.is_finite()),
        "measured_from_spawn": started.is_some(),
        "bench_first_poll_after_spawn_s": base,
    });
    log(format!("platform healthy: {}", ctx.startup));
    Ok(())
}
