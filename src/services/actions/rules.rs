//! Rules: their JSON form, validation (every problem reported at once, by field), the event
//! type pattern, webhook secrets, and their table.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use regex::Regex;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::condition::Condition;
use crate::envelope::FieldError;

use crate::infra::webhook_signature::SECRET_PREFIX;
/// Headers the platform sets itself: a rule cannot override the signature or the framing.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    crate::envelope::trace::HEADER,
];
const MAX_TIMEOUT_S: f64 = 300.0;
const MAX_URL_LEN: usize = 2048;
const MAX_DEDUP_S: f64 = 7.0 * 86_400.0;

static PATTERN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(\*|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\.\*|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+)$",
    )
    .expect("pattern regex")
});

/// How much of a rule an answer shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The answer to its creation: everything, the secret included.
    Created,
    /// Reads: no secret, header values redacted.
    Read,
    /// The document a merge patch applies to (never sent to a client).
    Editable,
}

/// A stored rule.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Rule {
    pub rule_id: Uuid,
    pub name: String,
    pub event_type: String,
    pub condition: Option<Value>,
    pub webhook_url: String,
    pub webhook_secret: String,
    pub webhook_headers: Value,
    pub timeout_ms: Option<i32>,
    pub dedup_window_ms: Option<i64>,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the platform disabled the rule itself (the receiver answered 410 Gone).
    pub disabled_reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// The secret before the last rotation: it signs too until it expires.
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

impl Rule {
    /// The rule as the API shows it. The secret appears only in the answer to the request that
    /// created it (Svix-style: shown once); header values (often credentials) only there too —
    /// reads show their names with `***`.
    pub fn to_json(&self, view: View) -> Value {
        let headers = match view {
            View::Read => Value::Object(
                self.headers()
                    .into_keys()
                    .map(|k| (k, json!("***")))
                    .collect(),
            ),
            View::Created | View::Editable => self.webhook_headers.clone(),
        };
        let mut webhook = json!({
            "url": self.webhook_url,
            "headers": headers,
            "timeout_s": self.timeout_ms.map(|ms| f64::from(ms) / 1000.0),
        });
        if view == View::Created {
            webhook["secret"] = json!(self.webhook_secret);
        }
        if view != View::Editable {
            webhook["previous_secret_expires_at"] = json!(
                self.previous_secret_expires_at
                    .as_ref()
                    .map(crate::envelope::format_time)
            );
        }
        let mut doc = json!({
            "rule_id": self.rule_id,
            "name": self.name,
            "event_type": self.event_type,
            "condition": self.condition,
            "webhook": webhook,
            "enabled": self.enabled,
            "dedup_window_s": self.dedup_window_ms.map(|ms| ms as f64 / 1000.0),
            "created_at": crate::envelope::format_time(&self.created_at),
            "updated_at": crate::envelope::format_time(&self.updated_at),
        });
        if view != View::Editable {
            doc["disabled_reason"] = json!(self.disabled_reason);
            doc["disabled_at"] = json!(self.disabled_at.as_ref().map(crate::envelope::format_time));
        }
        doc
    }

    /// The keys that sign a call made at `now`: the current secret's, then the previous one's
    /// while its overlap lasts (Standard Webhooks: one signature per key, space separated, any
    /// one verifies — so receivers can switch secrets without a gap).
    pub fn signing_keys(&self, now: DateTime<Utc>) -> Option<Vec<Vec<u8>>> {
        let mut keys = vec![secret_key(&self.webhook_secret)?];
        if let (Some(prev), Some(until)) = (&self.previous_secret, self.previous_secret_expires_at)
            && until > now
            && let Some(k) = secret_key(prev)
        {
            keys.push(k);
        }
        Some(keys)
    }

    /// Whether the rule fires for this event (pattern and condition); `envelope` is the JSON
    /// of the event.
    pub fn matches(
        &self,
        event_type: &str,
        envelope: &Value,
        condition: Option<&Condition>,
    ) -> bool {
        self.enabled
            && pattern_matches(&self.event_type, event_type)
            && condition.is_none_or(|c| c.matches(envelope))
    }

    pub fn headers(&self) -> BTreeMap<String, String> {
        self.webhook_headers
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `*`, `prefix.*` (every type under the prefix) or an exact type.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => true,
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => pattern == event_type,
    }
}

