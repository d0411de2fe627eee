//! The rule condition language: a small JSON predicate on the envelope.
//!
//! ```json
//! {"path": "payload.score", "op": ">", "value": 3}
//! {"all": [<condition>, ...]}   {"any": [<condition>, ...]}   {"not": <condition>}
//! ```
//! `path` is dotted from the envelope root (`event_type`, `aggregate_id`, `payload.a.b`,
//! `metadata.source`; array elements by index, `payload.tags.0`). Operators: `==`, `!=` (any
//! JSON value, numbers compared by value), `>`, `>=`, `<`, `<=` (numbers, or two strings
//! compared lexically), `in` (`value` is an array), `contains` (a substring of a string or an
//! element of an array), `starts_with` (strings), `exists` (no `value`; true when the path is
//! present and not null). A comparison whose operands have other types is false, never an
//! error: events are data from devices, a rule must not fail on one that lacks a field.

use serde_json::Value;

use crate::envelope::FieldError;

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Compare {
        path: Vec<String>,
        op: Op,
        value: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    In,
    Contains,
    StartsWith,
    Exists,
}

const OPS: &str = "==, !=, >, >=, <, <=, in, contains, starts_with, exists";

/// Nesting beyond this is refused: conditions are evaluated for every event.
const MAX_DEPTH: usize = 16;

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "==" | "eq" => Op::Eq,
            "!=" | "ne" => Op::Ne,
            ">" | "gt" => Op::Gt,
            ">=" | "ge" => Op::Ge,
            "<" | "lt" => Op::Lt,
            "<=" | "le" => Op::Le,
            "in" => Op::In,
            "contains" => Op::Contains,
            "starts_with" => Op::StartsWith,
            "exists" => Op::Exists,
            _ => return None,
        })
    }
}

impl Condition {
    /// The condition, or every problem in it, each with where it is (`condition.all[1].op`).
    pub fn parse(v: &Value) -> Result<Condition, Vec<FieldError>> {
        let mut errors = Vec::new();
        let c = parse_at(v, "condition", 0, &mut errors);
        match c {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(errors),
        }
    }

    pub fn matches(&self, envelope: &Value) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.matches(envelope)),
            Condition::Any(cs) => cs.iter().any(|c| c.matches(envelope)),
            Condition::Not(c) => !c.matches(envelope),
            Condition::Compare { path, op, value } => compare(lookup(envelope, path), *op, value),
        }
    }
}

fn err(errors: &mut Vec<FieldError>, field: &str, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.to_string(),
        message: message.into(),
    });
}

fn parse_at(v: &Value, at: &str, depth: usize, errors: &mut Vec<FieldError>) -> Option<Condition> {
    if depth > MAX_DEPTH {
        err(errors, at, format!("nested deeper than {MAX_DEPTH} levels"));
        return None;
    }
    let Some(obj) = v.as_object() else {
        err(
            errors,
            at,
            "must be an object: {\"path\", \"op\", \"value\"}, {\"all\": [...]}, {\"any\": [...]} or {\"not\": {...}}",
        );
        return None;
    };
    for combinator in ["all", "any"] {
        if let Some(list) = obj.get(combinator) {
            if obj.len() != 1 {
                err(errors, at, format!("'{combinator}' must be the only key"));
                return None;
            }
            let Some(items) = list.as_array().filter(|a| !a.is_empty()) else {
                err(
                    errors,
                    &format!("{at}.{combinator}"),
                    "must be a non-empty array of conditions",
                );
                return None;
            };
            let parsed: Vec<Option<Condition>> = items
                .iter()
                .enumerate()
                .map(|(i, c)| parse_at(c, &format!("{at}.{combinator}[{i}]"), depth + 1, errors))
                .collect();
            let parsed: Option<Vec<Condition>> = parsed.into_iter().collect();
            return parsed.map(|cs| {
                if combinator == "all" {
                    Condition::All(cs)
                } else {
                    Condition::Any(cs)
                }
            });
        }
    }
    if let Some(inner) = obj.get("not") {
        if obj.len() != 1 {
            err(errors, at, "'not' must be the only key");
            return None;
        }
        return parse_at(inner, &format!("{at}.not"), depth + 1, errors)
            .map(|c| Condition::Not(Box::new(c)));
    }
    for k in obj.keys() {
        if !matches!(k.as_str(), "path" | "op" | "value") {
            err(
                errors,
                &format!("{at}.{k}"),
                "unknown field; a comparison has path, op and value",
            );
        }
    }
    let path = match obj.get("path").and_then(Value::as_str) {
        Some(p) if !p.is_empty() && p.split('.').all(|s| !s.is_empty()) => {
            Some(p.split('.').map(str::to_string).collect::<Vec<_>>())
        }
        _ => {
            err(
                errors,
                &format!("{at}.path"),
                "required: a dotted path into the envelope such as payload.score",
            );
            None
        }
    };
    let op = match obj.get("op").and_then(Value::as_str) {
        Some(s) => match Op::parse(s) {
            Some(op) => Some(op),
            None => {
                err(
                    errors,
                    &format!("{at}.op"),
                    format!("unknown operator '{s}'; expected one of {OPS}"),
                );
                None
            }
        },
        None => {
            err(
                errors,
                &format!("{at}.op"),
                format!("required: one of {OPS}"),
            );
            None
        }
    };
    let value = obj.get("value").cloned();
    let value = match (op, value) {
        (Some(Op::Exists), None) => Some(Value::Null),
        (Some(Op::Exists), Some(_)) => {
            err(errors, &format!("{at}.value"), "'exists' takes no value");
            None
        }
        (Some(_), None) => {
            err(errors, &format!("{at}.value"), "required");
            None
        }
        (Some(Op::In), Some(v)) if !v.is_array() => {
            err(errors, &format!("{at}.value"), "'in' needs an array");
            None
        }
        (Some(Op::Gt | Op::Ge | Op::Lt | Op::Le), Some(v)) if !(v.is_number() || v.is_string()) => {
            err(
                errors,
                &format!("{at}.value"),
                "an ordering operator needs a number or a string",
            );
            None
        }
        (Some(Op::StartsWith), Some(v)) if !v.is_string() => {
            err(
                errors,
                &format!("{at}.value"),
                "'starts_with' needs a string",
            );
            None
        }
        (_, v) => v,
    };
    Some(Condition::Compare {
        path: path?,
        op: op?,
        value: value?,
    })
}

