//! `POST /api/v1/ingest`, its alias `/api/v1/events`, and `/api/v1/ingest/batch` (SPEC §5).

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::Instrument;

use super::AppState;
use super::error::IngestError;
use super::writer::{Outcome, Pending, WriteError};
use crate::envelope::{self, Rules, Source, Submission, trace};
use crate::infra::auth::{SCOPE_INGEST_AI, Scopes, Subject};

crate::infra::http::routes! {
    /// This module's routes; [`super::ROUTES`] lists all of the service's.
    pub const ROUTES;
    pub fn router(state: &AppState) -> Router<AppState> {
        post "/api/v1/ingest" => ingest,
            layer(DefaultBodyLimit::max(state.config.ingestion.max_body_bytes));
        post "/api/v1/events" => ingest,
            layer(DefaultBodyLimit::max(state.config.ingestion.max_body_bytes));
        post "/api/v1/ingest/batch" => ingest_batch,
            layer(DefaultBodyLimit::max(state.config.ingestion.max_batch_body_bytes));
    }
}

/// Checks shared by both endpoints, cheapest first: media type, size. (The per-client rate
/// limit runs before, as the shared middleware on these routes.)
fn admit_bytes(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, IngestError> {
    if !crate::infra::http::is_json(headers) {
        return Err(IngestError::UnsupportedMediaType);
    }
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge(limit)
        } else {
            IngestError::BadRequest(format!("could not read the body: {r}"))
        }
    })
}