/// A validated rule, ready to store.
#[derive(Debug, Clone)]
pub struct RuleInput {
    pub name: String,
    pub event_type: String,
    pub condition: Option<Value>,
    pub webhook_url: String,
    /// `None`: keep the stored secret (update) or generate one (create).
    pub webhook_secret: Option<String>,
    pub webhook_headers: Value,
    pub timeout_ms: Option<i32>,
    pub dedup_window_ms: Option<i64>,
    pub enabled: bool,
}

fn fe(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.into(),
        message: message.into(),
    });
}

fn seconds(
    v: Option<&Value>,
    field: &str,
    min_exclusive_zero: bool,
    max: f64,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s)
                if s.is_finite() && s <= max && (s > 0.0 || (!min_exclusive_zero && s == 0.0)) =>
            {
                Some((s * 1000.0).round() as i64)
            }
            _ => {
                let lower = if min_exclusive_zero {
                    "more than 0"
                } else {
                    "0 or more"
                };
                fe(
                    errors,
                    field,
                    format!("must be {lower} and at most {max} seconds"),
                );
                None
            }
        },
        Some(_) => {
            fe(errors, field, "must be a number of seconds");
            None
        }
    }
}

/// Checks a rule document; every problem is reported, each with its field.
pub fn validate(body: &Value) -> Result<RuleInput, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError {
            field: "body".into(),
            message: "must be a JSON object".into(),
        }]);
    };
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "name"
                | "event_type"
                | "condition"
                | "webhook"
                | "enabled"
                | "dedup_window_s"
                | "rule_id"
                | "created_at"
                | "updated_at"
                // Read-only: shown by reads, so a read document can be sent back as is.
                | "disabled_reason"
                | "disabled_at"
        ) {
            fe(&mut errors, k.as_str(), "unknown field");
        }
    }
    let name = match obj.get("name").and_then(Value::as_str).map(str::trim) {
        Some(n) if !n.is_empty() && n.chars().count() <= 200 => n.to_string(),
        Some(_) => {
            fe(&mut errors, "name", "must be 1 to 200 characters");
            String::new()
        }
        None => {
            fe(&mut errors, "name", "required: a string");
            String::new()
        }
    };
    let event_type = match obj.get("event_type").and_then(Value::as_str) {
        Some(t) if t.len() <= 128 && PATTERN.is_match(t) => t.to_string(),
        _ => {
            fe(
                &mut errors,
                "event_type",
                "required: an event type (system.alert), a prefix pattern (system.*) or *",
            );
            String::new()
        }
    };
    let condition = match obj.get("condition") {
        None | Some(Value::Null) => None,
        Some(c) => match Condition::parse(c) {
            Ok(_) => Some(c.clone()),
            Err(es) => {
                errors.extend(es);
                None
            }
        },
    };
    let enabled = match obj.get("enabled") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            fe(&mut errors, "enabled", "must be true or false");
            true
        }
    };
    let dedup_window_ms = seconds(
        obj.get("dedup_window_s"),
        "dedup_window_s",
        false,
        MAX_DEDUP_S,
        &mut errors,
    );

    let empty = Map::new();
    let webhook = match obj.get("webhook") {
        Some(Value::Object(w)) => w,
        _ => {
            fe(
                &mut errors,
                "webhook",
                "required: {\"url\": ..., \"secret\"?, \"headers\"?, \"timeout_s\"?}",
            );
            &empty
        }
    };
    for k in webhook.keys() {
        if !matches!(
            k.as_str(),
            "url" | "secret" | "headers" | "timeout_s" | "previous_secret_expires_at"
        ) {
            fe(&mut errors, format!("webhook.{k}"), "unknown field");
        }
    }
    let webhook_url = match webhook.get("url").and_then(Value::as_str) {
        Some(u) => match reqwest::Url::parse(u) {
            Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                fe(
                    &mut errors,
                    "webhook.url",
                    format!(
                        "scheme '{}' is not allowed: use http or https",
                        url.scheme()
                    ),
                );
                String::new()
            }
            Ok(url) if url.host_str().is_none_or(str::is_empty) => {
                fe(&mut errors, "webhook.url", "must name a host");
                String::new()
            }
            // The stored (percent-encoded) form is what must fit: it keys the endpoint's
            // breaker row, and a btree key cannot exceed about 2700 bytes.
            Ok(url) if url.as_str().len() > MAX_URL_LEN => {
                fe(
                    &mut errors,
                    "webhook.url",
                    format!("must be at most {MAX_URL_LEN} characters once percent-encoded"),
                );
                String::new()
            }
            Ok(url) => url.to_string(),
            Err(e) => {
                fe(&mut errors, "webhook.url", format!("not a URL: {e}"));
                String::new()
            }
        },
        None if !webhook.is_empty() || obj.contains_key("webhook") => {
            fe(&mut errors, "webhook.url", "required: an http or https URL");
            String::new()
        }
        None => String::new(),
    };
    let webhook_secret = match webhook.get("secret") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if secret_key(s).is_some() => Some(s.clone()),
        Some(_) => {
            fe(
                &mut errors,
                "webhook.secret",
                "must be whsec_ followed by the base64 of 24 to 64 key bytes (omit it to have one generated)",
            );
            None
        }
    };
    let webhook_headers = match webhook.get("headers") {
        None | Some(Value::Null) => json!({}),
        Some(Value::Object(h)) => {
            if h.len() > 20 {
                fe(&mut errors, "webhook.headers", "at most 20 headers");
            }
            for (k, v) in h {
                let field = format!("webhook.headers.{k}");
                if axum::http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    fe(&mut errors, field, "not a valid header name");
                } else if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                    fe(
                        &mut errors,
                        field,
                        "set by the platform; cannot be overridden",
                    );
                } else if v
                    .as_str()
                    .is_none_or(|s| axum::http::HeaderValue::from_str(s).is_err())
                {
                    fe(&mut errors, field, "must be a string of visible ASCII");
                }
            }
            Value::Object(h.clone())
        }
        Some(_) => {
            fe(
                &mut errors,
                "webhook.headers",
                "must be an object of header names to strings",
            );
            json!({})
        }
    };
    let timeout_ms = seconds(
        webhook.get("timeout_s"),
        "webhook.timeout_s",
        true,
        MAX_TIMEOUT_S,
        &mut errors,
    )
    .map(|ms| ms.max(1) as i32);

    if errors.is_empty() {
        Ok(RuleInput {
            name,
            event_type,
            condition,
            webhook_url,
            webhook_secret,
            webhook_headers,
            timeout_ms,
            dedup_window_ms,
            enabled,
        })
    } else {
        Err(errors)
    }
}

