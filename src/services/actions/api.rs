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
        post "/api/v1/actions/rules/{rule_id}/rotate-secret" => rotate_secret;
        post "/api/v1/actions/rules/{rule_id}/test" => test_rule;
        get "/api/v1/actions/deliveries" => list_deliveries;
        get "/api/v1/actions/deliveries/{delivery_id}" => get_delivery;
        get "/api/v1/actions/deliveries/{delivery_id}/attempts" => list_attempts;
        post "/api/v1/actions/deliveries/{delivery_id}/retry" => retry_delivery;
        post "/api/v1/actions/recover" => recover;
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

/// Sends a finished, unsuccessful delivery again with a fresh retry schedule (an operator's
/// "resend" after fixing the receiver).
/// The event type of a test delivery; with `metadata.source = "platform"` and the rule's id as
/// its aggregate, a receiver can tell a test from a real event.
pub const TEST_EVENT_TYPE: &str = "webhook.test";

/// `POST /api/v1/actions/rules/{rule_id}/test`: a delivery of a `webhook.test` envelope to the
/// rule's URL, recorded like any other, so it goes through the same worker, signature, retries
/// and breaker, and shows in the deliveries with its attempts. The rule's event type and
/// condition are not consulted: it tests the receiver, not the match. A disabled rule is a 409:
/// the worker cancels every delivery of a disabled rule, a test one too.
async fn test_rule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    let rule = rules::get(&s.pool, id)
        .await?
        .ok_or_else(|| rule_not_found(id))?;
    if !rule.enabled {
        return Err(ActionsError::Conflict(format!(
            "rule {id} is disabled: its deliveries are cancelled; enable it to test it"
        )));
    }
    let now = crate::envelope::truncate_micros(s.clock.now());
    let mut payload = serde_json::Map::new();
    payload.insert("rule_id".into(), json!(rule.rule_id));
    payload.insert("rule_name".into(), json!(rule.name));
    payload.insert(
        "message".into(),
        json!("A test delivery: the platform sent it on request, no event caused it."),
    );
    let envelope = crate::envelope::Envelope {
        event_id: Uuid::now_v7(),
        event_type: TEST_EVENT_TYPE.into(),
        aggregate_id: rule.rule_id.to_string(),
        event_time: now,
        ingested_at: now,
        payload,
        metadata: crate::envelope::Metadata {
            source: crate::envelope::Source::Platform,
            traceparent: None,
            schema_version: crate::envelope::SCHEMA_VERSION,
            subject: None,
        },
    };
    let delivery_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO actions.deliveries
            (delivery_id, rule_id, event_id, event_type, aggregate_id, event_at, endpoint, body,
             status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending')",
    )
    .bind(delivery_id)
    .bind(rule.rule_id)
    .bind(envelope.event_id)
    .bind(&envelope.event_type)
    .bind(&envelope.aggregate_id)
    .bind(now)
    .bind(&rule.webhook_url)
    .bind(envelope.to_json())
    .execute(&s.pool)
    .await?;
    s.wake.notify_one();
    tracing::info!(rule_id = %rule.rule_id, %delivery_id, "Test delivery recorded.");
    Ok((
        StatusCode::ACCEPTED,
        [(
            header::LOCATION,
            format!("/api/v1/actions/deliveries/{delivery_id}"),
        )],
        Json(json!({
            "delivery_id": delivery_id,
            "event_id": envelope.event_id,
            "event_type": TEST_EVENT_TYPE,
            "status": DeliveryStatus::Pending,
        })),
    )
        .into_response())
}

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
         SET status = 'pending', round_start = attempts, claim_token = NULL,
             next_attempt_at = now(), updated_at = now()
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

/// The longest overlap a rotation may give the previous secret.
const MAX_GRACE_S: f64 = 30.0 * 86_400.0;
/// The overlap when none is asked for: a day, for receivers deployed once a day.
const DEFAULT_GRACE_S: f64 = 86_400.0;

