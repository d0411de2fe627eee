//! The action API on :8082 (SPEC §10): rules CRUD and the read side of deliveries and
//! endpoints.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::ApiState;
use super::error::ActionsError;
use super::rules::{self, View};
use super::status::{BreakerState, DeliveryStatus};
use crate::envelope::{FieldError, format_time};
use crate::infra::extract::query::Int;
use crate::infra::extract::{NUL_REFUSED, Path, Query, json_nul};

crate::infra::http::routes! {
    /// Every route this module serves, for the OpenAPI agreement test.
    pub const ROUTES;
    pub fn router() -> Router<ApiState> {
        post "/api/v1/actions/rules" => create_rule;
        get "/api/v1/actions/rules" => list_rules;
        get "/api/v1/actions/rules/{rule_id}" => get_rule;
        put "/api/v1/actions/rules/{rule_id}" => replace_rule;
        patch "/api/v1/actions/rules/{rule_id}" => patch_rule;
        delete "/api/v1/actions/rules/{rule_id}" => delete_rule;
        get "/api/v1/actions/deliveries" => list_deliveries;
        get "/api/v1/actions/deliveries/{delivery_id}" => get_delivery;
        post "/api/v1/actions/deliveries/{delivery_id}/retry" => retry_delivery;
        get "/api/v1/actions/endpoints" => list_endpoints;
    }
}

/// The largest rule document accepted.
pub const MAX_BODY: usize = 64 * 1024;

type Body = Result<Bytes, BytesRejection>;

fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, ActionsError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            ActionsError::TooLarge(MAX_BODY)
        }
        other => ActionsError::BadRequest(other.body_text()),
    })?;
    if !crate::infra::http::is_json(headers) {
        return Err(ActionsError::UnsupportedMediaType);
    }
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|e| ActionsError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    // Rules are stored as text and jsonb, which refuse a NUL anywhere in them.
    match json_nul(&doc) {
        Some(field) => Err(ActionsError::Invalid(vec![FieldError {
            field,
            message: NUL_REFUSED.into(),
        }])),
        None => Ok(doc),
    }
}

fn uuid_param(name: &str, v: &str) -> Result<Uuid, ActionsError> {
    Uuid::parse_str(v).map_err(|_| ActionsError::BadRequest(format!("{name} must be a UUID")))
}

/// A UUID in a query parameter.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct Id(Uuid);

impl TryFrom<String> for Id {
    type Error = &'static str;

    fn try_from(v: String) -> Result<Self, &'static str> {
        Uuid::parse_str(&v).map(Id).map_err(|_| "must be a UUID")
    }
}

fn rule_not_found(id: Uuid) -> ActionsError {
    ActionsError::NotFound(format!("no rule with id {id}"))
}

