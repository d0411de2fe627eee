//! The event envelope (SPEC §5): its type, validation at the boundary, topic routing, and the
//! injectable clock of ADR-0015.
//!
//! Each form of the event has one home:
//! - its JSON (outbox, bus body, webhook body): [`Envelope`], here;
//! - its payloads: [`catalogue`], one typed payload and one check per known event type;
//! - its trace context: [`trace`], the W3C `traceparent`;
//! - its bus message (key, body, headers): `infra::bus::message`;
//! - its stored form: the event store keeps the envelope as columns, and the SQL function
//!   `ingestion.envelope_json` (migrations/ingestion/V8) turns a row back into this JSON. It lives
//!   with the table, not here, because ingestion owns `event_store`: the replay and the bus
//!   recovery are ingestion's, the event handler's rebuild reads the store with ingestion's
//!   database URL and so depends on what ingestion publishes rather than on its columns, and a
//!   Rust copy of the SQL here would teach the domain a service's schema. Derived, not stored:
//!   a second copy of every event would grow the largest table for what an inlined expression
//!   gives.

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

pub mod catalogue;
pub mod trace;

pub const MAX_EVENT_TYPE_LEN: usize = 128;
pub const MAX_AGGREGATE_ID_LEN: usize = 256;
pub const MAX_PAYLOAD_DEPTH: usize = 32;
pub const MAX_FUTURE_SKEW: chrono::Duration = chrono::Duration::minutes(5);
pub const SCHEMA_VERSION: u32 = 1;

static EVENT_TYPE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$").expect("valid regex"));

/// Time as the platform reads it (ADR-0015): injectable so tests are deterministic.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(
        clippy::disallowed_methods,
        reason = "the system clock itself: everything else reads time through a Clock"
    )]
    fn now(&self) -> DateTime<Utc> {
        truncate_micros(Utc::now())
    }
}

/// A clock that stands still unless moved; for tests.
#[derive(Debug, Clone)]
pub struct FixedClock(pub Arc<std::sync::Mutex<DateTime<Utc>>>);

impl FixedClock {
    pub fn at(t: DateTime<Utc>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(t)))
    }
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().expect("clock lock") = t;
    }
}

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock")
    }
}

/// PostgreSQL keeps microseconds; truncating here keeps every copy of a timestamp identical.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    t - chrono::Duration::nanoseconds(i64::from(nanos % 1_000))
}

pub mod rfc3339_micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Http,
    Mqtt,
    Ai,
    Replay,
    /// Made by the platform itself (a device's `device.inactive` and `device.active`).
    Platform,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The one shape an event has everywhere: outbox, event store and bus carry this JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    /// The producer's time; the platform's `ingested_at` when the producer gave none.
    #[serde(with = "rfc3339_micros")]
    pub event_time: DateTime<Utc>,
    #[serde(with = "rfc3339_micros")]
    pub ingested_at: DateTime<Utc>,
    pub payload: Map<String, Value>,
    pub metadata: Metadata,
}

impl Envelope {
    /// Parses and re-validates an envelope read from the bus (consumers trust nothing).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| format!("undecodable envelope: {e}"))?;
        let mut errors = Vec::new();
        check_event_type(&env.event_type, &mut errors);
        check_aggregate_id(&env.aggregate_id, "aggregate_id", &mut errors);
        if errors.is_empty() {
            Ok(env)
        } else {
            Err(errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "))
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serialises")
    }

    /// The payload as the catalogue type `P` reads it.
    pub fn payload_as<P: catalogue::Payload>(&self) -> Result<P, catalogue::PayloadError> {
        P::read(&self.payload)
    }
}

/// One reason a field was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn fe(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.into(),
        message: message.into(),
    });
}

/// Where an event goes, by the prefix of its type (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Sensor,
    User,
    System,
}

pub fn route(event_type: &str) -> Route {
    if event_type.starts_with("sensor.") {
        Route::Sensor
    } else if event_type.starts_with("user.") {
        Route::User
    } else {
        Route::System
    }
}

/// The platform's side of a submission: who sent it, how, and when.
#[derive(Debug, Clone)]
pub struct Submission {
    pub source: Source,
    pub subject: Option<String>,
    /// A W3C traceparent from the request, if any.
    pub traceparent: Option<String>,
    /// The event type set by the transport (MQTT's topic gives the aggregate, not the type).
    pub aggregate_id: Option<String>,
    /// Whether `ai.*` events may be submitted: over HTTP with the scope `ingest:ai` (or with
    /// authentication off); never over MQTT.
    pub ai_allowed: bool,
}