/// Rotates a rule's secret: the new one (given or generated) signs from now on and the old one
/// keeps signing alongside it for the grace period, so receivers can switch without a failed
/// call. Answers the new secret, once.
async fn rotate_secret(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ActionsError> {
    let id = uuid_param("rule_id", &id)?;
    let empty = matches!(&body, Ok(b) if b.is_empty());
    let doc = if empty {
        json!({})
    } else {
        json_body(&headers, body)?
    };
    let mut errors = Vec::new();
    let Some(obj) = doc.as_object() else {
        return Err(ActionsError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    };
    for k in obj.keys() {
        if !matches!(k.as_str(), "secret" | "grace_s") {
            errors.push(FieldError {
                field: k.clone(),
                message: "unknown field".into(),
            });
        }
    }
    let secret = match obj.get("secret") {
        None | Some(Value::Null) => None,
        Some(Value::String(v)) if rules::secret_key(v).is_some() => Some(v.clone()),
        Some(_) => {
            errors.push(FieldError {
                field: "secret".into(),
                message: "must be whsec_ followed by the base64 of 24 to 64 bytes".into(),
            });
            None
        }
    };
    let grace = match obj.get("grace_s") {
        None | Some(Value::Null) => DEFAULT_GRACE_S,
        Some(v) => match v.as_f64() {
            Some(g) if (0.0..=MAX_GRACE_S).contains(&g) => g,
            _ => {
                errors.push(FieldError {
                    field: "grace_s".into(),
                    message: format!("must be a number of seconds from 0 to {MAX_GRACE_S}"),
                });
                0.0
            }
        },
    };
    if !errors.is_empty() {
        return Err(ActionsError::InvalidRequest(errors));
    }
    let rule = rules::rotate_secret(
        &s.pool,
        id,
        secret,
        std::time::Duration::from_secs_f64(grace),
    )
    .await?
    .ok_or_else(|| rule_not_found(id))?;
    tracing::info!(rule_id = %id, grace_s = grace, "Rule secret rotated.");
    Ok(Json(rule.to_json(View::Created)))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Attempt {
    attempt: i32,
    #[serde(serialize_with = "ser_time")]
    started_at: DateTime<Utc>,
    duration_ms: i32,
    status_code: Option<i32>,
    response_excerpt: Option<String>,
    error: Option<String>,
    retry_after_s: Option<f64>,
}

/// Every call made for a delivery, oldest first: when, how long, what the receiver answered
/// (a bounded, redacted excerpt) or why there was no answer.
async fn list_attempts(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ActionsError> {
    let id = uuid_param("delivery_id", &id)?;
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM actions.deliveries WHERE delivery_id = $1")
            .bind(id)
            .fetch_optional(&s.pool)
            .await?;
    if exists.is_none() {
        return Err(ActionsError::NotFound(format!("no delivery with id {id}")));
    }
    let rows: Vec<Attempt> = sqlx::query_as(
        "SELECT attempt, started_at, duration_ms, status_code, response_excerpt, error,
                retry_after_s
         FROM actions.attempts WHERE delivery_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&s.pool)
    .await?;
    Ok(Json(json!({ "delivery_id": id, "attempts": rows })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverBody {
    since: String,
    #[serde(default)]
    rule_id: Option<String>,
}

/// Sends again every `failed` or `circuit_open` delivery recorded since a time (of one rule, or
/// of all): the way back after a receiver's long outage. Twice is the same as once.
async fn recover(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ActionsError> {
    let doc = json_body(&headers, body)?;
    let b: RecoverBody = serde_json::from_value(doc).map_err(|e| {
        ActionsError::BadRequest(format!("the body is not a recovery request: {e}"))
    })?;
    let mut errors = Vec::new();
    let since = match DateTime::parse_from_rfc3339(&b.since) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            errors.push(FieldError {
                field: "since".into(),
                message: "must be an RFC 3339 time".into(),
            });
            None
        }
    };
    let rule = match b.rule_id.as_deref().map(Uuid::parse_str) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            errors.push(FieldError {
                field: "rule_id".into(),
                message: "must be a UUID".into(),
            });
            None
        }
    };
    let Some(since) = since.filter(|_| errors.is_empty()) else {
        return Err(ActionsError::InvalidRequest(errors));
    };
    let requeued = super::recover::recover(&s.pool, since, rule).await?;
    if requeued > 0 {
        s.wake.notify_one();
    }
    Ok(Json(json!({
        "requeued": requeued,
        "since": format_time(&since),
        "rule_id": rule,
    })))
}
