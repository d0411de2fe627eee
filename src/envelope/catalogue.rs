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
    DeviceInactive::EVENT_TYPE,
    DeviceActive::EVENT_TYPE,
];

/// A typed payload of one catalogue event type.
pub trait Payload: Sized {
    const EVENT_TYPE: &'static str;
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError>;
}

/// At most this many quantities in one reading: a device's row of the time series, not a dump.
pub const MAX_QUANTITIES: usize = 32;
/// The longest quantity name.
pub const MAX_KEY_LEN: usize = 64;
/// The quantity of a single-value reading that names none (`{"value", "unit"}`).
pub const DEFAULT_KEY: &str = "value";

/// Whether `s` can name a quantity: 1 to 64 characters, a letter first, then letters, digits,
/// `_`, `.` or `-` — safe in a query string, a column value and a metric label alike.
pub fn is_quantity_key(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_KEY_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One measured quantity of a reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantity {
    /// A quantity key ([`is_quantity_key`]).
    pub key: String,
    /// Finite.
    pub value: f64,
    /// Not blank when given; a multi-quantity reading may leave a quantity without a unit.
    pub unit: Option<String>,
}

/// `sensor.reading`: a device's measurement of one or several quantities at one time. Two
/// shapes are accepted:
/// - `{"value": 21.5, "unit": "c"}` (and an optional `"metric": "temperature"`): one quantity,
///   named by `metric`, else [`DEFAULT_KEY`];
/// - `{"values": {"temperature": 21.5, "humidity": 40.2}, "units": {"temperature": "c"}}`: 1 to
///   [`MAX_QUANTITIES`] quantities, `units` optional and naming only keys of `values`.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorReading {
    /// In key order for the multi-quantity shape (serde_json's map is ordered); never empty.
    pub quantities: Vec<Quantity>,
}

impl Payload for SensorReading {
    const EVENT_TYPE: &'static str = "sensor.reading";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        if payload.contains_key("values") {
            if payload.contains_key("value") {
                r.fail::<()>(
                    "value",
                    "not allowed beside values: send one quantity as value or several as values",
                    "absent when values is given",
                );
            }
            let quantities = r.quantities();
            return r.finish(|| {
                Some(Self {
                    quantities: quantities?,
                })
            });
        }
        let value = r.number("value");
        let unit = r.string("unit", NON_EMPTY);
        let key = match payload.get("metric") {
            None => Some(DEFAULT_KEY.to_string()),
            Some(Value::String(k)) if is_quantity_key(k) => Some(k.clone()),
            Some(_) => r.fail(
                "metric",
                "must be a quantity name: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter",
                "a quantity name",
            ),
        };
        r.finish(|| {
            Some(Self {
                quantities: vec![Quantity {
                    key: key?,
                    value: value?,
                    unit: Some(unit?),
                }],
            })
        })
    }
}

impl Serialize for SensorReading {
    /// As the multi-quantity shape, which holds every reading; tests read it back.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let values: Map<String, Value> = self
            .quantities
            .iter()
            .map(|q| (q.key.clone(), Value::from(q.value)))
            .collect();
        let units: Map<String, Value> = self
            .quantities
            .iter()
            .filter_map(|q| Some((q.key.clone(), Value::from(q.unit.clone()?))))
            .collect();
        let mut m = Map::new();
        m.insert("values".into(), Value::Object(values));
        if !units.is_empty() {
            m.insert("units".into(), Value::Object(units));
        }
        Value::Object(m).serialize(s)
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
    /// The scored quantity of the reading ([`DEFAULT_KEY`] for anomalies from before readings had
    /// several).
    pub key: String,
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
        let key = match payload.get("key") {
            None => Some(DEFAULT_KEY.to_string()),
            Some(Value::String(k)) if is_quantity_key(k) => Some(k.clone()),
            Some(_) => r.fail("key", "must be a quantity name", "a quantity name"),
        };
        let value = r.number("value");
        let score = r.number("score");
        let threshold = r.number("threshold");
        let model = r.string("model", NON_EMPTY);
        r.finish(|| {
            Some(Self {
                source_event_id: source_event_id?,
                device_id: device_id?,
                key: key?,
                value: value?,
                score: score?,
                threshold: threshold?,
                model: model?,
            })
        })
    }
}

