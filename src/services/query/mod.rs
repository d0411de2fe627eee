//! Query (port 8081): reads the read-side schemas through `CJ_QUERY_DATABASE_URL`. Owns no tables.

mod api;
mod error;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;

pub use api::ROUTES;

use super::ServiceContext;
use crate::infra::db;
use crate::infra::http::{Check, health_response, metrics_router, not_found, serve};

#[derive(Clone)]
pub struct QueryState {
    pool: sqlx::PgPool,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let state = QueryState { pool: ctx.db };
    let router = Router::new()
        .merge(api::router())
        .route("/health", get(health))
        .merge(metrics_router())
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            crate::infra::auth::middleware,
        ));
    let listener = ctx
        .listener
        .ok_or_else(|| anyhow::anyhow!("query needs its own port"))?;
    serve(
        "query",
        listener,
        router,
        ctx.shutdown,
        ctx.config.shutdown_timeout,
    )
    .await
}

async fn health(State(s): State<QueryState>) -> Response {
    health_response(vec![(
        "database",
        Check::from_ping(db::ping(&s.pool).await),
    )])
}
