//! footprint: the platform's peak RSS and startup time.

use serde_json::json;

use crate::cpu::status_kib;
use crate::ctx::Ctx;
use crate::report::Row;

pub fn run(ctx: &mut Ctx) {
    let mut r = Row::new("footprint");
    let startup = ctx.startup["all_health_200_s"].as_f64();
    let healthy = ctx.startup["all_health_healthy_s"].as_f64();
    let (rss_kib, source) = match ctx.startup["ingest_max_rss_peak_kib"].as_u64() {
        Some(k) if ctx.startup["rss_peak_reset_before_ingest_max"] == json!(true) => {
            (Some(k), "peak (VmHWM) during ingest-max")
        }
        Some(k) => (
            Some(k),
            "peak (VmHWM) since process start, read after ingest-max (reset not possible)",
        ),
        None => (
            ctx.a.platform_pid.and_then(|p| status_kib(p, "VmHWM:")),
            "peak (VmHWM) since process start (ingest-max not run)",
        ),
    };
    let mb = rss_kib.map(|k| k as f64 / 1024.0);
    r.value = mb;
    r.unit = "MB".into();
    r.result = format!(
        "RSS {} · start {}",
        mb.map_or("?".into(), |m| format!("{m:.0} MB")),
        startup.map_or("?".into(), |s| format!("{s:.2} s"))
    );
    r.goal = "≤ 150 MB; ≤ 2 s".into();
    r.goal_met = match (mb, startup) {
        (Some(m), Some(s)) => Some(m <= 150.0 && s <= 2.0),
        _ => None,
    };
    r.config = format!(
        "RSS: {source} of the platform process (pid {}); start: from spawn (fresh database: migrations included) until /health answers 200 on 8080, 8081 and 8084, polled every 5 ms; all three reporting \"healthy\" (consumer partitions assigned): {}",
        ctx.a.platform_pid.map_or("?".into(), |p| p.to_string()),
        healthy.map_or("?".into(), |s| format!("{s:.2} s"))
    );
    r.details = ctx.startup.clone();
    ctx.rows.insert(r.row.clone(), r);
}
