//! `cornjacket webhook listen`: a webhook receiver for development. It takes a POST on any path,
//! checks its Standard Webhooks signature against the given secrets and prints what came, so a
//! rule can be tried end to end without writing a receiver. It answers as a careful receiver
//! would: 204 when verified, 401 when refused, 400 when the request is not a webhook at all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::envelope::{Clock, SystemClock, format_time};
use crate::infra::webhook_signature::{self, HEADER_ID, Secret, VerifyError};

/// How much of a body is printed: an envelope fits; a runaway payload does not flood the terminal.
const MAX_PRINTED_BODY: usize = 8 * 1024;
/// How much of a path or webhook-id is printed.
const MAX_PRINTED_FIELD: usize = 200;
/// After a signal, how long open connections may take to finish before the listener exits anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the listener failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone)]
struct Receiver {
    secrets: Arc<[Secret]>,
    clock: Arc<dyn Clock>,
}

/// Binds `addr`, then serves until SIGINT or SIGTERM.
pub async fn run(addr: SocketAddr, secrets: Vec<Secret>) -> Result<(), ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(ListenError::Serve)?;
    eprintln!(
        "webhook listen: POST to any path of http://{bound}/ is verified with {} secret(s) and printed; Ctrl-C stops",
        secrets.len()
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        crate::supervisor::wait_for_signal().await;
        on_signal.cancel();
    });
    serve(listener, secrets, Arc::new(SystemClock), shutdown).await?;
    eprintln!("webhook listen: stopped");
    Ok(())
}

/// Serves on an already bound listener until `shutdown`, then lets open requests finish for at
/// most [`DRAIN_DEADLINE`].
pub async fn serve(
    listener: TcpListener,
    secrets: Vec<Secret>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), ListenError> {
    let app = axum::Router::new().fallback(receive).with_state(Receiver {
        secrets: secrets.into(),
        clock,
    });
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        r = server => r.map_err(ListenError::Serve),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_DEADLINE).await;
        } => {
            eprintln!("webhook listen: connections still open after {DRAIN_DEADLINE:?}; exiting anyway");
            Ok(())
        }
    }
}

async fn receive(
    State(r): State<Receiver>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = r.clock.now();
    let outcome = if method == Method::POST {
        webhook_signature::verify(&r.secrets, &headers, &body, now)
    } else {
        println!(
            "{} {method} {} 405: only POST",
            format_time(&now),
            field(uri.path())
        );
        return (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "POST")]).into_response();
    };
    let id = headers.get(HEADER_ID).and_then(|v| v.to_str().ok());
    // One call, so lines of concurrent requests do not interleave.
    println!("{}", render(now, uri.path(), id, &outcome, &body));
    answer(&outcome)
}

fn answer(outcome: &Result<(), VerifyError>) -> Response {
    match outcome {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let status = if e.is_malformed() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::UNAUTHORIZED
            };
            (status, Json(json!({ "error": e.to_string() }))).into_response()
        }
    }
}

/// What is printed for one POST: a line (time, path, webhook-id, verdict), then the body.
fn render(
    now: DateTime<Utc>,
    path: &str,
    id: Option<&str>,
    outcome: &Result<(), VerifyError>,
    body: &[u8],
) -> String {
    let verdict = match outcome {
        Ok(()) => "verified".to_string(),
        Err(e) => format!("NOT verified: {e}"),
    };
    format!(
        "{} POST {} webhook-id={} {verdict}\n{}",
        format_time(&now),
        field(path),
        id.map_or_else(|| "-".into(), field),
        printable_body(body),
    )
}

fn printable_body(body: &[u8]) -> String {
    if body.is_empty() {
        return "(empty body)".into();
    }
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        // Whatever else came is untrusted text for a terminal: no escape sequences through.
        Err(_) => String::from_utf8_lossy(body)
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' && c != '\t' {
                    '\u{fffd}'
                } else {
                    c
                }
            })
            .collect(),
    };
    clip(&text, MAX_PRINTED_BODY)
}

fn field(s: &str) -> String {
    clip(s, MAX_PRINTED_FIELD)
}

/// At most `max` bytes of `s` (cut at a character boundary), saying how much was left out.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} more bytes)", &s[..cut], s.len() - cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_614_265_330, 0).unwrap()
    }

    #[test]
    fn a_verified_call_prints_its_line_and_pretty_body() {
        let out = render(
            at(),
            "/hook",
            Some("019abc"),
            &Ok(()),
            br#"{"event_type":"system.alert"}"#,
        );
        assert_eq!(
            out,
            "2021-02-25T15:02:10.000000Z POST /hook webhook-id=019abc verified\n{\n  \"event_type\": \"system.alert\"\n}"
        );
    }

    #[test]
    fn a_refused_call_says_why() {
        let out = render(
            at(),
            "/",
            None,
            &Err(VerifyError::MissingHeader("webhook-id")),
            b"",
        );
        assert_eq!(
            out,
            "2021-02-25T15:02:10.000000Z POST / webhook-id=- NOT verified: no webhook-id header\n(empty body)"
        );
    }

    #[test]
    fn bodies_are_bounded_and_cannot_drive_the_terminal() {
        let big = format!("[\"{}\"]", "é".repeat(10_000));
        let printed = printable_body(big.as_bytes());
        assert!(printed.len() < MAX_PRINTED_BODY + 40, "{}", printed.len());
        assert!(printed.ends_with(" more bytes)"), "{printed}");
        let printed = printable_body(b"not json \x1b[2J\x07 done\n");
        assert_eq!(printed, "not json \u{fffd}[2J\u{fffd} done\n");
    }

    #[test]
    fn clip_keeps_short_text_and_cuts_at_a_character() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc… (1 more bytes)");
        assert_eq!(clip("aé", 2), "a… (2 more bytes)");
    }

    #[test]
    fn verified_is_204_refused_401_and_not_a_webhook_400() {
        assert_eq!(answer(&Ok(())).status(), StatusCode::NO_CONTENT);
        let refused = [
            VerifyError::NoMatch { candidates: 1 },
            VerifyError::TooOld(301),
            VerifyError::InTheFuture(301),
        ];
        for e in refused {
            assert_eq!(answer(&Err(e)).status(), StatusCode::UNAUTHORIZED);
        }
        let malformed = [
            VerifyError::MissingHeader("webhook-signature"),
            VerifyError::MalformedHeader("webhook-timestamp"),
        ];
        for e in malformed {
            assert_eq!(answer(&Err(e)).status(), StatusCode::BAD_REQUEST);
        }
    }
}