/// The key bytes of a `whsec_` secret, when it is one.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    secret
        .parse::<crate::infra::webhook_signature::Secret>()
        .ok()
        .map(|s| s.key().to_vec())
}

/// A new secret: 32 random bytes.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

const COLUMNS: &str = "rule_id, name, event_type, condition, webhook_url, webhook_secret,
    webhook_headers, timeout_ms, dedup_window_ms, enabled, created_at, updated_at,
    disabled_reason, disabled_at, previous_secret, previous_secret_expires_at";
const INSERT_COLUMNS: &str = "rule_id, name, event_type, condition, webhook_url, webhook_secret,
    webhook_headers, timeout_ms, dedup_window_ms, enabled, created_at, updated_at";

pub async fn insert(pool: &PgPool, r: RuleInput) -> Result<Rule, sqlx::Error> {
    let secret = r.webhook_secret.unwrap_or_else(generate_secret);
    sqlx::query_as(&format!(
        "INSERT INTO actions.rules ({INSERT_COLUMNS})
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now(), now())
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(&r.name)
    .bind(&r.event_type)
    .bind(&r.condition)
    .bind(&r.webhook_url)
    .bind(&secret)
    .bind(&r.webhook_headers)
    .bind(r.timeout_ms)
    .bind(r.dedup_window_ms)
    .bind(r.enabled)
    .fetch_one(pool)
    .await
}

/// Replaces a rule's fields; a `None` secret keeps the stored one. A new secret given this way
/// takes over at once (no overlap: that is what rotation is for); enabling the rule clears why
/// the platform had disabled it.
pub async fn update(pool: &PgPool, id: Uuid, r: RuleInput) -> Result<Option<Rule>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE actions.rules SET name = $2, event_type = $3, condition = $4, webhook_url = $5,
             webhook_secret = COALESCE($6, webhook_secret), webhook_headers = $7, timeout_ms = $8,
             dedup_window_ms = $9, enabled = $10, updated_at = now(),
             previous_secret = CASE WHEN $6 IS NULL OR $6 = webhook_secret
                                    THEN previous_secret END,
             previous_secret_expires_at = CASE WHEN $6 IS NULL OR $6 = webhook_secret
                                               THEN previous_secret_expires_at END,
             disabled_reason = CASE WHEN $10 THEN NULL ELSE disabled_reason END,
             disabled_at = CASE WHEN $10 THEN NULL ELSE disabled_at END
         WHERE rule_id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&r.name)
    .bind(&r.event_type)
    .bind(&r.condition)
    .bind(&r.webhook_url)
    .bind(&r.webhook_secret)
    .bind(&r.webhook_headers)
    .bind(r.timeout_ms)
    .bind(r.dedup_window_ms)
    .bind(r.enabled)
    .fetch_optional(pool)
    .await
}

