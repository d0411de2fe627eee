//! A row of the table, references between rows, the table and the machine it ran on.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};

use crate::ROWS;
use crate::ctx::Ctx;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub row: String,
    pub measured: bool,
    /// Headline number and its unit (ev/s, req/s, msg/s, rows/s, MB ...).
    pub value: Option<f64>,
    pub unit: String,
    pub result: String,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub goal: String,
    pub goal_met: Option<bool>,
    pub config: String,
    /// Non-2xx answers and transport errors in the measured window.
    pub failures: BTreeMap<String, u64>,
    /// Set when other processes took a large share of the CPU during the row.
    pub warning: Option<String>,
    pub details: Value,
}

impl Row {
    pub fn new(row: &str) -> Self {
        Self {
            row: row.to_string(),
            measured: true,
            value: None,
            unit: String::new(),
            result: String::new(),
            p50_us: None,
            p99_us: None,
            max_us: None,
            goal: String::new(),
            goal_met: None,
            config: String::new(),
            failures: BTreeMap::new(),
            warning: None,
            details: json!({}),
        }
    }

    pub fn not_measured(row: &str, why: &str, goal: &str) -> Self {
        let mut r = Self::new(row);
        r.measured = false;
        r.result = why.to_string();
        r.goal = goal.to_string();
        r
    }

    pub fn latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.p50_us = Some(h.value_at_quantile(0.5));
        self.p99_us = Some(h.value_at_quantile(0.99));
        self.max_us = Some(h.max());
    }

    pub fn rate(&mut self, v: f64, unit: &str) {
        self.value = Some(v);
        self.unit = unit.to_string();
        self.result = format!("{} {unit}", thousands(v));
    }

    pub fn failures_text(&self) -> String {
        if self.failures.is_empty() {
            "non-2xx/errors: 0".to_string()
        } else {
            let parts: Vec<String> = self
                .failures
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            format!("non-2xx/errors: {}", parts.join(" "))
        }
    }
}

pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub fn quantiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({ "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max() })
}

pub fn fmt_us(us: Option<u64>) -> String {
    match us {
        None => "—".to_string(),
        Some(u) if u < 1_000 => format!("{u} µs"),
        Some(u) if u < 10_000 => format!("{:.2} ms", u as f64 / 1000.0),
        Some(u) if u < 1_000_000 => format!("{:.1} ms", u as f64 / 1000.0),
        Some(u) => format!("{:.2} s", u as f64 / 1e6),
    }
}

pub fn percentiles_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "—".into();
    }
    format!(
        "{}/{}",
        fmt_us(Some(h.value_at_quantile(0.5))),
        fmt_us(Some(h.value_at_quantile(0.99)))
    )
}

pub fn cross_references(rows: &mut BTreeMap<String, Row>) {
    let val = |rows: &BTreeMap<String, Row>, k: &str| rows.get(k).and_then(|r| r.value);
    let ingest = val(rows, "ingest-max");
    if let (Some(i), Some(r)) = (ingest, rows.get_mut("ingest-baseline"))
        && let Some(b) = r.value
    {
        let x = i / b.max(1e-9);
        r.goal = format!("reference: ingest-max ≥ 2× it → {x:.2}×");
        r.goal_met = Some(x >= 2.0);
    } else if let Some(r) = rows.get_mut("ingest-baseline") {
        r.goal = "reference: ingest-max ≥ 2× it".into();
    }
    if let (Some(i), Some(r)) = (ingest, rows.get_mut("http-ceiling"))
        && let Some(c) = r.value
    {
        let x = i / c.max(1e-9) * 100.0;
        r.goal = format!("reference: ingest-max ≥ 25% of it → {x:.0}%");
        r.goal_met = Some(x >= 25.0);
    } else if let Some(r) = rows.get_mut("http-ceiling") {
        r.goal = "reference: ingest-max ≥ 25% of it".into();
    }
    let batch = val(rows, "batch-max");
    if let (Some(b), Some(r)) = (batch, rows.get_mut("db-ceiling"))
        && let Some(c) = r.value
    {
        r.goal = format!(
            "reference for batch-max → batch-max is {:.0}% of it",
            b / c.max(1e-9) * 100.0
        );
    } else if let Some(r) = rows.get_mut("db-ceiling") {
        r.goal = "reference for batch-max".into();
    }
}

/// Other processes above this share of the CPU (percent of one core) during a row make it suspect.
pub const BUSY_OTHER_PCT: f64 = 25.0;

/// Marks rows during which something else used the machine (the bench shares it).
pub fn flag_busy(rows: &mut BTreeMap<String, Row>) {
    for r in rows.values_mut() {
        let mut cpus: Vec<&Value> = vec![&r.details["cpu"]];
        if let Some(steps) = r.details["steps"].as_array() {
            cpus.extend(steps.iter().map(|s| &s["cpu"]));
        }
        let other = cpus
            .iter()
            .filter_map(|c| c["other_pct"].as_f64())
            .fold(0.0, f64::max);
        if other > BUSY_OTHER_PCT {
            r.warning = Some(format!(
                "other processes used {other:.0}% CPU during this row: not representative"
            ));
        }
    }
}

pub fn markdown(rows: &BTreeMap<String, Row>) -> String {
    let mut s = String::new();
    s.push_str("| row | result | p50 | p99 | max | goal | config |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for name in ROWS {
        let Some(r) = rows.get(*name) else { continue };
        let goal = match r.goal_met {
            Some(true) => format!("{} ✓", r.goal),
            Some(false) => format!("{} ✗", r.goal),
            None => r.goal.clone(),
        };
        let cell = |t: &str| t.replace('|', "\\|");
        let result = match &r.warning {
            Some(w) => format!("{} ⚠ {w}", r.result),
            None => r.result.clone(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.row,
            cell(&result),
            fmt_us(r.p50_us),
            fmt_us(r.p99_us),
            fmt_us(r.max_us),
            cell(&goal),
            cell(&r.config)
        );
    }
    s
}

pub fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    })
}

pub async fn machine(ctx: &Ctx) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    });
    let pg: Option<String> = match ctx.db.as_ref() {
        Some(db) => sqlx::query_scalar("SELECT version()")
            .fetch_one(db)
            .await
            .ok(),
        None => None,
    };
    let pg_settings: Option<Vec<(String, String)>> = match ctx.db.as_ref() {
        Some(db) => sqlx::query_as(
            "SELECT name, setting FROM pg_settings WHERE name IN
             ('shared_buffers','synchronous_commit','fsync','wal_sync_method','max_connections',
              'commit_delay','wal_buffers','max_wal_size','full_page_writes')",
        )
        .fetch_all(db)
        .await
        .ok(),
        None => None,
    };
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory_mib": mem_kib.map(|k| k / 1024),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "versions": {
            "rustc": command_output("rustc", &["--version"]),
            "postgresql": pg,
            "tansu": command_output("tansu", &["--version"]),
            "librdkafka": rdkafka::util::get_rdkafka_version().1,
            "cornjacket": env!("CARGO_PKG_VERSION"),
            "git_commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        },
        "postgresql_settings": pg_settings.map(|v| v.into_iter().collect::<HashMap<_, _>>()),
    })
}