fn lookup<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(root, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // 3 and 3.0 are the same reading.
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn compare(actual: Option<&Value>, op: Op, expected: &Value) -> bool {
    let Some(actual) = actual else {
        return op == Op::Ne;
    };
    let ordering = || match (actual, expected) {
        (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    };
    use std::cmp::Ordering::*;
    match op {
        Op::Exists => !actual.is_null(),
        Op::Eq => equal(actual, expected),
        Op::Ne => !equal(actual, expected),
        Op::Gt => ordering() == Some(Greater),
        Op::Ge => matches!(ordering(), Some(Greater | Equal)),
        Op::Lt => ordering() == Some(Less),
        Op::Le => matches!(ordering(), Some(Less | Equal)),
        Op::In => expected
            .as_array()
            .is_some_and(|a| a.iter().any(|e| equal(actual, e))),
        Op::Contains => match (actual, expected) {
            (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
            (Value::Array(a), e) => a.iter().any(|x| equal(x, e)),
            _ => false,
        },
        Op::StartsWith => match (actual, expected) {
            (Value::String(s), Value::String(p)) => s.starts_with(p.as_str()),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env() -> Value {
        json!({"event_type": "ai.anomaly", "aggregate_id": "dev-7",
               "payload": {"score": 4.5, "level": "error", "tags": ["a", "b"], "n": 3},
               "metadata": {"source": "ai"}})
    }

    fn check(c: Value) -> bool {
        Condition::parse(&c).unwrap().matches(&env())
    }

    #[test]
    fn comparisons() {
        assert!(check(
            json!({"path": "payload.score", "op": ">", "value": 3})
        ));
        assert!(!check(
            json!({"path": "payload.score", "op": "<=", "value": 3})
        ));
        assert!(check(
            json!({"path": "payload.n", "op": "==", "value": 3.0})
        ));
        assert!(check(
            json!({"path": "payload.level", "op": "in", "value": ["error", "critical"]})
        ));
        assert!(check(
            json!({"path": "payload.tags", "op": "contains", "value": "b"})
        ));
        assert!(check(
            json!({"path": "payload.tags.1", "op": "==", "value": "b"})
        ));
        assert!(check(
            json!({"path": "aggregate_id", "op": "starts_with", "value": "dev-"})
        ));
        assert!(check(json!({"path": "metadata.source", "op": "exists"})));
        assert!(!check(json!({"path": "payload.missing", "op": "exists"})));
        assert!(check(
            json!({"path": "payload.missing", "op": "!=", "value": 1})
        ));
        // A type mismatch is false, not an error.
        assert!(!check(
            json!({"path": "payload.level", "op": ">", "value": 3})
        ));
    }

    #[test]
    fn combinators() {
        assert!(check(json!({"all": [
            {"path": "event_type", "op": "==", "value": "ai.anomaly"},
            {"any": [{"path": "payload.score", "op": ">", "value": 10},
                     {"not": {"path": "payload.level", "op": "==", "value": "info"}}]}
        ]})));
        assert!(!check(
            json!({"any": [{"path": "payload.score", "op": ">", "value": 10}]})
        ));
    }

    #[test]
    fn errors_name_the_field_and_the_expected_form() {
        let e = Condition::parse(&json!({"all": [
            {"path": "payload.x", "op": "=~", "value": 1},
            {"path": "", "op": "==", "value": 1, "extra": true},
            {"path": "payload.y", "op": "in", "value": 3}
        ]}))
        .unwrap_err();
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"condition.all[0].op"), "{e:?}");
        assert!(fields.contains(&"condition.all[1].extra"), "{e:?}");
        assert!(fields.contains(&"condition.all[1].path"), "{e:?}");
        assert!(fields.contains(&"condition.all[2].value"), "{e:?}");
        assert!(e[0].message.contains("unknown operator '=~'"), "{e:?}");
        assert!(Condition::parse(&json!([1])).is_err());
        assert!(Condition::parse(&json!({"all": []})).is_err());
        assert!(Condition::parse(&json!({"path": "a", "op": "exists", "value": 1})).is_err());
    }
}
