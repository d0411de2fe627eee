//! The console's errors, mapped to responses in one place: a page for a person, the platform's
//! JSON error body for a script (`Accept: application/json`) or an htmx request.

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::infra::http::{DbFailure, error_body};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("CSRF check failed: {0}")]
    Csrf(&'static str),
    /// What another service answered when the console acted through its API.
    #[error("{service} answered {status}: {message}")]
    Upstream {
        service: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("{service} is unreachable: {message}")]
    Unreachable {
        service: &'static str,
        message: String,
    },
    #[error("the database is unavailable")]
    Unavailable,
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<sqlx::Error> for ConsoleError {
    fn from(e: sqlx::Error) -> Self {
        match DbFailure::of(e) {
            DbFailure::Unavailable | DbFailure::NotMigrated => ConsoleError::Unavailable,
            DbFailure::Internal(e) => ConsoleError::Internal(e.into()),
        }
    }
}

impl From<askama::Error> for ConsoleError {
    fn from(e: askama::Error) -> Self {
        ConsoleError::Internal(e.into())
    }
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Csrf(_) => StatusCode::FORBIDDEN,
            // The upstream's own client errors pass through (403 for a missing scope, 409 for
            // a dead letter no longer pending); its failures are a bad gateway.
            ConsoleError::Upstream { status, .. } if status.is_client_error() => *status,
            ConsoleError::Upstream { .. } | ConsoleError::Unreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ConsoleError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// As the platform's JSON error body (for scripts and htmx fragments).
    pub fn json(self) -> Response {
        let status = self.status();
        if let ConsoleError::Internal(e) = &self {
            return crate::infra::http::internal("Console request failed.", e);
        }
        error_body(status, self.to_string(), serde_json::json!([]))
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ConsoleError::Internal(e) => {
                tracing::error!(error = ?e, "Console request failed.");
                "internal error (logged)".to_string()
            }
            other => other.to_string(),
        };
        let page = ErrorPage {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or(""),
            message: &message,
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message).into_response(),
        }
    }
}
