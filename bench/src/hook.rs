//! An in-process webhook receiver: records every call (arrival time, headers, body) and answers
//! 200; the Standard Webhooks signature is checked afterwards, off the measured path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct Call {
    pub at: Instant,
    /// Wall clock in microseconds since the epoch (compared with PostgreSQL's timestamps).
    pub wall_us: i64,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

type Calls = Arc<Mutex<Vec<Call>>>;

pub struct Receiver {
    pub addr: SocketAddr,
    calls: Calls,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let calls: Calls = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(record))
            .with_state(calls.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            calls,
            server,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.calls.lock().expect("calls lock").len()
    }

    /// How many calls there are, and the `payload.source_event_id` of those from index
    /// `from` on.
    pub fn sources_from(&self, from: usize) -> (usize, Vec<String>) {
        let calls = self.calls.lock().expect("calls lock");
        let sources = calls
            .iter()
            .skip(from)
            .filter_map(|c| {
                let v: Value = serde_json::from_slice(&c.body).ok()?;
                Some(v.pointer("/payload/source_event_id")?.as_str()?.to_string())
            })
            .collect();
        (calls.len(), sources)
    }

    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().expect("calls lock"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "the bench is outside the platform: it stamps with the machine's wall clock, as a client would"
)]
async fn record(State(calls): State<Calls>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let wall_us = chrono::Utc::now().timestamp_micros();
    calls.lock().expect("calls lock").push(Call {
        at,
        wall_us,
        headers,
        body,
    });
    StatusCode::OK
}

/// Standard Webhooks verification as a receiver does it, written from the specification:
/// `webhook-signature` holds space-separated `v1,<base64>` entries, one of which must be
/// HMAC-SHA256(base64-decoded secret after `whsec_`, "{webhook-id}.{webhook-timestamp}.{body}"),
/// and the timestamp must be within 5 minutes of the arrival.
pub fn verify(secret: &str, c: &Call) -> bool {
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| B64.decode(k).ok())
    else {
        return false;
    };
    let h = |n: &str| c.headers.get(n).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs)) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(t) = ts.parse::<i64>() else {
        return false;
    };
    if (c.wall_us / 1_000_000 - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&c.body);
    sigs.split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| B64.decode(b).ok())
        .any(|sig| mac.clone().verify_slice(&sig).is_ok())
}
