//! Authentication and authorisation (SPEC §11, ADR-0006): JWT verification with one configured
//! algorithm family, scopes matched to path and method, the app-mode middleware and the logic of
//! Traefik's ForwardAuth endpoint.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{AuthConfig, AuthMode};
use crate::infra::http::error_body;

pub const SCOPE_INGEST: &str = "ingest:write";
pub const SCOPE_QUERY: &str = "query:read";
pub const SCOPE_ACTIONS: &str = "actions:admin";
/// The outbox quarantine (`/api/v1/outbox/…`): operators only.
pub const SCOPE_OUTBOX: &str = "outbox:admin";
/// The consumers' dead letters (`/api/v1/dlq/…`): operators only.
pub const SCOPE_DLQ: &str = "dlq:admin";
/// A device's settings (`PUT /api/v1/devices/…`, its inactivity period); reading them is
/// `query:read`.
pub const SCOPE_DEVICES: &str = "devices:admin";
/// Submitting `ai.*` events (what inference derived, SPEC §9): the sidecar's token has it beside
/// `ingest:write`; a client's or a device's never does, so no one can forge an anomaly.
pub const SCOPE_INGEST_AI: &str = "ingest:ai";
pub const SCOPES: &[&str] = &[
    SCOPE_INGEST,
    SCOPE_INGEST_AI,
    SCOPE_QUERY,
    SCOPE_ACTIONS,
    SCOPE_OUTBOX,
    SCOPE_DLQ,
    SCOPE_DEVICES,
];

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_S: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Space-separated scopes (RFC 8693 `scope`).
    #[serde(default)]
    pub scope: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// `aud` is one string or an array of them (RFC 7519 §4.1.3); identity providers send either.
/// (jsonwebtoken checks it against the configured audience in both forms; this type only lets
/// the claims deserialize.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Who made a request, as far as the platform knows; stored in `metadata.subject`.
#[derive(Debug, Clone)]
pub struct Subject(pub String);

/// The scopes of an authenticated request's token (a request extension beside [`Subject`]);
/// absent with `CJ_AUTH_MODE=off`.
#[derive(Debug, Clone)]
pub struct Scopes(pub Vec<String>);

impl Scopes {
    pub fn has(&self, scope: &str) -> bool {
        self.0.iter().any(|s| s == scope)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token lacks the scope {0}")]
    Forbidden(String),
    #[error("no scope grants access to {0}")]
    NoRoute(String),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let msg = self.to_string();
        match self {
            AuthError::Missing | AuthError::Invalid(_) => {
                let mut r = error_body(StatusCode::UNAUTHORIZED, msg.clone(), json!([]));
                let challenge = if matches!(self, AuthError::Missing) {
                    "Bearer realm=\"cornjacket\"".to_string()
                } else {
                    format!(
                        "Bearer realm=\"cornjacket\", error=\"invalid_token\", error_description=\"{}\"",
                        msg.replace('"', "'")
                    )
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                r
            }
            AuthError::Forbidden(_) | AuthError::NoRoute(_) => {
                error_body(StatusCode::FORBIDDEN, msg, json!([]))
            }
        }
    }
}

/// One line of the scope table: a request under `prefix` (the path itself or below it) needs
/// `scope` when its method is one of `methods` (any method when empty); under the prefix with
/// another method, no scope opens it. Each service declares the lines of its own routes.
#[derive(Debug, Clone, Copy)]
pub struct ScopeRule {
    pub prefix: &'static str,
    pub methods: &'static [&'static str],
    pub scope: &'static str,
}

/// The scope a request needs, by path and method (the first line whose prefix matches decides);
/// `None` for paths no scope opens.
pub fn required_scope(rules: &[ScopeRule], method: &Method, path: &str) -> Option<&'static str> {
    let under = |p: &str| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    // The first rule for the path and the method: one path may need a scope to read and
    // another to change.
    rules
        .iter()
        .find(|r| under(r.prefix) && (r.methods.is_empty() || r.methods.contains(&method.as_str())))
        .map(|r| r.scope)
}

/// The configured verifier. Exactly one algorithm family is accepted, so `alg: none` and
/// algorithm confusion (an HS256 token signed with the RSA public key) are refused.
pub struct Auth {
    pub mode: AuthMode,
    verifier: Option<(DecodingKey, Validation)>,
    /// The services' scope tables, joined.
    rules: Vec<ScopeRule>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("mode", &self.mode).finish()
    }
}

