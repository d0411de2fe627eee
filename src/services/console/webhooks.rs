//! Webhooks: the rules (readable conditions, enable/disable, a test delivery), the deliveries
//! by status with Retry, and each endpoint's circuit breaker. Reads are SQL over the actions
//! schema; every button goes through the actions API (port 8082) with the operator's token.

use askama::Template;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::ConsoleState;
use super::error::ConsoleError;
use super::pages::{Frame, fmt_time, frame, html, missing_is_empty, upstream};
use super::session::Session;

const SERVICE: &str = "the actions API";
/// Deliveries the page lists.
const DELIVERIES: i64 = 100;
pub const STATUSES: [&str; 7] = [
    "pending",
    "delivering",
    "delivered",
    "failed",
    "deduplicated",
    "circuit_open",
    "cancelled",
];

/// A rule's condition as a person reads it: `payload.score > 3 and metadata.source == "mqtt"`.
pub fn readable(c: &Value) -> String {
    fn go(c: &Value, top: bool) -> String {
        let join = |items: &Value, word: &str| {
            let parts: Vec<String> = items
                .as_array()
                .map(|a| a.iter().map(|c| go(c, false)).collect())
                .unwrap_or_default();
            let s = parts.join(&format!(" {word} "));
            if top || parts.len() < 2 {
                s
            } else {
                format!("({s})")
            }
        };
        if c.is_null() {
            return "every event".into();
        }
        if let Some(items) = c.get("all") {
            return join(items, "and");
        }
        if let Some(items) = c.get("any") {
            return join(items, "or");
        }
        if let Some(inner) = c.get("not") {
            return format!("not ({})", go(inner, true));
        }
        let path = c.get("path").and_then(Value::as_str).unwrap_or("?");
        let op = c.get("op").and_then(Value::as_str).unwrap_or("?");
        match (op, c.get("value")) {
            ("exists", _) => format!("{path} exists"),
            (op, Some(v)) => format!("{path} {op} {v}"),
            (op, None) => format!("{path} {op}"),
        }
    }
    go(c, true)
}

pub struct RuleRow {
    pub id: Uuid,
    pub name: String,
    pub event_type: String,
    pub condition: String,
    pub url: String,
    pub enabled: bool,
    pub disabled_reason: String,
}

pub struct DeliveryRow {
    pub id: Uuid,
    pub rule: String,
    pub event_type: String,
    pub aggregate_id: String,
    pub status: String,
    pub attempts: i32,
    pub last: String,
    pub updated: String,
    pub retryable: bool,
}

pub struct BreakerRow {
    pub endpoint: String,
    pub state: String,
    pub failures: i32,
    pub until: String,
    pub last_error: String,
}

