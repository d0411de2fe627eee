//! The event types whose payloads the platform knows (SPEC §5): one typed payload each, and the
//! one check that reads it. Ingestion admits an event with it (every field at fault, for the
//! client); the event handler and the tsdb-writer read their payloads through it, so what
//! ingestion admits is what they can read, and a refusal names the same field everywhere.
//!
//! The types serialise as the payloads they read; they are read only through [`Payload::read`],
//! not `Deserialize`, which would neither apply these rules nor report every field at once.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::FieldError;

/// The known event types.
pub const EVENT_TYPES: &[&str] = &[
    SensorReading::EVENT_TYPE,
    UserLogin::EVENT_TYPE,
    SystemAlert::EVENT_TYPE,
    AiAnomaly::EVENT_TYPE,
];

/// A typed payload of one catalogue event type.
pub trait Payload: Sized {
    const EVENT_TYPE: &'static str;
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError>;
}

/// `sensor.reading`: a device's measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SensorReading {
    /// Finite.
    pub value: f64,
    /// Not blank.
    pub unit: String,
}

impl Payload for SensorReading {
    const EVENT_TYPE: &'static str = "sensor.reading";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let value = r.number("value");
        let unit = r.string("unit", NON_EMPTY);
        r.finish(|| {
            Some(Self {
                value: value?,
                unit: unit?,
            })
        })
    }
}

/// `user.login`: a user signed in from an address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserLogin {
    /// Not blank.
    pub user_id: String,
    /// An IPv4 or IPv6 address, as the producer wrote it (projections keep that text).
    pub ip: String,
}

impl Payload for UserLogin {
    const EVENT_TYPE: &'static str = "user.login";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let user_id = r.string("user_id", NON_EMPTY);
        let ip = r.ip("ip");
        r.finish(|| {
            Some(Self {
                user_id: user_id?,
                ip: ip?,
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl AlertLevel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" => Self::Warn,
            "error" => Self::Error,
            "critical" => Self::Critical,
            _ => return None,
        })
    }
}

/// `system.alert`: something an operator may need to know.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemAlert {
    pub level: AlertLevel,
    /// May be empty.
    pub message: String,
}

impl Payload for SystemAlert {
    const EVENT_TYPE: &'static str = "system.alert";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let level = r.level("level");
        let message = r.string("message", MAY_BE_EMPTY);
        r.finish(|| {
            Some(Self {
                level: level?,
                message: message?,
            })
        })
    }
}

/// `ai.anomaly`: what the inference sidecar derived from a reading (SPEC §9).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AiAnomaly {
    pub source_event_id: Uuid,
    pub device_id: String,
    pub value: f64,
    pub score: f64,
    pub threshold: f64,
    pub model: String,
}

impl Payload for AiAnomaly {
    const EVENT_TYPE: &'static str = "ai.anomaly";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let source_event_id = r.uuid("source_event_id");
        let device_id = r.string("device_id", NON_EMPTY);
        let value = r.number("value");
        let score = r.number("score");
        let threshold = r.number("threshold");
        let model = r.string("model", NON_EMPTY);
        r.finish(|| {
            Some(Self {
                source_event_id: source_event_id?,
                device_id: device_id?,
                value: value?,
                score: score?,
                threshold: threshold?,
                model: model?,
            })
        })
    }
}

/// Checks the payload of a known event type, adding what is wrong to `errors`; false when the
/// type is not in the catalogue (any payload goes).
pub(super) fn check(
    event_type: &str,
    payload: &Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> bool {
    let refused = match event_type {
        SensorReading::EVENT_TYPE => SensorReading::read(payload).err(),
        UserLogin::EVENT_TYPE => UserLogin::read(payload).err(),
        SystemAlert::EVENT_TYPE => SystemAlert::read(payload).err(),
        AiAnomaly::EVENT_TYPE => AiAnomaly::read(payload).err(),
        _ => return false,
    };
    if let Some(e) = refused {
        errors.extend(e.field_errors());
    }
    true
}

/// What is wrong with a payload, field by field in the order they are read (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError(Vec<Problem>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    key: &'static str,
    /// For the client: what is wrong.
    message: &'static str,
    /// For a consumer's refusal: what the field must be.
    expected: &'static str,
}

impl PayloadError {
    /// Every problem, as validation reports them to the client.
    pub fn field_errors(&self) -> impl Iterator<Item = FieldError> + '_ {
        self.0.iter().map(|p| FieldError {
            field: format!("payload.{}", p.key),
            message: p.message.to_string(),
        })
    }
}

/// A consumer's refusal (a dead letter's error): the first field at fault and what it must be,
/// e.g. `payload.value must be a finite number`.
impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.0.first().expect("a payload error has a problem");
        write!(f, "payload.{} must be {}", p.key, p.expected)
    }
}

