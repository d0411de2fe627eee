//! One webhook call: the signed request and what its answer means.

use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use tracing::Instrument;

use super::{Claimed, Deliverer, egress, redact, signing};
use crate::envelope::trace;
use crate::infra::telemetry;
use crate::services::actions::rules::Rule;

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What the receiver's answer means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// 2xx.
    Success,
    /// Anything else that may pass: retried on the schedule.
    Failure,
    /// 410 Gone: the receiver says the endpoint is gone for good; the rule is disabled.
    Gone,
}

/// One attempt, as it is recorded (`actions.attempts`).
pub(super) struct Outcome {
    pub verdict: Verdict,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub status: Option<u16>,
    /// The start of the answer, redacted (see `redact`).
    pub excerpt: Option<String>,
    /// Why it failed, for `last_error` and the attempt.
    pub error: Option<String>,
    /// What the receiver asked for with `Retry-After`, bounded by `MAX_RETRY_AFTER`.
    pub retry_after: Option<Duration>,
}

impl Outcome {
    fn failed(started_at: DateTime<Utc>, error: String) -> Self {
        Self {
            verdict: Verdict::Failure,
            started_at,
            duration: Duration::ZERO,
            status: None,
            excerpt: None,
            error: Some(error),
            retry_after: None,
        }
    }
}

impl Deliverer {
    pub(super) async fn send(&self, rule: &Rule, d: &Claimed, timeout: Duration) -> Outcome {
        let id = d.delivery_id.to_string();
        let now = self.clock.now();
        let Some(keys) = rule.signing_keys(now) else {
            return Outcome::failed(now, "the rule's secret is not a valid whsec_ secret".into());
        };
        if !self.cfg.allow_private_targets
            && let Some(error) = egress::refused_literal(&rule.webhook_url)
        {
            metrics::counter!("cj_webhook_attempts_total", "outcome" => "refused").increment(1);
            return Outcome::failed(now, error);
        }
        let span = telemetry::event_span("webhook.send", d.traceparent.as_deref(), &id);
        // The event's trace continued: by this span when traces are on, else by a new span id.
        let traceparent = telemetry::traceparent_of(&span)
            .unwrap_or_else(|| trace::child_of(d.traceparent.as_deref()));
        let ts = now.timestamp();
        let signature = signing::sign_all(&keys, &id, ts, d.body.as_bytes());
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
        let mut outcome = match result {
            Ok(mut r) => {
                let status = r.status();
                let retry_after = retry_after(r.headers(), SystemTime::from(now));
                // Read at most a little of the answer (within the call's timeout).
                let mut body = Vec::new();
                let read = async {
                    while body.len() < redact::READ_BYTES {
                        match r.chunk().await {
                            Ok(Some(c)) => body.extend_from_slice(&c),
                            _ => break,
                        }
                    }
                };
                let _ = tokio::time::timeout(timeout.saturating_sub(started.elapsed()), read).await;
                let excerpt = redact::excerpt(&body);
                let code = status.as_u16();
                let (verdict, outcome, error) = if status.is_success() {
                    (Verdict::Success, "success", None)
                } else if code == 410 {
                    (
                        Verdict::Gone,
                        "gone",
                        Some("HTTP 410 Gone: the receiver says this endpoint is gone; the rule was disabled".to_string()),
                    )
                } else {
                    let snippet: String =
                        excerpt.as_deref().unwrap_or("").chars().take(200).collect();
                    (
                        Verdict::Failure,
                        "http_error",
                        Some(format!("HTTP {code}: {snippet}").trim_end().to_string()),
                    )
                };
                metrics::counter!("cj_webhook_attempts_total", "outcome" => outcome).increment(1);
                Outcome {
                    verdict,
                    started_at: now,
                    duration: Duration::ZERO,
                    status: Some(code),
                    excerpt,
                    error,
                    retry_after: (verdict == Verdict::Failure)
                        .then_some(retry_after)
                        .flatten(),
                }
            }
            Err(e) if e.is_timeout() => {
                metrics::counter!("cj_webhook_attempts_total", "outcome" => "timeout").increment(1);
                Outcome::failed(now, format!("no answer within {timeout:?}"))
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
                Outcome::failed(now, msg)
            }
        };
        outcome.duration = started.elapsed();
        metrics::histogram!("cj_webhook_duration_seconds").record(outcome.duration.as_secs_f64());
        outcome
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP date, bounded.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(RETRY_AFTER, v.parse().unwrap());
        m
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_bounded() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(&h("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&h("999999"), now), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&h(&later), now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&h(&past), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&h("soon"), now), None);
        assert_eq!(retry_after(&h("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
