//! Request extractors that turn bad input into the service's own JSON 4xx.
//!
//! axum's own `Query` and `Path` reject with `text/plain`, and they let through what PostgreSQL
//! then refuses: a NUL (U+0000) in `text` or `jsonb` is an error of the database, which a
//! handler can only answer with a 500. These wrappers refuse it at the boundary instead, and
//! `Query` also refuses percent-encodings that are not UTF-8 (axum would replace them with
//! U+FFFD and answer as if the client had asked for something else), then deserializes into
//! the route's typed parameters with messages that name them ([`query`]). The router's state names
//! the error type the rejections become (`Rejects`), so each service keeps its mapping to HTTP
//! in its one error module.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::http::error_body;

pub mod query;

/// A request an extractor refused, with the status axum would have answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub message: String,
}

impl Rejection {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        error_body(self.status, self.message, json!([]))
    }
}

/// A router state whose service answers extractor rejections with its own error type.
pub trait Rejects {
    type Error: From<Rejection> + IntoResponse;
}

/// What is wrong with text holding a NUL, after the name of the field that holds it.
pub const NUL_REFUSED: &str = "contains a NUL character (U+0000), which is not accepted";

/// Why a client's text cannot reach the database, if it cannot.
pub fn text_problem(s: &str) -> Option<&'static str> {
    s.contains('\0').then_some(NUL_REFUSED)
}

/// Where a JSON document holds a NUL in a key or a string (`webhook.headers.x`,
/// `condition.all[0].value`; `body` for the document itself), if anywhere: `jsonb` refuses
/// `\u0000`, and a `text` column refuses the character.
pub fn json_nul(doc: &Value) -> Option<String> {
    // Iterative, so depth is no concern; serde_json already caps it at 128 on parsing.
    let mut stack = vec![(doc, String::new())];
    while let Some((v, at)) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return Some(field(at)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push((item, format!("{at}[{i}]")));
                }
            }
            Value::Object(m) => {
                let mut children = Vec::with_capacity(m.len());
                for (k, item) in m {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    if k.contains('\0') {
                        return Some(path);
                    }
                    children.push((item, path));
                }
                stack.extend(children.into_iter().rev());
            }
            _ => {}
        }
    }
    None
}

fn field(at: String) -> String {
    if at.is_empty() { "body".into() } else { at }
}

/// The query string as the route's typed parameters (`T`, usually a struct with
/// `deny_unknown_fields` of the types in [`query`]), rejected with the service's error. Every
/// name and value must be UTF-8 once percent-decoded and free of NUL; what `T` refuses is told
/// by name ([`query`]).
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Rejects + Send + Sync,
{
    type Rejection = S::Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let pairs = decode_query(parts.uri.query().unwrap_or_default())?;
        query::from_pairs(pairs)
            .map(Query)
            .map_err(|e| Rejection::bad_request(e.0).into())
    }
}

/// Every name and value of an `application/x-www-form-urlencoded` query, decoded strictly.
fn decode_query(query: &str) -> Result<Vec<(String, String)>, Rejection> {
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(k).ok_or_else(|| {
            Rejection::bad_request("a query parameter name is not UTF-8 once percent-decoded")
        })?;
        let shown = name.escape_debug();
        if let Some(why) = text_problem(&name) {
            return Err(Rejection::bad_request(format!(
                "query parameter name '{shown}' {why}"
            )));
        }
        let value = decode(v).ok_or_else(|| {
            Rejection::bad_request(format!(
                "query parameter '{shown}' is not UTF-8 once percent-decoded"
            ))
        })?;
        if let Some(why) = text_problem(&value) {
            return Err(Rejection::bad_request(format!(
                "query parameter '{shown}' {why}"
            )));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Form decoding (`+` is a space, `%XX` a byte; a `%` not followed by two hex digits stays as
/// it is, as `form_urlencoded` leaves it), `None` when the bytes are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                b.get(i + 1).and_then(|&h| hex(h)),
                b.get(i + 2).and_then(|&l| hex(l)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `axum::extract::Path` that refuses a NUL in any segment, and rejects with the service's
/// error (a segment that is not UTF-8 once percent-decoded is refused by axum already).
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Rejects + Send + Sync,
{
    type Rejection = S::Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let rejected =
            |status: StatusCode, message: String| S::Error::from(Rejection { status, message });
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| rejected(e.status(), e.body_text()))?;
        for (name, value) in &raw {
            if let Some(why) = text_problem(value) {
                return Err(rejected(
                    StatusCode::BAD_REQUEST,
                    format!("path segment '{name}' {why}"),
                ));
            }
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| rejected(e.status(), e.body_text()))
    }
}

/// The answer for a route that exists without the request's method (axum's is an empty 405);
/// install it with `Router::method_not_allowed_fallback` before layering the router. axum
/// adds the `Allow` header.
pub async fn method_not_allowed() -> Response {
    error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
        json!([]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn query_decoding_is_strict_about_utf8_and_nul_and_keeps_every_pair() {
        assert_eq!(decode_query(""), Ok(vec![]));
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            decode_query("a=1&b=&c&&d=%C3%A9+x%zz%&a=2"),
            Ok(vec![
                pair("a", "1"),
                pair("b", ""),
                pair("c", ""),
                pair("d", "é x%zz%"),
                pair("a", "2"),
            ])
        );
        for bad in [
            "event_type=%00x",
            "consumer=x%00",
            "a=%FF",
            "%FF=1",
            "%00=1",
            "a=%C3%28",
        ] {
            let e = decode_query(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(
            decode_query("consumer=x%00")
                .unwrap_err()
                .message
                .contains("'consumer'")
        );
    }

    #[test]
    fn json_nul_names_the_field() {
        let doc = json!({"name": "ok", "webhook": {"headers": {"x": "a\u{0}"}}});
        assert_eq!(json_nul(&doc).as_deref(), Some("webhook.headers.x"));
        let doc = json!({"condition": {"all": [{"path": "p", "op": "==", "value": [1, "\u{0}"]}]}});
        assert_eq!(json_nul(&doc).as_deref(), Some("condition.all[0].value[1]"));
        assert_eq!(json_nul(&json!({"a\u{0}": 1})).as_deref(), Some("a\u{0}"));
        assert_eq!(json_nul(&json!("\u{0}")).as_deref(), Some("body"));
        assert_eq!(json_nul(&json!({"a": [1, {"b": "c"}], "d": null})), None);
    }

    proptest! {
        /// Any text, percent-encoded byte by byte (spaces as `+`), decodes back to itself.
        #[test]
        fn decode_inverts_form_encoding(s in any::<String>()) {
            let encoded: String = s
                .bytes()
                .map(|b| match b {
                    b' ' => "+".to_string(),
                    b if b.is_ascii_alphanumeric() => (b as char).to_string(),
                    b => format!("%{b:02X}"),
                })
                .collect();
            prop_assert_eq!(decode(&encoded), Some(s));
        }
    }
}