/// [`admit_bytes`], then the body as one JSON value.
fn admit(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Value, IngestError> {
    let body = admit_bytes(headers, body, limit)?;
    serde_json::from_slice(&body).map_err(|e| IngestError::InvalidJson(e.to_string()))
}

/// The `events` of a batch body, each still as the client's text (borrowed, not built). Parsing
/// stops at the first item past `max`: a body of millions of tiny items is refused after reading
/// `max + 1` of them, with nothing but their positions held. Other top-level fields are skipped.
fn parse_batch(body: &[u8], max: usize) -> Result<Vec<&RawValue>, IngestError> {
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    const TOO_MANY: &str = "cj-too-many-events";
    const NOT_ARRAY: &str = "cj-events-array";

    struct Body(usize);
    struct Items(usize);
    impl<'de> DeserializeSeed<'de> for Body {
        type Value = Option<Vec<&'de RawValue>>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Body {
        type Value = Option<Vec<&'de RawValue>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object with an events array")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut events = None;
            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if k == "events" {
                    events = Some(m.next_value_seed(Items(self.0))?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(events)
        }
    }
    impl<'de> DeserializeSeed<'de> for Items {
        type Value = Vec<&'de RawValue>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Items {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(NOT_ARRAY)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = s.next_element::<&'de RawValue>()? {
                if items.len() == self.0 {
                    return Err(de::Error::custom(TOO_MANY));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    let not_array = || {
        IngestError::Validation(vec![envelope::FieldError {
            field: "events".into(),
            message: "required: an array of events".into(),
        }])
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    match Body(max)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
    {
        Ok(Some(items)) => Ok(items),
        Ok(None) => Err(not_array()),
        Err(e) if e.to_string().contains(TOO_MANY) => Err(IngestError::TooManyEvents(format!(
            "the batch has more than {max} events; the limit is {max}"
        ))),
        Err(e) if e.to_string().contains(NOT_ARRAY) => Err(not_array()),
        Err(e) if e.is_data() => Err(IngestError::BadRequest(format!(
            "the body must be a JSON object with an events array: {e}"
        ))),
        Err(e) => Err(IngestError::InvalidJson(e.to_string())),
    }
}

fn submission(
    state: &AppState,
    headers: &HeaderMap,
    subject: Option<Extension<Subject>>,
    scopes: Option<Extension<Scopes>>,
) -> Submission {
    // With traces on, the request's span (already a child of the client's traceparent) is the
    // event's parent; otherwise the client's traceparent is kept as is, or a trace is started.
    let traceparent = crate::infra::telemetry::traceparent_of(&tracing::Span::current())
        .or_else(|| {
            headers
                .get(trace::HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| trace::is_valid(v))
                .map(str::to_string)
        })
        .unwrap_or_else(trace::new_trace);
    Submission {
        source: Source::Http,
        subject: subject.map(|Extension(Subject(s))| s),
        traceparent: Some(traceparent),
        aggregate_id: None,
        ai_allowed: state.auth.mode == crate::config::AuthMode::Off
            || scopes.is_some_and(|Extension(s)| s.has(SCOPE_INGEST_AI)),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, IngestError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .ok_or_else(|| {
            IngestError::BadRequest(
                "Idempotency-Key must be 1 to 256 visible ASCII characters".to_string(),
            )
        })?;
    Ok(Some(s.to_string()))
}

async fn commit(state: &AppState, events: Vec<Pending>) -> Result<Vec<Outcome>, IngestError> {
    if !state.is_ready() {
        return Err(IngestError::Starting);
    }
    let n = events.len() as u64;
    let span = if crate::infra::telemetry::traces_on() {
        tracing::info_span!("outbox.insert", events = n)
    } else {
        tracing::Span::none()
    };
    match tokio::time::timeout(
        state.config.ingestion.request_timeout,
        state.writer.submit(events).instrument(span),
    )
    .await
    {
        Ok(Ok(outcomes)) => {
            let conflicts = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Conflict(_)))
                .count() as u64;
            let accepted = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Accepted(_)))
                .count() as u64;
            metrics::counter!("cj_events_accepted_total", "source" => "http").increment(accepted);
            if conflicts > 0 {
                metrics::counter!("cj_ingest_rejected_total", "reason" => "conflict")
                    .increment(conflicts);
            }
            Ok(outcomes)
        }
        Ok(Err(WriteError::Unavailable)) | Err(_) => Err(IngestError::Unavailable),
        Ok(Err(e)) => Err(IngestError::Internal(e.into())),
    }
}

#[tracing::instrument(skip_all, fields(event_id))]
async fn ingest(
    State(state): State<AppState>,
    subject: Option<Extension<Subject>>,
    scopes: Option<Extension<Scopes>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let limit = state.config.ingestion.max_body_bytes;
    let value = admit(&headers, body, limit)?;
    let key = idempotency_key(&headers)?;
    let env = envelope::validate_request(
        &value,
        &submission(&state, &headers, subject, scopes),
        state.rules(),
        state.now(),
    )
    .map_err(|errs| {
        metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid").increment(1);
        IngestError::Validation(errs)
    })?;
    let outcome = commit(&state, vec![Pending::new(env, &value, key)])
        .await?
        .pop()
        .expect("one outcome per event");
    let id = match outcome {
        Outcome::Accepted(id) => id,
        Outcome::Conflict(c) => return Err(c.into()),
        Outcome::Unavailable => return Err(IngestError::Unavailable),
    };
    tracing::Span::current().record("event_id", tracing::field::display(id));
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "event_id": id, "status": "accepted" })),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(events))]
async fn ingest_batch(
    State(state): State<AppState>,
    subject: Option<Extension<Subject>>,
    scopes: Option<Extension<Scopes>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let limit = state.config.ingestion.max_batch_body_bytes;
    let bytes = admit_bytes(&headers, body, limit)?;
    let max = state.config.ingestion.max_batch_events;
    let items = parse_batch(&bytes, max)?;
    if items.is_empty() {
        return Err(IngestError::BadRequest(
            "events must hold at least one event".into(),
        ));
    }
    tracing::Span::current().record("events", items.len());
    let sub = submission(&state, &headers, subject, scopes);
    let (rules, now) = (state.rules(), state.now());
    let single_limit = state.config.ingestion.max_body_bytes;
    let mut results: Vec<Value> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    let mut valid_at = Vec::new();
    for (i, raw) in items.iter().enumerate() {
        // Each item is measured as the client wrote it, before it is built.
        let item = if raw.get().len() > single_limit {
            Err(vec![envelope::FieldError {
                field: format!("events[{i}]"),
                message: format!("larger than the {single_limit}-byte limit of one event"),
            }])
        } else {
            serde_json::from_str::<Value>(raw.get()).map_err(|e| {
                vec![envelope::FieldError {
                    field: format!("events[{i}]"),
                    message: format!("invalid JSON: {e}"),
                }]
            })
        };
        let checked = item.and_then(|item| {
            envelope::validate_request(&item, &sub, rules, now).map(|env| (env, item))
        });
        let checked = checked.map(|(env, item)| Pending::new(env, &item, None));
        match checked {
            Ok(pending) => {
                valid_at.push(i);
                valid.push(pending);
                results.push(Value::Null);
            }
            Err(details) => results.push(json!({
                "index": i, "status": "rejected", "error": "validation failed",
                "code": "validation_failed", "details": details
            })),
        }
    }
    let rejected = items.len() - valid.len();
    if rejected > 0 {
        metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid")
            .increment(rejected as u64);
    }
    let mut accepted = 0;
    let mut conflicts = 0;
    // Only when part of the batch committed and part could not: those are retried alone.
    let mut unavailable = 0;
    if !valid.is_empty() {
        let outcomes = commit(&state, valid).await?;
        for (i, outcome) in valid_at.into_iter().zip(outcomes) {
            results[i] = match outcome {
                Outcome::Accepted(id) => {
                    accepted += 1;
                    json!({ "index": i, "status": "accepted", "event_id": id })
                }
                Outcome::Conflict(c) => {
                    conflicts += 1;
                    json!({ "index": i, "status": "rejected", "error": c.to_string(),
                           "code": "idempotency_conflict", "details": [] })
                }
                Outcome::Unavailable => {
                    unavailable += 1;
                    json!({ "index": i, "status": "rejected",
                            "error": IngestError::Unavailable.to_string(), "code": "unavailable",
                            "details": [] })
                }
            };
        }
    }
    let rejected = rejected + conflicts + unavailable;
    // Nothing accepted: 409 when every refusal was a conflict (the request was well formed and
    // a retry of it will not help), 400 otherwise.
    let status = if accepted > 0 {
        StatusCode::ACCEPTED
    } else if conflicts == rejected {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut body = json!({ "accepted": accepted, "rejected": rejected, "results": results });
    if accepted == 0 {
        let (error, code) = if status == StatusCode::CONFLICT {
            (
                "every event in the batch conflicts with one accepted before",
                "idempotency_conflict",
            )
        } else {
            ("no event in the batch is valid", "validation_failed")
        };
        body["error"] = json!(error);
        body["code"] = json!(code);
        body["details"] = json!([]);
    }
    Ok((status, Json(body)).into_response())
}

impl AppState {
    pub(super) fn rules(&self) -> Rules {
        Rules {
            strict_types: self.config.ingestion.strict_types,
        }
    }
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}