impl Auth {
    /// Builds the verifier; a mode that needs a key without one is a startup error naming the
    /// variable to set.
    pub fn from_config(cfg: &AuthConfig, rules: Vec<ScopeRule>) -> Result<Arc<Self>, String> {
        let key = match (&cfg.jwt_secret, &cfg.public_key_file) {
            (Some(secret), None) => Some((
                DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                vec![Algorithm::HS256],
            )),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!(
                        "CJ_JWT_PUBLIC_KEY_FILE={}: cannot read it: {e}",
                        path.display()
                    )
                })?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .map(|k| (k, vec![Algorithm::RS256]))
                    .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (k, vec![Algorithm::ES256])))
                    .map_err(|_| {
                        format!(
                            "CJ_JWT_PUBLIC_KEY_FILE={}: not an RSA or EC (P-256) public key in PEM form",
                            path.display()
                        )
                    })?;
                Some(key)
            }
            (Some(_), Some(_)) => {
                return Err("set either CJ_JWT_SECRET or CJ_JWT_PUBLIC_KEY_FILE, not both".into());
            }
            (None, None) => None,
        };
        if key.is_none() && cfg.mode != AuthMode::Off {
            return Err(format!(
                "CJ_AUTH_MODE={} needs a JWT key: set CJ_JWT_SECRET (HS256, at least 32 characters) \
                 or CJ_JWT_PUBLIC_KEY_FILE (RS256/ES256 PEM); CJ_AUTH_MODE=off is for local development only",
                cfg.mode.as_str()
            ));
        }
        let verifier = key.map(|(k, algs)| {
            let mut v = Validation::new(algs[0]);
            v.algorithms = algs;
            v.leeway = LEEWAY_S;
            v.validate_nbf = true;
            v.required_spec_claims = HashSet::from(["exp".to_string(), "sub".to_string()]);
            match &cfg.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &cfg.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            (k, v)
        });
        if cfg.mode == AuthMode::Off {
            tracing::warn!(
                "AUTHENTICATION IS OFF (CJ_AUTH_MODE=off): every API accepts anonymous requests. \
                 Use this for local development only."
            );
        }
        Ok(Arc::new(Self {
            mode: cfg.mode,
            verifier,
            rules,
        }))
    }

    /// A pass-through instance for tools and tests that need none.
    pub fn off() -> Arc<Self> {
        Arc::new(Self {
            mode: AuthMode::Off,
            verifier: None,
            rules: Vec::new(),
        })
    }

    /// Verifies the bearer token of a request.
    pub fn verify(&self, headers: &HeaderMap) -> Result<Claims, AuthError> {
        let Some((key, validation)) = &self.verifier else {
            return Ok(Claims {
                sub: "anonymous".into(),
                scope: SCOPES.join(" "),
                exp: u64::MAX,
                nbf: None,
                iat: None,
                iss: None,
                aud: None,
            });
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Invalid("the Authorization header is not text".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Invalid("expected 'Authorization: Bearer <token>'".into()))?;
        jsonwebtoken::decode::<Claims>(token, key, validation)
            .map(|d| d.claims)
            .map_err(|e| {
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "expired".to_string(),
                    ErrorKind::ImmatureSignature => "not valid yet (nbf)".to_string(),
                    ErrorKind::InvalidSignature => "bad signature".to_string(),
                    ErrorKind::InvalidAlgorithm => "algorithm not accepted".to_string(),
                    ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
                    ErrorKind::InvalidAudience => "wrong audience".to_string(),
                    ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
                    _ => "malformed".to_string(),
                };
                AuthError::Invalid(why)
            })
    }

    /// Verifies the token and checks it grants what `method path` needs.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
    ) -> Result<Claims, AuthError> {
        let claims = match console_cookie(headers, path) {
            Some(bearer) => self.verify(&bearer)?,
            None => self.verify(headers)?,
        };
        let need = required_scope(&self.rules, method, path)
            .ok_or_else(|| AuthError::NoRoute(format!("{method} {path}")))?;
        if claims.scope.split_whitespace().any(|s| s == need) {
            Ok(claims)
        } else {
            Err(AuthError::Forbidden(need.into()))
        }
    }
}

