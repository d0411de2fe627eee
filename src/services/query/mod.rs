//! Query (port 8081): reads the read-side schemas through `CJ_QUERY_DATABASE_URL`. Owns no tables.

mod api;
mod error;
mod timeseries;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

/// Every route the query service serves, for the OpenAPI agreement test.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    api::ROUTES
        .iter()
        .chain(timeseries::ROUTES)
        .copied()
        .collect()
}

/// Reads only: GET (and HEAD) need the scope, other methods are opened by none.
pub const SCOPES: &[ScopeRule] = &[
    ScopeRule {
        prefix: "/api/v1/query",
        methods: &["GET", "HEAD"],
        scope: SCOPE_QUERY,
    },
    ScopeRule {
        prefix: "/api/v1/projections",
        methods: &["GET", "HEAD"],
        scope: SCOPE_QUERY,
    },
];

use super::ServiceContext;
use crate::infra::auth::{SCOPE_QUERY, ScopeRule};
use crate::infra::db;
use crate::infra::http::{Check, health_response, metrics_router, not_found, serve};

#[derive(Clone)]
pub struct QueryState {
    pool: sqlx::PgPool,
    /// "Now" for windows a request leaves open.
    clock: std::sync::Arc<dyn crate::envelope::Clock>,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let state = QueryState {
        pool: ctx.db,
        clock: ctx.clock.clone(),
    };
    let limit = crate::infra::http::ClientLimit::new(
        ctx.common.api_limit.per_second,
        ctx.common.api_limit.burst,
        &ctx.common.api_limit.trusted_proxies,
        &ctx.jobs,
    );
    let api = api::router()
        .merge(timeseries::router())
        .method_not_allowed_fallback(crate::infra::extract::method_not_allowed);
    let api = crate::infra::http::limited(api, limit);
    let router = Router::new()
        .merge(api)
        .route("/health", get(health))
        // Kubernetes-style probes: readiness is /health's deep check, liveness none.
        .route("/readyz", get(health))
        .route("/livez", get(crate::infra::http::livez))
        .merge(metrics_router())
        .method_not_allowed_fallback(crate::infra::extract::method_not_allowed)
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            crate::infra::auth::middleware,
        ));
    let listener = ctx
        .listener
        .ok_or_else(|| anyhow::anyhow!("query needs its own port"))?;
    let served = serve(
        "query",
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

async fn health(State(s): State<QueryState>) -> Response {
    health_response(vec![(
        "database",
        Check::from_ping(db::ping(&s.pool).await),
    )])
}