async fn create_rule(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ActionsError> {
    let input = rules::validate(&json_body(&headers, body)?).map_err(ActionsError::Invalid)?;
    let rule = rules::insert(&s.pool, input).await?;
    tracing::info!(rule_id = %rule.rule_id, name = %rule.name, "Rule created.");
    let location = format!("/api/v1/actions/rules/{}", rule.rule_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(rule.to_json(View::Created)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesParams {
    #[serde(default)]
    limit: Int<1, 500, 50>,
    #[serde(default)]
    offset: Int<0, { i64::MAX }, 0>,
}

async fn list_rules(
    State(s): State<ApiState>,
    Query(q): Query<RulesParams>,
) -> Result<Json<Value>, ActionsError> {
    let (Int(limit), Int(offset)) = (q.limit, q.offset);
    let (rules, total) = rules::list(&s.pool, limit, offset).await?;
    Ok(Json(json!({
        "rules": rules.iter().map(|r| r.to_json(View::Read)).collect::<Vec<_>>(),
        "total": total, "limit": limit, "offset": offset,
    })))
}

async fn get_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    let rule = rules::get(&s.pool, id)
        .await?
        .ok_or_else(|| rule_not_found(id))?;
    Ok(Json(rule.to_json(View::Read)))
}

async fn replace_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    let input = rules::validate(&json_body(&headers, body)?).map_err(ActionsError::Invalid)?;
    let rule = rules::update(&s.pool, id, input)
        .await?
        .ok_or_else(|| rule_not_found(id))?;
    Ok(Json(rule.to_json(View::Read)))
}

/// JSON merge patch (RFC 7396) on the rule's document; the result is validated as a whole.
async fn patch_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    let patch = json_body(&headers, body)?;
    if !patch.is_object() {
        return Err(ActionsError::BadRequest(
            "a patch must be a JSON object".into(),
        ));
    }
    let current = rules::get(&s.pool, id)
        .await?
        .ok_or_else(|| rule_not_found(id))?;
    let mut doc = current.to_json(View::Editable);
    merge(&mut doc, &patch);
    let input = rules::validate(&doc).map_err(ActionsError::Invalid)?;
    let rule = rules::update(&s.pool, id, input)
        .await?
        .ok_or_else(|| rule_not_found(id))?;
    Ok(Json(rule.to_json(View::Read)))
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn delete_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    if rules::delete(&s.pool, id).await? {
        tracing::info!(rule_id = %id, "Rule deleted.");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(rule_not_found(id))
    }
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Delivery {
    delivery_id: Uuid,
    rule_id: Uuid,
    event_id: Uuid,
    event_type: String,
    aggregate_id: String,
    endpoint: String,
    status: DeliveryStatus,
    attempts: i32,
    #[serde(serialize_with = "ser_time")]
    next_attempt_at: DateTime<Utc>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    #[serde(serialize_with = "ser_time")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_time")]
    updated_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_opt_time")]
    delivered_at: Option<DateTime<Utc>>,
}

fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

const DELIVERY_COLUMNS: &str = "delivery_id, rule_id, event_id, event_type, aggregate_id, endpoint,
    status, attempts, next_attempt_at, last_status_code, last_error, created_at, updated_at,
    delivered_at";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesParams {
    rule_id: Option<Id>,
    status: Option<DeliveryStatus>,
    event_id: Option<Id>,
    #[serde(default)]
    limit: Int<1, 500, 50>,
}

async fn list_deliveries(
    State(s): State<ApiState>,
    Query(q): Query<DeliveriesParams>,
) -> Result<Json<Value>, ActionsError> {
    let rule_id = q.rule_id.map(|Id(id)| id);
    let event_id = q.event_id.map(|Id(id)| id);
    let (status, Int(limit)) = (q.status, q.limit);
    let rows: Vec<Delivery> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM actions.deliveries
         WHERE ($1::uuid IS NULL OR rule_id = $1) AND ($2::text IS NULL OR status = $2)
           AND ($3::uuid IS NULL OR event_id = $3)
         ORDER BY created_at DESC, delivery_id DESC LIMIT $4"
    ))
    .bind(rule_id)
    .bind(status)
    .bind(event_id)
    .bind(limit)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(json!({ "deliveries": rows, "limit": limit })))
}

async fn get_delivery(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Delivery>, ActionsError> {
    let id = uuid_param("delivery_id", &id)?;
    let row: Option<Delivery> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM actions.deliveries WHERE delivery_id = $1"
    ))
    .bind(id)
    .fetch_optional(&s.pool)
    .await?;
    row.map(Json)
        .ok_or_else(|| ActionsError::NotFound(format!("no delivery with id {id}")))
}

/// Sends a finished, unsuccessful delivery again from its first attempt (an operator's
/// "resend" after fixing the receiver).
async fn retry_delivery(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ActionsError> {
    let id = uuid_param("delivery_id", &id)?;
    let status: Option<DeliveryStatus> =
        sqlx::query_scalar("SELECT status FROM actions.deliveries WHERE delivery_id = $1")
            .bind(id)
            .fetch_optional(&s.pool)
            .await?;
    let Some(status) = status else {
        return Err(ActionsError::NotFound(format!("no delivery with id {id}")));
    };
    let r = sqlx::query(
        "UPDATE actions.deliveries
         SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
         WHERE delivery_id = $1 AND status IN ('failed', 'circuit_open', 'cancelled')",
    )
    .bind(id)
    .execute(&s.pool)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ActionsError::Conflict(format!(
            "delivery {id} is {status}; only failed, circuit_open or cancelled deliveries can be retried"
        )));
    }
    s.wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "delivery_id": id, "status": DeliveryStatus::Pending })),
    )
        .into_response())
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Endpoint {
    endpoint: String,
    state: BreakerState,
    consecutive_failures: i32,
    #[serde(serialize_with = "ser_opt_time")]
    opened_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_opt_time")]
    open_until: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_opt_time")]
    last_failure_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_opt_time")]
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

async fn list_endpoints(State(s): State<ApiState>) -> Result<Json<Value>, ActionsError> {
    // An open breaker whose cool-down has passed admits the next call as its trial: shown as
    // half_open, which is what the next delivery will find.
    let rows: Vec<Endpoint> = sqlx::query_as(
        "SELECT endpoint,
                CASE WHEN state = 'open' AND open_until <= now() THEN 'half_open' ELSE state END AS state,
                consecutive_failures, opened_at, open_until, last_failure_at, last_success_at,
                last_error
         FROM actions.endpoint_health ORDER BY endpoint",
    )
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(json!({ "endpoints": rows })))
}
