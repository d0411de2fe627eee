//! Request bodies and envelopes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use uuid::Uuid;

use crate::http;
use crate::load::Workload;

/// A cheap deterministic pseudo-random number from a sequence number (splitmix64).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One `sensor.reading` request body without event_time (the platform sets it to ingested_at).
pub fn reading_body(out: &mut Vec<u8>, aggregate_id: &str, seq: u64) {
    let r = mix(seq);
    let _ = write!(
        out,
        r#"{{"event_type":"sensor.reading","aggregate_id":"{aggregate_id}","payload":{{"value":{}.{:02},"unit":"celsius"}}}}"#,
        r % 40,
        (r >> 8) % 100
    );
}

/// Device ids shared by the saturation rows (upserts of a bounded set of projections).
pub const DEVICES: u64 = 10_000;

pub fn device(seq: u64) -> String {
    format!("dev-{:05}", mix(seq ^ 0x5eed) % DEVICES)
}

pub fn single_ingest(
    addr: SocketAddr,
    host: String,
    agg: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> Workload {
    Workload {
        addr,
        build: Arc::new(move |seq, out| {
            let mut body = Vec::with_capacity(160);
            reading_body(&mut body, &agg(seq), seq);
            http::request_bytes(out, "POST", &host, "/api/v1/ingest", Some(&body));
        }),
        events: Arc::new(|_| 1),
        want_body: false,
    }
}

/// The envelope the platform would store for a reading, for the database and broker baselines.
#[allow(
    clippy::disallowed_methods,
    reason = "the bench is outside the platform: it stamps with the machine's wall clock, as a client would"
)]
pub fn envelope(seq: u64) -> (Uuid, String, String) {
    let event_id = Uuid::now_v7();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let agg = device(seq);
    let r = mix(seq);
    let trace = Uuid::now_v7().simple().to_string();
    let span = &Uuid::now_v7().simple().to_string()[16..];
    let json = format!(
        r#"{{"event_id":"{event_id}","event_type":"sensor.reading","aggregate_id":"{agg}","event_time":"{now}","ingested_at":"{now}","payload":{{"value":{}.{:02},"unit":"celsius"}},"metadata":{{"source":"http","traceparent":"00-{trace}-{span}-01","schema_version":1}}}}"#,
        r % 40,
        (r >> 8) % 100
    );
    (event_id, agg, json)
}

/// Envelopes (with their shard) for the database baselines, made before measuring so that the
/// generator's own work stays small; each insert still gets fresh outbox and event ids.
pub fn envelope_pool() -> Arc<Vec<(i16, String)>> {
    Arc::new(
        (0..4096u64)
            .map(|s| {
                let (_, agg, json) = envelope(s);
                (shard_of(&agg), json)
            })
            .collect(),
    )
}

/// The outbox shard of an aggregate (the platform's FNV-1a 32 modulo 16).
pub fn shard_of(aggregate_id: &str) -> i16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in aggregate_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 16) as i16
}