/// Rules that vary by deployment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    pub strict_types: bool,
}

const REQUEST_FIELDS: &[&str] = &[
    "event_type",
    "aggregate_id",
    "payload",
    "event_time",
    "trace_id",
    "event_id",
];

/// Validates a client's request body (already parsed as JSON) into an envelope.
/// Every problem is reported, not just the first.
pub fn validate_request(
    body: &Value,
    sub: &Submission,
    rules: Rules,
    now: DateTime<Utc>,
) -> Result<Envelope, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = body.as_object() else {
        fe(&mut errors, "", "the body must be a JSON object");
        return Err(errors);
    };
    for key in obj.keys() {
        let allowed = REQUEST_FIELDS.contains(&key.as_str())
            && !(key == "aggregate_id" && sub.aggregate_id.is_some());
        if !allowed {
            fe(&mut errors, key.as_str(), "unknown field");
        }
    }

    let event_type = match obj.get("event_type") {
        None | Some(Value::Null) => {
            fe(&mut errors, "event_type", "required");
            None
        }
        Some(Value::String(s)) => {
            check_event_type(s, &mut errors);
            Some(s.clone())
        }
        Some(_) => {
            fe(&mut errors, "event_type", "must be a string");
            None
        }
    };

    let aggregate_id = match (&sub.aggregate_id, obj.get("aggregate_id")) {
        (Some(a), _) => {
            check_aggregate_id(a, "aggregate_id", &mut errors);
            Some(a.clone())
        }
        (None, None | Some(Value::Null)) => {
            fe(&mut errors, "aggregate_id", "required");
            None
        }
        (None, Some(Value::String(s))) => {
            check_aggregate_id(s, "aggregate_id", &mut errors);
            Some(s.clone())
        }
        (None, Some(_)) => {
            fe(&mut errors, "aggregate_id", "must be a string");
            None
        }
    };

    let payload = match obj.get("payload") {
        None | Some(Value::Null) => {
            fe(&mut errors, "payload", "required");
            None
        }
        Some(v @ Value::Object(m)) => {
            let (depth, has_nul) = scan(v);
            if depth > MAX_PAYLOAD_DEPTH {
                fe(
                    &mut errors,
                    "payload",
                    format!("nested deeper than {MAX_PAYLOAD_DEPTH} levels"),
                );
            }
            if has_nul {
                fe(
                    &mut errors,
                    "payload",
                    "contains a NUL character (\\u0000), which cannot be stored",
                );
            }
            Some(m.clone())
        }
        Some(_) => {
            fe(&mut errors, "payload", "must be a JSON object");
            None
        }
    };

    let event_time = match obj.get("event_time") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => {
                let t = truncate_micros(t.with_timezone(&Utc));
                if !storable_time(&t) {
                    fe(
                        &mut errors,
                        "event_time",
                        format!(
                            "outside the range the event store accepts: {STORABLE_TIMES}, and \
                             no more than 5 minutes in the future"
                        ),
                    );
                } else if t > now + MAX_FUTURE_SKEW {
                    fe(
                        &mut errors,
                        "event_time",
                        "more than 5 minutes in the future",
                    );
                }
                Some(t)
            }
            Err(_) => {
                fe(
                    &mut errors,
                    "event_time",
                    "must be an RFC 3339 timestamp such as 2026-11-23T10:00:00Z",
                );
                None
            }
        },
        Some(_) => {
            fe(&mut errors, "event_time", "must be an RFC 3339 string");
            None
        }
    };

    let event_id = match obj.get("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match Uuid::parse_str(s) {
            Ok(u) if !u.is_nil() => Some(u),
            _ => {
                fe(&mut errors, "event_id", "must be a UUID (v7 recommended)");
                None
            }
        },
        Some(_) => {
            fe(&mut errors, "event_id", "must be a UUID string");
            None
        }
    };

    let traceparent = match obj.get("trace_id") {
        None | Some(Value::Null) => sub.traceparent.clone(),
        Some(Value::String(s)) if trace::is_trace_id(s) => Some(trace::for_trace_id(s)),
        Some(_) => {
            fe(
                &mut errors,
                "trace_id",
                "must be 32 lowercase hex characters (a W3C trace id), not all zero",
            );
            None
        }
    };

    if let (Some(t), Some(p)) = (&event_type, &payload) {
        check_catalogue(t, p, rules, &mut errors);
    }
    if let Some(t) = &event_type
        && t.starts_with("ai.")
        && !sub.ai_allowed
    {
        fe(
            &mut errors,
            "event_type",
            "ai.* events are what the inference sidecar derives: they need a token with the scope ingest:ai",
        );
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let (Some(event_type), Some(aggregate_id), Some(payload)) = (event_type, aggregate_id, payload)
    else {
        unreachable!("missing fields were reported as errors");
    };
    // The `ai.` namespace holds what inference derived (SPEC §9); submitted over HTTP by the
    // sidecar, such events are marked as coming from AI rather than from a client.
    let source = match sub.source {
        Source::Http if event_type.starts_with("ai.") => Source::Ai,
        other => other,
    };
    Ok(Envelope {
        event_id: event_id.unwrap_or_else(Uuid::now_v7),
        event_type,
        aggregate_id,
        event_time: event_time.unwrap_or(now),
        ingested_at: now,
        payload,
        metadata: Metadata {
            source,
            traceparent,
            schema_version: SCHEMA_VERSION,
            subject: sub.subject.clone(),
        },
    })
}

