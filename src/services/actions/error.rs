//! Action API errors and their HTTP answers, in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiState;
use crate::envelope::FieldError;
use crate::infra::extract::{Rejection, Rejects};
use crate::infra::http::{self, DbFailure, error_body};

#[derive(Debug, thiserror::Error)]
pub enum ActionsError {
    #[error("the rule is invalid")]
    Invalid(Vec<FieldError>),
    /// A request other than a rule document (recovery, rotation) with field errors.
    #[error("the request is invalid")]
    InvalidRequest(Vec<FieldError>),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("the database is unavailable; retry later")]
    Unavailable,
    #[error("the action orchestrator has not migrated its schema yet; retry later")]
    NotReady,
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<sqlx::Error> for ActionsError {
    fn from(e: sqlx::Error) -> Self {
        match DbFailure::of(e) {
            DbFailure::Unavailable => ActionsError::Unavailable,
            DbFailure::NotMigrated => ActionsError::NotReady,
            DbFailure::Internal(e) => ActionsError::Internal(e.into()),
        }
    }
}

/// Path and query rejections (a NUL, text that is not UTF-8, a shape serde refuses) are the
/// client's; a missing path parameter would be a routing bug.
impl From<Rejection> for ActionsError {
    fn from(r: Rejection) -> Self {
        if r.status.is_client_error() {
            ActionsError::BadRequest(r.message)
        } else {
            ActionsError::Internal(anyhow::anyhow!(r.message))
        }
    }
}

impl Rejects for ApiState {
    type Error = ActionsError;
}

impl IntoResponse for ActionsError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            ActionsError::Invalid(details) | ActionsError::InvalidRequest(details) => {
                http::invalid(msg, &details)
            }
            ActionsError::BadRequest(_) => error_body(StatusCode::BAD_REQUEST, msg, json!([])),
            ActionsError::NotFound(_) => error_body(StatusCode::NOT_FOUND, msg, json!([])),
            ActionsError::Conflict(_) => error_body(StatusCode::CONFLICT, msg, json!([])),
            ActionsError::TooLarge(_) => error_body(StatusCode::PAYLOAD_TOO_LARGE, msg, json!([])),
            ActionsError::UnsupportedMediaType => {
                error_body(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg, json!([]))
            }
            ActionsError::Unavailable | ActionsError::NotReady => http::unavailable(msg),
            ActionsError::Internal(e) => http::internal("Action API request failed.", &e),
        }
    }
}