#[derive(Template)]
#[template(path = "console/webhooks.html")]
struct WebhooksPage {
    f: Frame,
    rules: Vec<RuleRow>,
    deliveries: Vec<DeliveryRow>,
    breakers: Vec<BreakerRow>,
    status: String,
    statuses: Vec<(&'static str, i64)>,
}

#[derive(Deserialize)]
pub struct WebhooksQuery {
    #[serde(default)]
    status: String,
}

type RuleTuple = (
    Uuid,
    String,
    String,
    Option<Value>,
    String,
    bool,
    Option<String>,
);
type DeliveryTuple = (
    Uuid,
    Option<String>,
    String,
    String,
    String,
    i32,
    Option<i32>,
    Option<String>,
    DateTime<Utc>,
);
type BreakerTuple = (String, String, i32, Option<DateTime<Utc>>, Option<String>);

pub async fn page(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(q): Query<WebhooksQuery>,
) -> Result<Response, ConsoleError> {
    let status = q.status.trim().to_string();
    if !status.is_empty() && !STATUSES.contains(&status.as_str()) {
        return Err(ConsoleError::BadRequest(format!(
            "status {status:?}: expected one of {}",
            STATUSES.join(", ")
        )));
    }
    let rules: Vec<RuleTuple> = sqlx::query_as(
        "SELECT rule_id, name, event_type, condition, webhook_url, enabled, disabled_reason
           FROM actions.rules ORDER BY name, rule_id LIMIT 500",
    )
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM actions.deliveries GROUP BY status")
            .fetch_all(&s.pool)
            .await
            .or_else(missing_is_empty)?;
    let deliveries: Vec<DeliveryTuple> = sqlx::query_as(
        "SELECT d.delivery_id, r.name, d.event_type, d.aggregate_id, d.status, d.attempts,
                d.last_status_code, d.last_error, d.updated_at
           FROM actions.deliveries d LEFT JOIN actions.rules r USING (rule_id)
          WHERE $1 = '' OR d.status = $1
          ORDER BY d.updated_at DESC, d.delivery_id DESC LIMIT $2",
    )
    .bind(&status)
    .bind(DELIVERIES)
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    // As the actions API shows it: an open breaker past its cool-down lets the next call
    // through as a trial.
    let breakers: Vec<BreakerTuple> = sqlx::query_as(
        "SELECT endpoint,
                CASE WHEN state = 'open' AND open_until <= now() THEN 'half_open' ELSE state END,
                consecutive_failures, open_until, last_error
           FROM actions.endpoint_health ORDER BY (state = 'closed'), endpoint LIMIT 200",
    )
    .fetch_all(&s.pool)
    .await
    .or_else(missing_is_empty)?;
    let statuses = STATUSES
        .iter()
        .map(|st| {
            let n = counts
                .iter()
                .find(|(c, _)| c == st)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            (*st, n)
        })
        .collect();
    html(WebhooksPage {
        f: frame(&s, &session, "Webhooks", "webhooks"),
        rules: rules
            .into_iter()
            .map(|(id, name, ty, cond, url, enabled, reason)| RuleRow {
                id,
                name,
                event_type: ty,
                condition: readable(&cond.unwrap_or(Value::Null)),
                url,
                enabled,
                disabled_reason: reason.unwrap_or_default(),
            })
            .collect(),
        deliveries: deliveries
            .into_iter()
            .map(
                |(id, rule, ty, agg, st, attempts, code, error, updated)| DeliveryRow {
                    id,
                    rule: rule.unwrap_or_else(|| "(deleted rule)".into()),
                    event_type: ty,
                    aggregate_id: agg,
                    retryable: matches!(st.as_str(), "failed" | "circuit_open" | "cancelled"),
                    status: st,
                    attempts,
                    last: match (code, error) {
                        (Some(c), Some(e)) => format!("{c}: {e}"),
                        (Some(c), None) => c.to_string(),
                        (None, Some(e)) => e,
                        (None, None) => String::new(),
                    },
                    updated: fmt_time(updated),
                },
            )
            .collect(),
        breakers: breakers
            .into_iter()
            .map(|(endpoint, state, failures, until, error)| BreakerRow {
                endpoint,
                until: match (state.as_str(), until) {
                    ("open", Some(t)) => format!("trial call at {}", fmt_time(t)),
                    ("half_open", _) => "the next call is the trial".into(),
                    _ => String::new(),
                },
                state,
                failures,
                last_error: error.unwrap_or_default(),
            })
            .collect(),
        status,
        statuses,
    })
}

/// A row's new content after an action: the outcome across the row.
fn done(id: Uuid, colspan: u8, message: &str) -> Response {
    Html(format!(
        "<td colspan=\"{colspan}\" class=\"done\">{id}: {}</td>",
        askama::filters::escape(message, askama::filters::Html)
            .map(|e| e.to_string())
            .unwrap_or_default()
    ))
    .into_response()
}

/// `POST /console/webhooks/rules/{id}/{enable|disable|test}`: an HTML fragment for the row's
/// action cell.
pub async fn rule_action(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Path((id, action)): Path<(Uuid, String)>,
) -> Response {
    let base = s.upstream.actions_url.trim_end_matches('/');
    let result = match action.as_str() {
        "enable" | "disable" => upstream(
            &s,
            &session,
            reqwest::Method::PATCH,
            &format!("{base}/api/v1/actions/rules/{id}"),
            Some(json!({"enabled": action == "enable"})),
            SERVICE,
        )
        .await
        .map(|r| {
            if r.get("enabled") == Some(&Value::Bool(true)) {
                "enabled (reload to see it)".to_string()
            } else {
                "disabled (reload to see it)".to_string()
            }
        }),
        "test" => upstream(
            &s,
            &session,
            reqwest::Method::POST,
            &format!("{base}/api/v1/actions/rules/{id}/test"),
            None,
            SERVICE,
        )
        .await
        .map(|r| {
            format!(
                "test delivery {} recorded; it shows below when it has been sent",
                r.get("delivery_id").and_then(Value::as_str).unwrap_or("?")
            )
        }),
        other => Err(ConsoleError::NotFound(format!("no rule action {other:?}"))),
    };
    match result {
        Ok(message) => Html(format!(
            "<small class=\"done\">{}</small>",
            askama::filters::escape(&message, askama::filters::Html)
                .map(|e| e.to_string())
                .unwrap_or_default()
        ))
        .into_response(),
        Err(e) => e.json(),
    }
}

/// `POST /console/webhooks/deliveries/{id}/retry`.
pub async fn retry(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Path(id): Path<Uuid>,
) -> Response {
    let base = s.upstream.actions_url.trim_end_matches('/');
    match upstream(
        &s,
        &session,
        reqwest::Method::POST,
        &format!("{base}/api/v1/actions/deliveries/{id}/retry"),
        None,
        SERVICE,
    )
    .await
    {
        Ok(_) => done(id, 8, "queued again"),
        Err(e) => e.json(),
    }
}

#[cfg(test)]
mod tests {
    use super::readable;
    use serde_json::json;

    #[test]
    fn conditions_read_as_a_person_would_write_them() {
        assert_eq!(readable(&json!(null)), "every event");
        assert_eq!(
            readable(&json!({"path": "payload.score", "op": ">", "value": 3})),
            "payload.score > 3"
        );
        assert_eq!(
            readable(&json!({"all": [
                {"path": "payload.level", "op": "in", "value": ["error", "critical"]},
                {"any": [{"path": "a", "op": "exists"}, {"not": {"path": "b", "op": "==", "value": "x"}}]}
            ]})),
            "payload.level in [\"error\",\"critical\"] and (a exists or not (b == \"x\"))"
        );
    }
}