fn check_event_type(t: &str, errors: &mut Vec<FieldError>) {
    if t.len() > MAX_EVENT_TYPE_LEN {
        fe(
            errors,
            "event_type",
            format!("longer than {MAX_EVENT_TYPE_LEN} characters"),
        );
    } else if !EVENT_TYPE_RE.is_match(t) {
        fe(
            errors,
            "event_type",
            "must be dotted lowercase segments such as sensor.reading",
        );
    }
}

fn check_aggregate_id(a: &str, field: &str, errors: &mut Vec<FieldError>) {
    if let Some(problem) = aggregate_id_problem(a) {
        fe(errors, field, problem);
    }
}

/// What makes `a` no aggregate id ingestion would accept, if anything.
pub fn aggregate_id_problem(a: &str) -> Option<&'static str> {
    // The message names the limit; the assertion keeps the two in step.
    const TOO_LONG: &str = "longer than 256 characters";
    const _: () = assert!(MAX_AGGREGATE_ID_LEN == 256);
    let n = a.chars().count();
    if n == 0 {
        Some("must not be empty")
    } else if n > MAX_AGGREGATE_ID_LEN {
        Some(TOO_LONG)
    } else if a.chars().any(char::is_control) {
        Some("must contain printable characters only")
    } else {
        None
    }
}

/// Nesting depth, and whether any key or string holds a NUL (PostgreSQL's jsonb refuses it).
fn scan(v: &Value) -> (usize, bool) {
    // Iterative so a hostile payload cannot exhaust the stack.
    let mut max = 0;
    let mut nul = false;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Object(m) => {
                nul |= m.keys().any(|k| k.contains('\0'));
                stack.extend(m.values().map(|c| (c, d + 1)));
            }
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, d + 1))),
            Value::String(s) => nul |= s.contains('\0'),
            _ => {}
        }
    }
    (max, nul)
}

/// The read models the platform maintains (seed design spec §4.4), shared by the service that
/// writes them and the one that serves them.
pub const PROJECTION_TYPES: &[&str] = &["sensor_state", "user_session"];

fn check_catalogue(
    event_type: &str,
    p: &Map<String, Value>,
    rules: Rules,
    errors: &mut Vec<FieldError>,
) {
    if !catalogue::check(event_type, p, errors) && rules.strict_types {
        fe(
            errors,
            "event_type",
            format!(
                "'{event_type}' is not in the catalogue ({}) and strict types are on",
                catalogue::EVENT_TYPES.join(", ")
            ),
        );
    }
}

/// The event times the event store (PostgreSQL `timestamptz`, written in [`format_time`]'s form)
/// accepts, for messages.
pub const STORABLE_TIMES: &str = "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z (UTC)";

/// Whether the event store can hold this time: a four-digit year of the common era in UTC.
/// PostgreSQL has no year 0, and [`format_time`] writes other years in forms it refuses. The
/// outbox processor applies the same rule (to the stored text) before publishing.
pub fn storable_time(t: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&t.year())
}

/// [`storable_time`] of an envelope's textual event time; false when it does not parse.
pub fn storable_time_text(s: &str) -> bool {
    DateTime::parse_from_rfc3339(s).is_ok_and(|t| storable_time(&t.with_timezone(&Utc)))
}

