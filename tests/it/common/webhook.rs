//! An in-test webhook receiver: a real HTTP server on loopback that records every call and
//! answers from a script (status codes, delays), and the Standard Webhooks verification a
//! receiver would do.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

/// One call the receiver got.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
}

/// How to answer one call.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub body: &'static str,
    pub retry_after: Option<&'static str>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            delay: Duration::ZERO,
            body: "",
            retry_after: None,
        }
    }

    pub fn with_body(self, body: &'static str) -> Self {
        Self { body, ..self }
    }

    pub fn with_retry_after(self, v: &'static str) -> Self {
        Self {
            retry_after: Some(v),
            ..self
        }
    }
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    script: VecDeque<Reply>,
    otherwise: Option<Reply>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    /// A receiver answering `script` in order, then `otherwise` (200 when None).
    pub async fn start(script: Vec<Reply>, otherwise: Option<Reply>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            calls: Vec::new(),
            script: script.into(),
            otherwise,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub async fn ok() -> Self {
        Self::start(vec![], None).await
    }

    /// A receiver that answers 200 to every call after `delay`.
    pub async fn slow(delay: Duration) -> Self {
        Self::start(
            vec![],
            Some(Reply {
                delay,
                ..Reply::status(200)
            }),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn count(&self) -> usize {
        self.inner.lock().unwrap().calls.len()
    }

    /// Waits until at least `n` calls arrived; returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Call> {
        let deadline = Instant::now() + timeout;
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} webhook calls within {timeout:?}, got {}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reply = {
        let mut i = inner.lock().unwrap();
        i.calls.push(Call {
            at: Instant::now(),
            headers,
            body,
        });
        i.script
            .pop_front()
            .or(i.otherwise)
            .unwrap_or(Reply::status(200))
    };
    tokio::time::sleep(reply.delay).await;
    let mut headers = HeaderMap::new();
    if let Some(v) = reply.retry_after {
        headers.insert("retry-after", v.parse().unwrap());
    }
    (
        StatusCode::from_u16(reply.status).unwrap(),
        headers,
        reply.body,
    )
        .into_response()
}

/// The signatures in a call's `webhook-signature` header.
pub fn signatures(call: &Call) -> Vec<String> {
    call.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Standard Webhooks verification, written from the specification (not the platform's code):
/// the signature header holds space-separated `v1,<base64>` entries; one must equal
/// base64(HMAC-SHA256(base64-decoded secret after `whsec_`, "{id}.{timestamp}.{body}")).
pub fn verify(secret: &str, call: &Call) -> bool {
    let key = B64
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let (Some(id), Some(ts), Some(sigs)) = (
        call.header("webhook-id"),
        call.header("webhook-timestamp"),
        call.header("webhook-signature"),
    ) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&call.body);
    let expected = B64.encode(mac.finalize().into_bytes());
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (super::wall_clock().timestamp() - t).abs() < 300);
    fresh
        && sigs
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}
