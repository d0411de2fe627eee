//! One webhook call: the signed request and what its answer means.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{Claimed, Deliverer, egress, signing};
use crate::envelope::trace;
use crate::infra::telemetry;
use crate::services::actions::rules::{self, Rule};

/// How much of a receiver's error answer is kept (and read at all): enough to diagnose, never
/// a whole body.
const ERROR_BODY_BYTES: usize = 1024;

pub(super) enum Outcome {
    Success(u16),
    Failure { status: Option<u16>, error: String },
}

impl Deliverer {
    pub(super) async fn send(&self, rule: &Rule, d: &Claimed, timeout: Duration) -> Outcome {
        let id = d.delivery_id.to_string();
        let ts = self.clock.now().timestamp();
        let Some(key) = rules::secret_key(&rule.webhook_secret) else {
            return Outcome::Failure {
                status: None,
                error: "the rule's secret is not a valid whsec_ secret".into(),
            };
        };
        if !self.cfg.allow_private_targets
            && let Some(error) = egress::refused_literal(&rule.webhook_url)
        {
            metrics::counter!("cj_webhook_attempts_total", "outcome" => "refused").increment(1);
            return Outcome::Failure {
                status: None,
                error,
            };
        }
        let span = telemetry::event_span("webhook.send", d.traceparent.as_deref(), &id);
        // The event's trace continued: by this span when traces are on, else by a new span id.
        let traceparent = telemetry::traceparent_of(&span)
            .unwrap_or_else(|| trace::child_of(d.traceparent.as_deref()));
        let signature = signing::sign(&key, &id, ts, d.body.as_bytes());
        let mut req = self
            .http
            .post(&rule.webhook_url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .header(trace::HEADER, traceparent);
        for (k, v) in rule.headers() {
            req = req.header(k, v);
        }
        let started = Instant::now();
        let result = req.body(d.body.clone()).send().instrument(span).await;
        metrics::histogram!("cj_webhook_duration_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "success").increment(1);
                Outcome::Success(r.status().as_u16())
            }
            Ok(mut r) => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "http_error")
                    .increment(1);
                let status = r.status().as_u16();
                // Read at most a little of the answer: a receiver cannot make us buffer more.
                let mut body = Vec::new();
                while body.len() < ERROR_BODY_BYTES {
                    match r.chunk().await {
                        Ok(Some(c)) => body.extend_from_slice(&c),
                        _ => break,
                    }
                }
                body.truncate(ERROR_BODY_BYTES);
                let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                Outcome::Failure {
                    status: Some(status),
                    error: format!("HTTP {status}: {snippet}"),
                }
            }
            Err(e) if e.is_timeout() => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "timeout").increment(1);
                Outcome::Failure {
                    status: None,
                    error: format!("no answer within {timeout:?}"),
                }
            }
            Err(e) => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "connect_error")
                    .increment(1);
                // Without the URL: some carry their credentials in the path.
                let e = e.without_url();
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                Outcome::Failure {
                    status: None,
                    error: msg,
                }
            }
        }
    }
}