/// The console's session cookie.
pub const CONSOLE_COOKIE: &str = "cj_console";

/// The value of the cookie `name` in a request, if set and not empty.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// A browser on the console sends its session as the `cj_console` cookie (HttpOnly,
/// SameSite=Strict, Path=/console), never an Authorization header: for console paths only, that
/// cookie stands for the bearer token — so Traefik's ForwardAuth admits a logged-in browser the
/// way the console itself does. An API path never accepts it: the APIs stay immune to CSRF.
fn console_cookie(headers: &HeaderMap, path: &str) -> Option<HeaderMap> {
    if !(path == "/console" || path.starts_with("/console/"))
        || headers.contains_key(header::AUTHORIZATION)
    {
        return None;
    }
    let token = cookie(headers, CONSOLE_COOKIE)?;
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).ok()?,
    );
    Some(h)
}

/// Paths that stay open in `app` mode: orchestrators and scrapers, and ForwardAuth itself.
fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/livez" | "/readyz" | "/metrics" | "/internal/auth/verify"
    )
}

/// The per-service middleware: every API route checks the JWT itself, in `app` mode and in
/// `gateway` mode too — the gateway's ForwardAuth checked it already, but anything that reaches
/// a port directly (inside the compose network or the ECS task) must not be trusted as any
/// subject with any scope. The subject is the token's; an `X-Auth-Subject` header is ignored.
pub async fn middleware(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if is_open(&path) {
        return next.run(req).await;
    }
    let subject = match auth.mode {
        AuthMode::App | AuthMode::Gateway => {
            match auth.authorize(req.headers(), &req.method().clone(), &path) {
                Ok(claims) => {
                    req.extensions_mut().insert(Scopes(
                        claims
                            .scope
                            .split_whitespace()
                            .map(str::to_string)
                            .collect(),
                    ));
                    Some(claims.sub)
                }
                Err(e) => {
                    metrics::counter!("cj_auth_denied_total", "reason" => match e {
                        AuthError::Missing | AuthError::Invalid(_) => "unauthenticated",
                        _ => "forbidden",
                    })
                    .increment(1);
                    return e.into_response();
                }
            }
        }
        AuthMode::Off => None,
    };
    if let Some(s) = subject {
        req.extensions_mut().insert(Subject(s));
    }
    next.run(req).await
}

/// `GET /internal/auth/verify` for Traefik ForwardAuth: the original method and URI come in
/// `X-Forwarded-Method` / `X-Forwarded-Uri`.
pub fn forward_auth(auth: &Auth, headers: &HeaderMap) -> Response {
    let method = headers
        .get("x-forwarded-method")
        .and_then(|v| v.to_str().ok())
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::GET);
    let uri = headers
        .get("x-forwarded-uri")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("/");
    let path = uri.split('?').next().unwrap_or("/");
    match auth.authorize(headers, &method, path) {
        Ok(claims) => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&claims.sub) {
                h.insert("x-auth-subject", v);
            }
            if let Ok(v) = HeaderValue::from_str(&claims.scope) {
                h.insert("x-auth-scopes", v);
            }
            r
        }
        // A person opening the console without a session is sent to its login form, as the
        // console does itself in app mode: Traefik hands a non-2xx ForwardAuth answer,
        // Location included, to the browser.
        Err(AuthError::Missing | AuthError::Invalid(_))
            if method == Method::GET
                && (path == "/console" || path.starts_with("/console/"))
                && headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("text/html")) =>
        {
            let next = crate::infra::http::percent_encode(uri);
            let mut r = StatusCode::SEE_OTHER.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/console/login?next={next}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => e.into_response(),
    }
}

/// Mints an HS256 development token (`cornjacket token`).
pub fn mint(
    secret: &str,
    sub: &str,
    scopes: &[String],
    ttl: std::time::Duration,
    cfg: &AuthConfig,
) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub: sub.to_string(),
        scope: scopes.join(" "),
        exp: now + ttl.as_secs(),
        nbf: Some(now),
        iat: Some(now),
        iss: cfg.issuer.clone(),
        aud: cfg.audience.clone().map(Audience::One),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
