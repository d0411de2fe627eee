//! Console (port 8085): the operator console, server-rendered HTML under `/console/`.
//!
//! It reads through the query service's database URL (every schema's read side) and acts only
//! through the other services' HTTP APIs, forwarding the operator's token, so each action is
//! checked by the service that owns it exactly as a curl call would be. Live parts of pages are
//! Server-Sent Events fed by one sampler shared by every viewer.

mod assets;
mod error;
mod feeds;
mod overview;
mod pages;
mod session;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::ServiceContext;
use crate::config::ConsoleConfig;
use crate::infra::auth::{SCOPE_ACTIONS, SCOPE_QUERY, ScopeRule};
use crate::infra::db;
use crate::infra::http::{Check, health_response, metrics_router, not_found, serve};

/// Reading needs `query:read`, every button `actions:admin`. The login form and the assets are
/// open (see [`session::is_open`]).
pub const SCOPES: &[ScopeRule] = &[
    ScopeRule {
        prefix: "/console",
        methods: &["GET", "HEAD"],
        scope: SCOPE_QUERY,
    },
    ScopeRule {
        prefix: "/console",
        methods: &["POST"],
        scope: SCOPE_ACTIONS,
    },
];

/// Every route under `/console` (method, path), for the deployment files' checks.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/console"),
    ("get", "/console/"),
    ("get", "/console/live/overview"),
    ("get", "/console/devices"),
    ("get", "/console/devices/{device_id}"),
    ("get", "/console/devices/{device_id}/series"),
    ("get", "/console/anomalies"),
    ("get", "/console/live/anomalies"),
    ("get", "/console/tail"),
    ("get", "/console/live/tail"),
    ("get", "/console/webhooks"),
    ("post", "/console/webhooks/rules/{rule_id}/{action}"),
    ("post", "/console/webhooks/deliveries/{delivery_id}/retry"),
    ("get", "/console/dead-letters"),
    ("post", "/console/dead-letters/{consumer}/{dlq_id}/{action}"),
    ("get", "/console/docs"),
    ("get", "/console/docs/{doc}"),
    ("get", "/console/login"),
    ("post", "/console/login"),
    ("post", "/console/logout"),
    ("get", "/console/assets/{*path}"),
];

#[derive(Clone)]
pub struct ConsoleState {
    pool: sqlx::PgPool,
    upstream: Arc<ConsoleConfig>,
    http: reqwest::Client,
    auth: Arc<crate::infra::auth::Auth>,
    overview: tokio::sync::watch::Receiver<Arc<overview::Snapshot>>,
    clock: Arc<dyn crate::envelope::Clock>,
}

pub async fn run(ctx: ServiceContext<ConsoleConfig>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let upstream = Arc::new(ctx.config);
    let overview = overview::spawn_sampler(
        ctx.db.clone(),
        http.clone(),
        upstream.clone(),
        &ctx.jobs,
        ctx.shutdown.clone(),
    );
    let state = ConsoleState {
        pool: ctx.db,
        upstream,
        http,
        auth: ctx.auth.clone(),
        overview,
        clock: ctx.clock.clone(),
    };
    let console = Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::overview))
        .route("/console/live/overview", get(overview::live))
        .route("/console/devices", get(pages::devices))
        .route("/console/devices/{device_id}", get(pages::device))
        .route("/console/devices/{device_id}/series", get(pages::series))
        .route("/console/anomalies", get(feeds::anomalies_page))
        .route("/console/live/anomalies", get(feeds::live_anomalies))
        .route("/console/tail", get(feeds::tail_page))
        .route("/console/live/tail", get(feeds::live_tail))
        .route("/console/webhooks", get(webhooks::page))
        .route(
            "/console/webhooks/rules/{rule_id}/{action}",
            post(webhooks::rule_action),
        )
        .route(
            "/console/webhooks/deliveries/{delivery_id}/retry",
            post(webhooks::retry),
        )
        .route("/console/dead-letters", get(pages::dead_letters))
        .route(
            "/console/dead-letters/{consumer}/{dlq_id}/{action}",
            post(pages::dead_letter_action),
        )
        .route("/console/docs", get(pages::docs))
        .route("/console/docs/{doc}", get(assets::openapi))
        .route(
            "/console/login",
            get(session::login_form).post(session::login),
        )
        .route("/console/logout", post(session::logout))
        .route("/console/assets/{*path}", get(assets::serve))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session::middleware,
        ));
    let router = Router::new()
        .merge(console)
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/health", get(health))
        .route("/readyz", get(health))
        .route("/livez", get(crate::infra::http::livez))
        .merge(metrics_router())
        .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
        .fallback(not_found)
        .with_state(state);
    let listener = ctx
        .listener
        .ok_or_else(|| anyhow::anyhow!("the console needs its own port"))?;
    let served = serve(
        "console",
        listener,
        router,
        ctx.shutdown,
        ctx.common.http,
        ctx.common.shutdown_timeout,
    )
    .await;
    ctx.jobs.drain().await;
    served
}

async fn health(State(s): State<ConsoleState>) -> Response {
    health_response(vec![(
        "database",
        Check::from_ping(db::ping(&s.pool).await),
    )])
    .into_response()
}
