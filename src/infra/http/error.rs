//! How a failed request is answered, the same on every port: a JSON body `{"error", "code",
//! "details"}` — `error` for people, `code` a stable machine-readable name for programs (see
//! [`code_of`]), and on a 400 the [`FieldError`]s of whatever refused the fields; 503 with
//! `Retry-After` while a dependency is away; an opaque 500 whose cause is logged, never shown.
//! Each service's error enum picks its statuses and messages and answers through these.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::envelope::FieldError;
use crate::infra::db;

/// A JSON error body `{"error": ..., "code": ..., "details": [...]}`, its code the status's.
pub fn error_body(status: StatusCode, error: impl Into<String>, details: Value) -> Response {
    let code = code_of(status, &details);
    coded(status, code, error, details)
}

/// An error body with a code more specific than its status's (`idempotency_conflict`).
pub fn coded(
    status: StatusCode,
    code: &'static str,
    error: impl Into<String>,
    details: Value,
) -> Response {
    (
        status,
        Json(json!({ "error": error.into(), "code": code, "details": details })),
    )
        .into_response()
}

/// The stable code of an error answer: one per status, a 400 naming fields being
/// `validation_failed`. Clients branch on these, never on the `error` text, which may be
/// reworded; the list is part of the API (the OpenAPI documents' `ErrorCode`).
pub fn code_of(status: StatusCode, details: &Value) -> &'static str {
    let fields = details.as_array().is_some_and(|d| !d.is_empty());
    match status.as_u16() {
        400 if fields => "validation_failed",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        406 => "not_acceptable",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "validation_failed",
        429 => "rate_limited",
        503 => "unavailable",
        504 => "timeout",
        _ if status.is_server_error() => "internal",
        _ => "error",
    }
}

/// Every code an answer can carry, for the documents' agreement test.
pub const CODES: &[&str] = &[
    "validation_failed",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "not_acceptable",
    "request_timeout",
    "conflict",
    "idempotency_conflict",
    "payload_too_large",
    "unsupported_media_type",
    "rate_limited",
    "unavailable",
    "timeout",
    "internal",
    "error",
];

/// 400 with the fields at fault.
pub fn invalid(error: impl Into<String>, details: &[FieldError]) -> Response {
    error_body(StatusCode::BAD_REQUEST, error, json!(details))
}

/// 503 with `Retry-After: 1`: the request may well succeed in a moment.
pub fn unavailable(error: impl Into<String>) -> Response {
    let mut r = error_body(StatusCode::SERVICE_UNAVAILABLE, error, json!([]));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// The opaque 500: the cause (with its chain, for an `anyhow::Error`) goes to the log as `what`
/// says, the client only learns that it was not its fault.
pub fn internal(what: &str, cause: &dyn std::fmt::Debug) -> Response {
    tracing::error!(error = ?cause, "{what}");
    error_body(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error",
        json!([]),
    )
}

/// What a failed statement means for the request that ran it.
#[derive(Debug)]
pub enum DbFailure {
    /// The database is not there, or cannot take this now ([`db::is_unavailable`]): 503.
    Unavailable,
    /// A relation or schema the request reads does not exist yet: the service that owns it has
    /// not migrated (it is starting, or waiting for the database). 503 too.
    NotMigrated,
    /// Anything else is a fault of ours, not the client's: 500.
    Internal(sqlx::Error),
}

impl DbFailure {
    pub fn of(e: sqlx::Error) -> Self {
        if db::is_unavailable(&e) {
            return DbFailure::Unavailable;
        }
        // 42P01 undefined_table, 3F000 invalid_schema_name.
        if let sqlx::Error::Database(d) = &e
            && matches!(d.code().as_deref(), Some("42P01" | "3F000"))
        {
            return DbFailure::NotMigrated;
        }
        DbFailure::Internal(e)
    }
}
