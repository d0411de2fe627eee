//! Query errors and their HTTP answers, in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::QueryState;
use crate::infra::extract::{Rejection, Rejects};
use crate::infra::http::{self, DbFailure, error_body};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the database is unavailable; retry later")]
    Unavailable,
    #[error("the read model is not initialised yet (its service has not migrated); retry later")]
    NotInitialised,
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<sqlx::Error> for QueryError {
    fn from(e: sqlx::Error) -> Self {
        match DbFailure::of(e) {
            DbFailure::Unavailable => QueryError::Unavailable,
            DbFailure::NotMigrated => QueryError::NotInitialised,
            DbFailure::Internal(e) => QueryError::Internal(e.into()),
        }
    }
}

/// Path and query rejections (a NUL, text that is not UTF-8, a shape serde refuses) are the
/// client's; a missing path parameter would be a routing bug.
impl From<Rejection> for QueryError {
    fn from(r: Rejection) -> Self {
        if r.status.is_client_error() {
            QueryError::BadRequest(r.message)
        } else {
            QueryError::Internal(anyhow::anyhow!(r.message))
        }
    }
}

impl Rejects for QueryState {
    type Error = QueryError;
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            QueryError::NotFound(_) => error_body(StatusCode::NOT_FOUND, msg, json!([])),
            QueryError::BadRequest(_) => error_body(StatusCode::BAD_REQUEST, msg, json!([])),
            QueryError::Unavailable | QueryError::NotInitialised => http::unavailable(msg),
            QueryError::Internal(e) => http::internal("Query failed.", &e),
        }
    }
}
