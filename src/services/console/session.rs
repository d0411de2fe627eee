//! Who is looking: a token from the login form kept in an HttpOnly, SameSite=Strict cookie
//! scoped to `/console`, checked on every request with the platform's verifier and scope table,
//! and a CSRF token on every state-changing request.
//!
//! The CSRF token is derived from the session token (SHA-256 over a label and the token), so
//! any replica can check it without shared state, and a page from another origin — which can
//! neither read the HttpOnly cookie nor this origin's pages — cannot produce it. POSTs from
//! another site are also refused on `Sec-Fetch-Site`/`Origin` before that.

use askama::Template;
use axum::extract::{Form, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::ConsoleState;
use super::error::ConsoleError;
use crate::config::AuthMode;
use crate::infra::auth::AuthError;

pub const COOKIE: &str = crate::infra::auth::CONSOLE_COOKIE;
/// The header (or form field) that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What the pages know about the request's session.
#[derive(Clone, Debug)]
pub struct Session {
    /// The token, forwarded as Bearer when the console acts through another service's API;
    /// `None` with `CJ_AUTH_MODE=off`.
    pub token: Option<String>,
    pub subject: String,
    pub csrf: String,
    pub can_act: bool,
}

/// Paths anyone may load: the login form and the static assets.
pub fn is_open(path: &str) -> bool {
    path == "/console/login" || path.starts_with("/console/assets/")
}

pub fn csrf_for(token: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(b"cornjacket-console-csrf\0");
    h.update(token.unwrap_or("anonymous").as_bytes());
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session token of a request: its cookie, or an `Authorization: Bearer` header (scripts).
pub fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    crate::infra::auth::cookie(headers, COOKIE)
}

fn bearer_headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        h.insert(header::AUTHORIZATION, v);
    }
    h
}

/// A POST must come from this origin: browsers send `Sec-Fetch-Site` (and `Origin`) on every
/// POST, and a cross-site form or fetch says so.
fn same_origin(headers: &HeaderMap) -> Result<(), ConsoleError> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Err(ConsoleError::Csrf("the request came from another site"));
    }
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
        if origin != "null" && origin_host != host {
            return Err(ConsoleError::Csrf("the Origin is not this console"));
        }
    }
    Ok(())
}

/// Checks every console request: open paths pass; the others need a valid token with the
/// scope of their method (the platform's scope table), and POSTs a CSRF token.
pub async fn middleware(State(s): State<ConsoleState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if is_open(&path) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let session = match s.auth.mode {
        AuthMode::Off => Session {
            token: None,
            subject: "anonymous".into(),
            csrf: csrf_for(None),
            can_act: true,
        },
        AuthMode::App | AuthMode::Gateway => {
            let Some(token) = token_of(req.headers()) else {
                return unauthenticated(&req, "log in with a token");
            };
            let headers = bearer_headers(&token);
            match s.auth.authorize(&headers, &method, &path) {
                Ok(claims) => {
                    let can_act = s
                        .auth
                        .authorize(&headers, &Method::POST, "/console/")
                        .is_ok();
                    Session {
                        csrf: csrf_for(Some(&token)),
                        token: Some(token),
                        subject: claims.sub,
                        can_act,
                    }
                }
                Err(AuthError::Missing | AuthError::Invalid(_)) => {
                    return unauthenticated(&req, "the token is not valid (expired?)");
                }
                Err(e) => return e.into_response(),
            }
        }
    };
    if method == Method::POST {
        if let Err(e) = same_origin(req.headers()) {
            return e.json();
        }
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Forms without JavaScript send it as a field instead; only the logout form does.
        let from_form = path == "/console/logout";
        if !from_form && sent.as_deref() != Some(session.csrf.as_str()) {
            return ConsoleError::Csrf("missing or wrong X-CSRF-Token").json();
        }
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// A person is sent to the login form; a script gets the platform's 401.
fn unauthenticated(req: &Request, why: &str) -> Response {
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if req.method() == Method::GET && wants_html {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/console/");
        let to = format!(
            "/console/login?next={}",
            crate::infra::http::percent_encode(next)
        );
        return Redirect::to(&to).into_response();
    }
    AuthError::Invalid(why.to_string()).into_response()
}

/// Only paths of the console itself: an open redirect would send a fresh session elsewhere.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/console/") && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/console/",
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage<'a> {
    next: &'a str,
    error: Option<&'a str>,
    auth_off: bool,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_form(
    State(s): State<ConsoleState>,
    Query(q): Query<NextQuery>,
) -> Result<Response, ConsoleError> {
    let page = LoginPage {
        next: safe_next(q.next.as_deref()),
        error: None,
        auth_off: s.auth.mode == AuthMode::Off,
    };
    Ok(Html(page.render()?).into_response())
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

pub async fn login(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Result<Response, ConsoleError> {
    same_origin(&headers)?;
    let next = safe_next(f.next.as_deref()).to_string();
    let token = f.token.trim();
    let refused = |why: &str| -> Result<Response, ConsoleError> {
        let page = LoginPage {
            next: &next,
            error: Some(why),
            auth_off: s.auth.mode == AuthMode::Off,
        };
        Ok((StatusCode::UNAUTHORIZED, Html(page.render()?)).into_response())
    };
    if s.auth.mode == AuthMode::Off {
        return Ok(Redirect::to(&next).into_response());
    }
    // Only characters a JWT has: the cookie value is then never quoted or split.
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return refused("That is not a token.");
    }
    let claims = match s
        .auth
        .authorize(&bearer_headers(token), &Method::GET, "/console/")
    {
        Ok(c) => c,
        Err(AuthError::Forbidden(scope)) => {
            return refused(&format!("This token lacks the scope {scope}."));
        }
        Err(e) => return refused(&format!("The token was refused: {e}.")),
    };
    // The cookie lives as long as the token; the browser drops it then.
    let now = s.clock.now().timestamp().max(0) as u64;
    let max_age = claims.exp.saturating_sub(now).min(400 * 24 * 3600);
    let cookie =
        format!("{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ConsoleError::Internal(e.into()))?,
    );
    Ok(r)
}

pub async fn logout() -> Response {
    let mut r = Redirect::to("/console/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "cj_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_in_the_console() {
        assert_eq!(
            safe_next(Some("/console/devices?q=a")),
            "/console/devices?q=a"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/console/",
            "/api/v1/x",
            "/console\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/console/", "{bad}");
        }
        assert_eq!(safe_next(None), "/console/");
    }

    #[test]
    fn csrf_differs_per_token_and_cookie_is_found() {
        assert_ne!(csrf_for(Some("a")), csrf_for(Some("b")));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; cj_console=tok; y=2"),
        );
        assert_eq!(token_of(&h).as_deref(), Some("tok"));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8085"));
        assert!(same_origin(&h).is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8085"),
        );
        assert!(same_origin(&h).is_ok());
    }
}
