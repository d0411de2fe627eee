//! CPU and memory accounting from /proc.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

use crate::cli::Args;

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
pub const TICKS: f64 = 100.0;

pub fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// CPU ticks of every process with this command name (e.g. the PostgreSQL server and its
/// backends), by pid.
pub fn ticks_of(comm: &str) -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_comm(*pid).as_deref() == Some(comm))
        .filter_map(|pid| Some((pid, proc_ticks(pid)?)))
        .collect()
}

/// Ticks a group of processes (PostgreSQL) used between two marks: per process, so that a backend that exits in between
/// (a closed pool) does not make the sum go down. A backend's work after the first mark is lost
/// when it exits before the second; one started in between counts whole.
pub fn postgres_delta(a: &HashMap<u32, u64>, b: &HashMap<u32, u64>) -> u64 {
    b.iter()
        .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// (busy, total) ticks of the whole machine.
pub fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

#[derive(Clone)]
pub struct CpuMark {
    pub at: Instant,
    pub machine: (u64, u64),
    pub platform: Option<u64>,
    pub bench: Option<u64>,
    pub postgres: HashMap<u32, u64>,
    pub mosquitto: HashMap<u32, u64>,
    pub broker: Option<u64>,
    pub sidecar: Option<u64>,
}

/// The ai-inference sidecar's pid while anomaly-to-webhook runs it (0: none), for the CPU split.
pub static SIDECAR_PID: AtomicU32 = AtomicU32::new(0);

pub fn cpu_mark(a: &Args) -> CpuMark {
    cpu_mark_of(a, a.platform_pid)
}

/// A mark where `server` (the platform, or the http-ceiling server) is the server process.
pub fn cpu_mark_of(a: &Args, server: Option<u32>) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        machine: machine_ticks(),
        platform: server.and_then(proc_ticks),
        bench: proc_ticks(std::process::id()),
        postgres: ticks_of("postgres"),
        mosquitto: ticks_of("mosquitto"),
        broker: a.broker_pid.and_then(proc_ticks),
        sidecar: Some(SIDECAR_PID.load(Ordering::Relaxed))
            .filter(|p| *p != 0)
            .and_then(proc_ticks),
    }
}

/// CPU use between two marks in percent of one core (the machine has `cores` × 100 %).
pub fn cpu_use(a: &CpuMark, b: &CpuMark) -> Value {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let pct = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(((y.saturating_sub(x)) as f64 / TICKS / secs * 100.0).round()),
        _ => None,
    };
    let (busy, total) = (
        b.machine.0.saturating_sub(a.machine.0),
        b.machine.1.saturating_sub(a.machine.1),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine = (busy as f64 / (total.max(1)) as f64 * 100.0 * cores).round();
    let parts = [
        pct(a.platform, b.platform),
        pct(a.bench, b.bench),
        pct(Some(0), Some(postgres_delta(&a.postgres, &b.postgres))),
        pct(a.broker, b.broker),
        pct(Some(0), Some(postgres_delta(&a.mosquitto, &b.mosquitto))),
        pct(a.sidecar, b.sidecar),
    ];
    // Whatever else ran on the machine meanwhile (a build, another test run): a warning sign.
    let other = (machine - parts.iter().flatten().sum::<f64>())
        .max(0.0)
        .round();
    json!({
        "machine_busy_pct": machine,
        "platform_pct": parts[0],
        "bench_pct": parts[1],
        "postgres_pct": parts[2],
        "broker_pct": parts[3],
        "mosquitto_pct": parts[4],
        "sidecar_pct": parts[5],
        "other_pct": other,
    })
}

pub fn cpu_text(v: &Value) -> String {
    let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| format!("{x:.0}%"));
    let mut parts = vec![];
    for (k, label) in [
        ("platform_pct", "platform"),
        ("postgres_pct", "postgres"),
        ("broker_pct", "tansu"),
        ("mosquitto_pct", "mosquitto"),
        ("sidecar_pct", "ai sidecar"),
        ("bench_pct", "bench"),
        ("other_pct", "other (kernel, other processes)"),
        ("machine_busy_pct", "machine"),
    ] {
        // The MQTT broker only matters in the mqtt row, the sidecar in anomaly-to-webhook.
        if matches!(k, "mosquitto_pct" | "sidecar_pct")
            && v.get(k).and_then(Value::as_f64).unwrap_or(0.0) < 1.0
        {
            continue;
        }
        if let Some(x) = f(k) {
            parts.push(format!("{label} {x}"));
        }
    }
    format!(
        "CPU (of {}00%): {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        parts.join(", ")
    )
}

pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
