//! Static files embedded in the binary: the vendored third-party assets (`vendor/web/`,
//! fetched and checked by `scripts/vendor-web.sh`), the console's own CSS and JavaScript, and
//! the three OpenAPI documents for Swagger UI.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "vendor/web/"]
#[exclude = "*.md"]
#[exclude = "*.tsv"]
struct Vendor;

const CONSOLE_CSS: &str = include_str!("static/console.css");
const CONSOLE_JS: &str = include_str!("static/console.js");

/// The OpenAPI documents Swagger UI shows, by the name in its URL.
pub const OPENAPI: &[(&str, &str)] = &[
    (
        "ingestion.yaml",
        include_str!("../../../api/openapi/ingestion.yaml"),
    ),
    (
        "query.yaml",
        include_str!("../../../api/openapi/query.yaml"),
    ),
    (
        "actions.yaml",
        include_str!("../../../api/openapi/actions.yaml"),
    ),
    ("dlq.yaml", include_str!("../../../api/openapi/dlq.yaml")),
];

/// `GET /console/assets/{path}`: `console.css`, `console.js` or a vendored file such as
/// `uplot/uPlot.iife.min.js`. Names are fixed at build time, so they may be cached for long.
pub async fn serve(Path(path): Path<String>) -> Response {
    let (body, mime): (std::borrow::Cow<'static, [u8]>, String) = match path.as_str() {
        "console.css" => (CONSOLE_CSS.as_bytes().into(), "text/css".into()),
        "console.js" => (CONSOLE_JS.as_bytes().into(), "text/javascript".into()),
        other => match Vendor::get(other) {
            Some(f) => (f.data, f.metadata.mimetype().to_string()),
            None => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
        },
    };
    let mut r = body.into_owned().into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /console/docs/{doc}`: one OpenAPI document, raw.
pub async fn openapi(Path(doc): Path<String>) -> Response {
    match OPENAPI.iter().find(|(n, _)| *n == doc) {
        Some((_, text)) => ([(header::CONTENT_TYPE, "application/yaml")], *text).into_response(),
        None => (StatusCode::NOT_FOUND, "no such document").into_response(),
    }
}