/// `device.inactive`: the platform committed no reading of the device (the aggregate) for its
/// inactivity period. Emitted by the platform (source `platform`), once per transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInactive {
    /// When its last reading was committed (RFC 3339).
    pub last_seen: String,
    /// The period it exceeded.
    pub timeout_seconds: f64,
}

impl Payload for DeviceInactive {
    const EVENT_TYPE: &'static str = "device.inactive";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let last_seen = r.time("last_seen");
        let timeout_seconds = r.number("timeout_seconds");
        r.finish(|| {
            Some(Self {
                last_seen: last_seen?,
                timeout_seconds: timeout_seconds?,
            })
        })
    }
}

/// `device.active`: an inactive device reported again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceActive {
    /// When the reading that reactivated it was committed (RFC 3339).
    pub last_seen: String,
    /// The last reading before it went quiet (RFC 3339).
    pub inactive_since: String,
}

impl Payload for DeviceActive {
    const EVENT_TYPE: &'static str = "device.active";
    fn read(payload: &Map<String, Value>) -> Result<Self, PayloadError> {
        let mut r = Reader::new(payload);
        let last_seen = r.time("last_seen");
        let inactive_since = r.time("inactive_since");
        r.finish(|| {
            Some(Self {
                last_seen: last_seen?,
                inactive_since: inactive_since?,
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
        DeviceInactive::EVENT_TYPE => DeviceInactive::read(payload).err(),
        DeviceActive::EVENT_TYPE => DeviceActive::read(payload).err(),
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
    /// The path below `payload`, e.g. `value` or `values.humidity`.
    key: String,
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

/// A client's key as it may appear in an error's field path: cut short and without control
/// characters, so a hostile key cannot make the error body huge or break a log line.
fn printable(key: &str) -> String {
    let mut out: String = key
        .chars()
        .take(MAX_KEY_LEN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if key.chars().count() > MAX_KEY_LEN {
        out.push('…');
    }
    out
}

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
        key: impl Into<String>,
        message: &'static str,
        expected: &'static str,
    ) -> Option<T> {
        self.problems.push(Problem {
            key: key.into(),
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

    fn time(&mut self, key: &'static str) -> Option<String> {
        match self.payload.get(key).and_then(Value::as_str) {
            Some(t) if chrono::DateTime::parse_from_rfc3339(t).is_ok() => Some(t.to_string()),
            _ => self.fail(key, "must be an RFC 3339 time", "an RFC 3339 time"),
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

    /// The multi-quantity shape: `values` (1 to [`MAX_QUANTITIES`] named finite numbers) and
    /// the optional `units` (non-empty strings for keys of `values`).
    fn quantities(&mut self) -> Option<Vec<Quantity>> {
        const VALUES: &str = "an object of 1 to 32 quantity names to finite numbers";
        let values = match self.payload.get("values") {
            Some(Value::Object(v)) if (1..=MAX_QUANTITIES).contains(&v.len()) => v,
            Some(Value::Object(_)) => {
                return self.fail(
                    "values",
                    "must hold 1 to 32 quantities; send more in separate readings",
                    VALUES,
                );
            }
            _ => {
                return self.fail(
                    "values",
                    "must be an object of quantity names to numbers",
                    VALUES,
                );
            }
        };
        let units = match self.payload.get("units") {
            None => None,
            Some(Value::Object(u)) => Some(u),
            Some(_) => {
                return self.fail(
                    "units",
                    "must be an object of quantity names to units",
                    "an object of quantity names to units",
                );
            }
        };
        let before = self.problems.len();
        let mut out = Vec::with_capacity(values.len());
        for (key, v) in values {
            if !is_quantity_key(key) {
                self.fail::<()>(
                    format!("values.{}", printable(key)),
                    "is not a quantity name: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter",
                    "keyed by quantity names",
                );
                continue;
            }
            let value = match v {
                Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => n.as_f64(),
                _ => self.fail(
                    format!("values.{key}"),
                    "must be a finite number",
                    "a finite number",
                ),
            };
            let unit = match units.and_then(|u| u.get(key)) {
                None => Some(None),
                Some(Value::String(u)) if !u.trim().is_empty() => Some(Some(u.clone())),
                Some(_) => self.fail(
                    format!("units.{key}"),
                    "must be a non-empty string",
                    "a non-empty string",
                ),
            };
            if let (Some(value), Some(unit)) = (value, unit) {
                out.push(Quantity {
                    key: key.clone(),
                    value,
                    unit,
                });
            }
        }
        for key in units.into_iter().flat_map(|u| u.keys()) {
            if !values.contains_key(key) {
                self.fail::<()>(
                    format!("units.{}", printable(key)),
                    "names no quantity of values",
                    "keyed by quantities of values",
                );
            }
        }
        (self.problems.len() == before).then_some(out)
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
        assert_eq!(
            r.quantities,
            [Quantity {
                key: "value".into(),
                value: 72.5,
                unit: Some("fahrenheit".into())
            }]
        );
        let as_values = serde_json::to_value(&r).unwrap();
        assert_eq!(
            as_values,
            json!({"values": {"value": 72.5}, "units": {"value": "fahrenheit"}})
        );
        assert_eq!(SensorReading::read(&map(as_values)).unwrap(), r);
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
    fn a_reading_holds_one_quantity_or_several() {
        let named = SensorReading::read(&map(json!({"value": 1, "unit": "c", "metric": "t_1"})));
        assert_eq!(named.unwrap().quantities[0].key, "t_1");
        let r = SensorReading::read(&map(json!({
            "values": {"temperature": 21.5, "humidity": 40.2},
            "units": {"temperature": "c"}
        })))
        .unwrap();
        let got: Vec<_> = r
            .quantities
            .iter()
            .map(|q| (q.key.as_str(), q.value, q.unit.as_deref()))
            .collect();
        assert_eq!(
            got,
            [("humidity", 40.2, None), ("temperature", 21.5, Some("c"))]
        );
    }

    #[test]
    fn every_wrong_quantity_is_named() {
        let fields = |v: Value| -> Vec<String> {
            SensorReading::read(&map(v))
                .unwrap_err()
                .field_errors()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(
            fields(json!({"value": 1, "values": {"a": 1}})),
            ["payload.value"]
        );
        assert_eq!(
            fields(json!({"values": {"ok": 1, "1x": 2, "b": "3", "c": true, "d": null}})),
            [
                "payload.values.1x",
                "payload.values.b",
                "payload.values.c",
                "payload.values.d"
            ]
        );
        assert_eq!(
            fields(json!({"values": {"a": 1}, "units": {"a": "", "z": "c"}})),
            ["payload.units.a", "payload.units.z"]
        );
        assert_eq!(fields(json!({"values": {}})), ["payload.values"]);
        assert_eq!(fields(json!({"values": [1]})), ["payload.values"]);
        let many: Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(fields(json!({ "values": many })), ["payload.values"]);
        assert_eq!(
            fields(json!({"value": 1, "unit": "c", "metric": "has space"})),
            ["payload.metric"]
        );
        let long = "k".repeat(1000);
        let e = fields(json!({ "values": { long.clone(): 1 } }));
        assert!(e[0].len() < 100, "a hostile key is cut short: {}", e[0]);
        assert!(is_quantity_key(&"k".repeat(64)) && !is_quantity_key(&"k".repeat(65)));
        assert!(!is_quantity_key("") && !is_quantity_key("_a") && !is_quantity_key("é"));
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