/// RFC 3339 with microseconds and `Z`, the one textual form of time on the platform.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sub() -> Submission {
        Submission {
            source: Source::Http,
            subject: None,
            traceparent: None,
            aggregate_id: None,
            ai_allowed: true,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn check(body: Value) -> Result<Envelope, Vec<FieldError>> {
        validate_request(&body, &sub(), Rules::default(), now())
    }

    fn fields(body: Value) -> Vec<String> {
        check(body)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_catalogue_reading_is_accepted_with_platform_fields() {
        let e = check(
            json!({"event_type": "sensor.reading", "aggregate_id": "device-001",
            "payload": {"value": 72.5, "unit": "fahrenheit"}}),
        )
        .unwrap();
        assert_eq!(e.event_id.get_version_num(), 7);
        assert_eq!(e.ingested_at, now());
        assert_eq!(e.event_time, now());
        assert_eq!(e.metadata.source, Source::Http);
        assert_eq!(e.metadata.schema_version, 1);
        let anomaly = check(
            json!({"event_type": "ai.anomaly", "aggregate_id": "device-001",
            "payload": {"source_event_id": Uuid::now_v7().to_string(), "device_id": "device-001",
                        "value": 80.0, "score": 9.5, "threshold": 4.0, "model": "zscore"}}),
        )
        .unwrap();
        assert_eq!(anomaly.metadata.source, Source::Ai);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let f = fields(
            json!({"event_type": "Bad", "aggregate_id": "", "payload": [1],
            "event_time": "yesterday", "event_id": "x", "extra": 1}),
        );
        for want in [
            "event_type",
            "aggregate_id",
            "payload",
            "event_time",
            "event_id",
            "extra",
        ] {
            assert!(f.contains(&want.to_string()), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn each_rule_rejects_what_it_should() {
        let base =
            |et: &str, p: Value| json!({"event_type": et, "aggregate_id": "a", "payload": p});
        let cases: Vec<(Value, &str)> = vec![
            (json!({"aggregate_id": "a", "payload": {}}), "event_type"),
            (base("sensor", json!({})), "event_type"),
            (base("Sensor.reading", json!({})), "event_type"),
            (base("sensor..x", json!({})), "event_type"),
            (
                base(&format!("a.{}", "b".repeat(130)), json!({})),
                "event_type",
            ),
            (json!({"event_type": "a.b", "payload": {}}), "aggregate_id"),
            (
                json!({"event_type": "a.b", "aggregate_id": "x".repeat(257), "payload": {}}),
                "aggregate_id",
            ),
            (
                json!({"event_type": "a.b", "aggregate_id": "a\u{7}b", "payload": {}}),
                "aggregate_id",
            ),
            (
                json!({"event_type": "a.b", "aggregate_id": 5, "payload": {}}),
                "aggregate_id",
            ),
            (json!({"event_type": "a.b", "aggregate_id": "a"}), "payload"),
            (base("a.b", json!("str")), "payload"),
            (
                base("sensor.reading", json!({"unit": "c"})),
                "payload.value",
            ),
            (
                base("sensor.reading", json!({"value": "1", "unit": "c"})),
                "payload.value",
            ),
            (base("sensor.reading", json!({"value": 1})), "payload.unit"),
            (base("a.b", json!({"note": "a\u{0}b"})), "payload"),
            (base("a.b", json!({"deep": {"k\u{0}": 1}})), "payload"),
            (
                base("sensor.reading", json!({"value": 1, "unit": " "})),
                "payload.unit",
            ),
            (
                base("user.login", json!({"user_id": "u", "ip": "999.1.1.1"})),
                "payload.ip",
            ),
            (
                base("user.login", json!({"ip": "1.1.1.1"})),
                "payload.user_id",
            ),
            (
                base("system.alert", json!({"level": "loud", "message": "m"})),
                "payload.level",
            ),
            (
                base("system.alert", json!({"level": "info"})),
                "payload.message",
            ),
            (
                base(
                    "ai.anomaly",
                    json!({"source_event_id": "x", "device_id": "d", "value": 1,
                "score": 1, "threshold": 1, "model": "m"}),
                ),
                "payload.source_event_id",
            ),
        ];
        for (body, field) in cases {
            let f = fields(body.clone());
            assert!(
                f.contains(&field.to_string()),
                "{body} should fail on {field}, got {f:?}"
            );
        }
    }

    #[test]
    fn time_rules() {
        let body = |t: &str| json!({"event_type": "a.b", "aggregate_id": "a", "payload": {}, "event_time": t});
        assert!(check(body("2026-11-23T10:04:59Z")).is_ok());
        assert_eq!(fields(body("2026-11-23T10:05:01Z")), vec!["event_time"]);
        assert_eq!(fields(body("2026-11-23 10:00")), vec!["event_time"]);
        let e = check(body("2026-11-23T11:00:00+02:00")).unwrap();
        assert_eq!(format_time(&e.event_time), "2026-11-23T09:00:00.000000Z");
    }

    #[test]
    fn payload_depth_limit() {
        let mut v = json!(1);
        for _ in 0..32 {
            v = json!({ "x": v });
        }
        let body = json!({"event_type": "a.b", "aggregate_id": "a", "payload": v});
        assert_eq!(fields(body), vec!["payload"]);
    }

    #[test]
    fn strict_types_refuse_unknown_types_only() {
        let body = json!({"event_type": "custom.thing", "aggregate_id": "a", "payload": {}});
        assert!(check(body.clone()).is_ok());
        let strict = Rules { strict_types: true };
        assert!(validate_request(&body, &sub(), strict, now()).is_err());
        let known = json!({"event_type": "system.alert", "aggregate_id": "a",
            "payload": {"level": "info", "message": "m"}});
        assert!(validate_request(&known, &sub(), strict, now()).is_ok());
    }

    #[test]
    fn trace_id_becomes_a_traceparent() {
        let body = json!({"event_type": "a.b", "aggregate_id": "a", "payload": {},
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"});
        let tp = check(body).unwrap().metadata.traceparent.unwrap();
        assert!(trace::is_valid(&tp), "{tp}");
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }

    #[test]
    fn ai_events_need_a_submission_allowed_to_make_them() {
        let body = json!({"event_type": "ai.anomaly", "aggregate_id": "d", "payload": {
            "device_id": "d", "key": "value", "value": 9.0, "score": 9.0, "threshold": 4.0,
            "source_event_id": Uuid::now_v7(), "model": "m@1"}});
        let rules = Rules::default();
        assert!(validate_request(&body, &sub(), rules, now()).is_ok());
        for source in [Source::Http, Source::Mqtt] {
            let denied = Submission {
                source,
                ai_allowed: false,
                ..sub()
            };
            let errs = validate_request(&body, &denied, rules, now()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.field == "event_type" && e.message.contains("ingest:ai")),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn routing_by_prefix() {
        assert_eq!(route("sensor.reading"), Route::Sensor);
        assert_eq!(route("user.login"), Route::User);
        assert_eq!(route("system.alert"), Route::System);
        assert_eq!(route("ai.anomaly"), Route::System);
        assert_eq!(route("sensorx.reading"), Route::System);
    }

    #[test]
    fn decode_rejects_garbage_and_bad_types() {
        assert!(Envelope::decode(b"not json").is_err());
        let e = check(json!({"event_type": "a.b", "aggregate_id": "a", "payload": {}})).unwrap();
        let mut v: Value = serde_json::from_str(&e.to_json()).unwrap();
        v["event_type"] = json!("BAD");
        assert!(Envelope::decode(v.to_string().as_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn any_valid_envelope_round_trips(
            seg1 in "[a-z][a-z0-9_]{0,10}",
            seg2 in "[a-z][a-z0-9_]{0,10}",
            agg in "[ -~]{1,64}",
            value in -1e12f64..1e12,
            unit in "[a-z]{1,8}",
            secs in 0i64..4_000_000_000,
            micros in 0u32..1_000_000,
        ) {
            let et = format!("{seg1}.{seg2}");
            let t = DateTime::from_timestamp(secs, micros * 1000).unwrap();
            let t = t.min(now());
            let body = json!({"event_type": et, "aggregate_id": agg,
                "payload": {"value": value, "unit": unit}, "event_time": format_time(&t)});
            let e = validate_request(&body, &sub(), Rules::default(), now()).unwrap();
            prop_assert_eq!(&e.event_type, &et);
            prop_assert_eq!(&e.aggregate_id, &agg);
            prop_assert_eq!(e.event_time, t);
            let back = Envelope::decode(e.to_json().as_bytes()).unwrap();
            prop_assert_eq!(back, e);
        }

        #[test]
        fn invalid_event_types_never_pass(et in "\\PC{0,40}") {
            prop_assume!(!EVENT_TYPE_RE.is_match(&et));
            let body = json!({"event_type": et, "aggregate_id": "a", "payload": {}});
            let errs = validate_request(&body, &sub(), Rules::default(), now()).unwrap_err();
            prop_assert!(errs.iter().any(|e| e.field == "event_type"));
        }

        #[test]
        fn arbitrary_json_never_panics(s in "\\PC{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = validate_request(&v, &sub(), Rules::default(), now());
            }
        }
    }
}