impl std::error::Error for PayloadError {}

const NON_EMPTY: bool = true;
const MAY_BE_EMPTY: bool = false;

/// Reads fields one by one, keeping every problem.
struct Reader<'a> {
    payload: &'a Map<String, Value>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(payload: &'a Map<String, Value>) -> Self {
        Self {
            payload,
            problems: Vec::new(),
        }
    }

    fn fail<T>(
        &mut self,
        key: &'static str,
        message: &'static str,
        expected: &'static str,
    ) -> Option<T> {
        self.problems.push(Problem {
            key,
            message,
            expected,
        });
        None
    }

    fn number(&mut self, key: &'static str) -> Option<f64> {
        const EXPECTED: &str = "a finite number";
        match self.payload.get(key) {
            Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => n.as_f64(),
            Some(_) => self.fail(key, "must be a finite number", EXPECTED),
            None => self.fail(key, "required", EXPECTED),
        }
    }

    fn string(&mut self, key: &'static str, non_empty: bool) -> Option<String> {
        let expected = if non_empty {
            "a non-empty string"
        } else {
            "a string"
        };
        match self.payload.get(key) {
            Some(Value::String(s)) if !non_empty || !s.trim().is_empty() => Some(s.clone()),
            Some(Value::String(_)) => self.fail(key, "must not be empty", expected),
            Some(_) => self.fail(key, "must be a string", expected),
            None => self.fail(key, "required", expected),
        }
    }

    fn ip(&mut self, key: &'static str) -> Option<String> {
        const EXPECTED: &str = "an IP address";
        match self.payload.get(key) {
            Some(Value::String(s)) if s.parse::<IpAddr>().is_ok() => Some(s.clone()),
            Some(_) => self.fail(key, "must be an IPv4 or IPv6 address", EXPECTED),
            None => self.fail(key, "required", EXPECTED),
        }
    }

    fn level(&mut self, key: &'static str) -> Option<AlertLevel> {
        const LEVELS: &str = "one of debug, info, warn, error, critical";
        match self.payload.get(key) {
            Some(v) => match v.as_str().and_then(AlertLevel::parse) {
                Some(l) => Some(l),
                None => self.fail(
                    key,
                    "must be one of debug, info, warn, error, critical",
                    LEVELS,
                ),
            },
            None => self.fail(key, "required", LEVELS),
        }
    }

    fn uuid(&mut self, key: &'static str) -> Option<Uuid> {
        match self
            .payload
            .get(key)
            .and_then(Value::as_str)
            .map(Uuid::parse_str)
        {
            Some(Ok(u)) => Some(u),
            _ => self.fail(key, "must be a UUID string", "a UUID string"),
        }
    }

    /// The payload, or every problem found; `build` sees every field read.
    fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, PayloadError> {
        if self.problems.is_empty() {
            Ok(build().expect("every field was read"))
        } else {
            Err(PayloadError(self.problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_payload_reads_into_its_type_and_serialises_back() {
        let p = map(json!({"value": 72.5, "unit": "fahrenheit"}));
        let r = SensorReading::read(&p).unwrap();
        assert_eq!(r.value, 72.5);
        assert_eq!(serde_json::to_value(&r).unwrap(), Value::Object(p));
        let a = SystemAlert::read(&map(json!({"level": "warn", "message": ""}))).unwrap();
        assert_eq!(a.level, AlertLevel::Warn);
        assert_eq!(serde_json::to_value(a).unwrap()["level"], "warn");
    }

    #[test]
    fn consumers_name_the_first_field_at_fault() {
        let e = SensorReading::read(&map(json!({"value": "x", "unit": 1}))).unwrap_err();
        assert_eq!(e.to_string(), "payload.value must be a finite number");
        assert_eq!(e.field_errors().count(), 2);
        let e = SensorReading::read(&map(json!({"value": 1, "unit": " "}))).unwrap_err();
        assert_eq!(e.to_string(), "payload.unit must be a non-empty string");
        let e = UserLogin::read(&map(json!({"user_id": "u", "ip": "999.1.1.1"}))).unwrap_err();
        assert_eq!(e.to_string(), "payload.ip must be an IP address");
    }

    #[test]
    fn unknown_types_are_not_checked() {
        let mut errors = Vec::new();
        assert!(!check("custom.thing", &map(json!({})), &mut errors));
        assert!(check(
            "system.alert",
            &map(json!({"level": 3})),
            &mut errors
        ));
        let fields: Vec<_> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            fields,
            [
                "payload.level: must be one of debug, info, warn, error, critical",
                "payload.message: required"
            ]
        );
    }
}
