//! `POST /api/v1/ingest`, its alias `/api/v1/events`, and `/api/v1/ingest/batch` (SPEC §5).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tracing::Instrument;
use uuid::Uuid;

use super::AppState;
use super::error::IngestError;
use super::writer::{Pending, WriteError};
use crate::envelope::{self, Envelope, Rules, Source, Submission};
use crate::infra::auth::Subject;

/// Every route this module serves, for the OpenAPI agreement test.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/ingest"),
    ("post", "/api/v1/events"),
    ("post", "/api/v1/ingest/batch"),
    ("get", "/internal/auth/verify"),
];

pub fn router(state: &AppState) -> Router<AppState> {
    let single = state.config.ingestion.max_body_bytes;
    let batch = state.config.ingestion.max_batch_body_bytes;
    Router::new()
        .route(
            "/api/v1/ingest",
            post(ingest).layer(DefaultBodyLimit::max(single)),
        )
        .route(
            "/api/v1/events",
            post(ingest).layer(DefaultBodyLimit::max(single)),
        )
        .route(
            "/api/v1/ingest/batch",
            post(ingest_batch).layer(DefaultBodyLimit::max(batch)),
        )
}

/// Checks shared by both endpoints, cheapest first: media type, size, JSON. (The per-client
/// rate limit runs before, as the shared middleware on these routes.)
fn admit(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Value, IngestError> {
    if !crate::infra::http::is_json(headers) {
        return Err(IngestError::UnsupportedMediaType);
    }
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge(limit)
        } else {
            IngestError::BadRequest(format!("could not read the body: {r}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| IngestError::InvalidJson(e.to_string()))
}

fn submission(headers: &HeaderMap, subject: Option<Extension<Subject>>) -> Submission {
    // With traces on, the request's span (already a child of the client's traceparent) is the
    // event's parent; otherwise the client's traceparent is kept as is, or a trace is started.
    let traceparent = crate::infra::telemetry::traceparent_of(&tracing::Span::current())
        .or_else(|| {
            headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .filter(|v| envelope::is_traceparent(v))
                .map(str::to_string)
        })
        .unwrap_or_else(new_traceparent);
    Submission {
        source: Source::Http,
        subject: subject.map(|Extension(Subject(s))| s),
        traceparent: Some(traceparent),
        aggregate_id: None,
    }
}

/// Starts a trace for a request that did not bring one (W3C trace-context, sampled).
pub fn new_traceparent() -> String {
    let trace = Uuid::now_v7().simple().to_string();
    let span = Uuid::now_v7().simple().to_string();
    format!("00-{trace}-{}-01", &span[16..])
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

fn pending(e: Envelope, body: &Value, key: Option<String>) -> Pending {
    let client_event_id = body.get("event_id").is_some_and(|v| !v.is_null());
    Pending {
        envelope: e,
        client_event_id,
        idempotency_key: key,
    }
}

async fn commit(state: &AppState, events: Vec<Pending>) -> Result<Vec<Uuid>, IngestError> {
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
        Ok(Ok(ids)) => {
            metrics::counter!("cj_events_accepted_total", "source" => "http").increment(n);
            Ok(ids)
        }
        Ok(Err(WriteError::Unavailable)) | Err(_) => Err(IngestError::Unavailable),
        Ok(Err(e)) => Err(IngestError::Internal(e.into())),
    }
}

#[tracing::instrument(skip_all, fields(event_id))]
async fn ingest(
    State(state): State<AppState>,
    subject: Option<Extension<Subject>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let limit = state.config.ingestion.max_body_bytes;
    let value = admit(&headers, body, limit)?;
    let key = idempotency_key(&headers)?;
    let env = envelope::validate_request(
        &value,
        &submission(&headers, subject),
        state.rules(),
        state.now(),
    )
    .map_err(|errs| {
        metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid").increment(1);
        IngestError::Validation(errs)
    })?;
    let ids = commit(&state, vec![pending(env, &value, key)]).await?;
    tracing::Span::current().record("event_id", tracing::field::display(ids[0]));
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "event_id": ids[0], "status": "accepted" })),
    )
        .into_response())
}

#[tracing::instrument(skip_all, fields(events))]
async fn ingest_batch(
    State(state): State<AppState>,
    subject: Option<Extension<Subject>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let limit = state.config.ingestion.max_batch_body_bytes;
    let value = admit(&headers, body, limit)?;
    let Some(items) = value.get("events").and_then(Value::as_array) else {
        return Err(IngestError::Validation(vec![envelope::FieldError {
            field: "events".into(),
            message: "required: an array of events".into(),
        }]));
    };
    let max = state.config.ingestion.max_batch_events;
    if items.len() > max {
        return Err(IngestError::TooManyEvents(format!(
            "the batch has {} events; the limit is {max}",
            items.len()
        )));
    }
    if items.is_empty() {
        return Err(IngestError::BadRequest(
            "events must hold at least one event".into(),
        ));
    }
    tracing::Span::current().record("events", items.len());
    let sub = submission(&headers, subject);
    let (rules, now) = (state.rules(), state.now());
    let single_limit = state.config.ingestion.max_body_bytes;
    let mut results: Vec<Value> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    let mut valid_at = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let checked = if serde_json::to_vec(item).map(|b| b.len()).unwrap_or(0) > single_limit {
            Err(vec![envelope::FieldError {
                field: format!("events[{i}]"),
                message: format!("larger than the {single_limit}-byte limit of one event"),
            }])
        } else {
            envelope::validate_request(item, &sub, rules, now)
        };
        match checked {
            Ok(env) => {
                valid_at.push(i);
                valid.push(pending(env, item, None));
                results.push(Value::Null);
            }
            Err(details) => results.push(json!({
                "index": i, "status": "rejected", "error": "validation failed", "details": details
            })),
        }
    }
    let rejected = items.len() - valid.len();
    if rejected > 0 {
        metrics::counter!("cj_ingest_rejected_total", "reason" => "invalid")
            .increment(rejected as u64);
    }
    let accepted = valid.len();
    if accepted > 0 {
        let ids = commit(&state, valid).await?;
        for (i, id) in valid_at.into_iter().zip(ids) {
            results[i] = json!({ "index": i, "status": "accepted", "event_id": id });
        }
    }
    let status = if accepted > 0 {
        StatusCode::ACCEPTED
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut body = json!({ "accepted": accepted, "rejected": rejected, "results": results });
    if accepted == 0 {
        body["error"] = json!("no event in the batch is valid");
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
