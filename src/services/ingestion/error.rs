//! Every way an ingestion request can fail, and its HTTP answer (SPEC §5). Client errors keep
//! their message; anything else is logged with its cause and answered as an opaque 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::envelope::FieldError;
use crate::infra::http::{self, error_body};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body too large: the limit is {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    TooManyEvents(String),
    #[error("unsupported media type: send the body as JSON with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    Conflict(#[from] super::writer::Conflict),
    #[error("the database is unavailable; the event was not accepted, retry later")]
    Unavailable,
    #[error("the service is starting (waiting for its database); retry later")]
    Starting,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            IngestError::Validation(details) => http::invalid(msg, &details),
            IngestError::InvalidJson(_) | IngestError::BadRequest(_) => {
                error_body(StatusCode::BAD_REQUEST, msg, json!([]))
            }
            IngestError::TooLarge(_) | IngestError::TooManyEvents(_) => {
                error_body(StatusCode::PAYLOAD_TOO_LARGE, msg, json!([]))
            }
            IngestError::Conflict(_) => {
                http::coded(StatusCode::CONFLICT, "idempotency_conflict", msg, json!([]))
            }
            IngestError::UnsupportedMediaType => {
                error_body(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg, json!([]))
            }
            IngestError::Unavailable | IngestError::Starting => http::unavailable(msg),
            IngestError::Internal(e) => http::internal("Ingestion request failed.", &e),
        }
    }
}