/// Rotates a rule's secret: `new` (or a generated one) signs from now on, the current one
/// keeps signing alongside it for `grace`. Answers the rule with its new secret.
pub async fn rotate_secret(
    pool: &PgPool,
    id: Uuid,
    new: Option<String>,
    grace: std::time::Duration,
) -> Result<Option<Rule>, sqlx::Error> {
    let secret = new.unwrap_or_else(generate_secret);
    sqlx::query_as(&format!(
        "UPDATE actions.rules
         SET previous_secret = webhook_secret, webhook_secret = $2,
             previous_secret_expires_at = now() + make_interval(secs => $3), updated_at = now()
         WHERE rule_id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&secret)
    .bind(grace.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// The receiver said the endpoint is gone for good (410): the rule stops firing, saying why,
/// until someone enables it again.
pub async fn disable_gone(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE actions.rules
         SET enabled = false, disabled_reason = $2, disabled_at = now(), updated_at = now()
         WHERE rule_id = $1 AND enabled",
    )
    .bind(id)
    .bind(reason)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<Rule>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM actions.rules WHERE rule_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn list(pool: &PgPool, limit: i64, offset: i64) -> Result<(Vec<Rule>, i64), sqlx::Error> {
    let rules = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM actions.rules ORDER BY rule_id LIMIT $1 OFFSET $2"
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM actions.rules")
        .fetch_one(pool)
        .await?;
    Ok((rules, total))
}

pub async fn enabled(pool: &PgPool) -> Result<Vec<Rule>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM actions.rules WHERE enabled ORDER BY rule_id"
    ))
    .fetch_all(pool)
    .await
}

pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM actions.rules WHERE rule_id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Value {
        json!({"name": "alerts", "event_type": "system.*",
               "webhook": {"url": "http://127.0.0.1:9/hook"}})
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "a.b"));
        assert!(pattern_matches("system.*", "system.alert"));
        assert!(pattern_matches("system.*", "system.disk.full"));
        assert!(!pattern_matches("system.*", "systems.alert"));
        assert!(!pattern_matches("system.*", "system"));
        assert!(pattern_matches("ai.anomaly", "ai.anomaly"));
        assert!(!pattern_matches("ai.anomaly", "ai.anomaly2"));
    }

    #[test]
    fn a_minimal_rule_is_valid_and_defaults_apply() {
        let r = validate(&valid()).unwrap();
        assert!(r.enabled);
        assert_eq!(r.webhook_secret, None);
        assert_eq!(r.timeout_ms, None);
        assert_eq!(r.dedup_window_ms, None);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let e = validate(&json!({"name": "", "event_type": "System", "colour": "red",
            "enabled": "yes", "dedup_window_s": -1,
            "webhook": {"url": "ftp://x/y", "secret": "abc", "timeout_s": 0,
                        "headers": {"webhook-signature": "x", "bad name": "v"}, "retries": 3},
            "condition": {"path": "payload.x", "op": "like", "value": 1}}))
        .unwrap_err();
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "name",
            "event_type",
            "colour",
            "enabled",
            "dedup_window_s",
            "webhook.url",
            "webhook.secret",
            "webhook.timeout_s",
            "webhook.headers.webhook-signature",
            "webhook.headers.bad name",
            "webhook.retries",
            "condition.op",
        ] {
            assert!(fields.contains(&f), "{f} missing in {fields:?}");
        }
    }

    #[test]
    fn secrets_follow_standard_webhooks() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_"));
        assert_eq!(secret_key(&s).unwrap().len(), 32);
        assert!(secret_key("whsec_c2hvcnQ=").is_none());
        assert!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        // The example secret of the Standard Webhooks specification.
        assert!(secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_some());
    }
}
