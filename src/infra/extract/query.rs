//! A query string's decoded pairs deserialized into a route's typed parameters, with messages a
//! client can act on. serde_urlencoded's would name neither the parameter nor what it takes
//! ("invalid digit found in string"), so the pairs go through this small deserializer instead:
//! - an unknown name (on a struct with `deny_unknown_fields`) is
//!   `unknown query parameter 'x'; allowed: a, b`;
//! - a value its type refuses is `<name> <why>`: the parameter types say what follows the name
//!   (`must be an integer from 1 to 100, got '0'`), integers and booleans are parsed here;
//! - the last of a repeated name wins, as it did when these routes read a `HashMap`.

use std::fmt::Display;

use chrono::{DateTime, Utc};
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, forward_to_deserialize_any};

/// Why the parameters were refused: the whole message for the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

impl de::Error for ParamError {
    fn custom<T: Display>(msg: T) -> Self {
        ParamError(msg.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        ParamError(format!(
            "unknown query parameter '{field}'; allowed: {}",
            expected.join(", ")
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        ParamError(format!("query parameter '{field}' is required"))
    }
}

/// `T` from decoded `(name, value)` pairs.
pub fn from_pairs<T: DeserializeOwned>(pairs: Vec<(String, String)>) -> Result<T, ParamError> {
    let mut last: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        match last.iter_mut().find(|(n, _)| *n == name) {
            Some(seen) => seen.1 = value,
            None => last.push((name, value)),
        }
    }
    T::deserialize(MapAccessDeserializer::new(Pairs {
        pairs: last.into_iter(),
        value: None,
    }))
}

/// The pairs as a map whose values' refusals are prefixed with their name.
struct Pairs {
    pairs: std::vec::IntoIter<(String, String)>,
    value: Option<(String, String)>,
}

impl<'de> MapAccess<'de> for Pairs {
    type Error = ParamError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ParamError> {
        let Some((name, text)) = self.pairs.next() else {
            return Ok(None);
        };
        let key = seed.deserialize(name.as_str().into_deserializer())?;
        self.value = Some((name, text));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ParamError> {
        let (name, text) = self.value.take().expect("a value follows its name");
        seed.deserialize(Text(text))
            .map_err(|why| ParamError(format!("{name} {why}")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.pairs.len())
    }
}

/// One parameter's value.
struct Text(String);

/// Deserializer methods that parse the text as `$ty`, refusing it as not `$what`.
macro_rules! parsed {
    ($($method:ident, $visit:ident, $ty:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ParamError> {
            match self.0.parse::<$ty>() {
                Ok(x) => v.$visit(x),
                Err(_) => Err(ParamError(format!(concat!("must be ", $what, ", got '{}'"), self.0))),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Text {
    type Error = ParamError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ParamError> {
        v.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, ParamError> {
        v.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, ParamError> {
        v.visit_newtype_struct(self)
    }

    parsed! {
        deserialize_bool, visit_bool, bool, "true or false";
        deserialize_i16, visit_i16, i16, "an integer";
        deserialize_i32, visit_i32, i32, "an integer";
        deserialize_i64, visit_i64, i64, "an integer";
        deserialize_u16, visit_u16, u16, "a non-negative integer";
        deserialize_u32, visit_u32, u32, "a non-negative integer";
        deserialize_u64, visit_u64, u64, "a non-negative integer";
        deserialize_f64, visit_f64, f64, "a number";
    }

    forward_to_deserialize_any! {
        i8 u8 i128 u128 f32 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// An integer from `MIN` to `MAX`, `DEFAULT` when absent (with `#[serde(default)]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Int<const MIN: i64, const MAX: i64, const DEFAULT: i64>(pub i64);

impl<const MIN: i64, const MAX: i64, const DEFAULT: i64> Default for Int<MIN, MAX, DEFAULT> {
    fn default() -> Self {
        Int(DEFAULT)
    }
}

impl<const MIN: i64, const MAX: i64, const DEFAULT: i64> TryFrom<String>
    for Int<MIN, MAX, DEFAULT>
{
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        v.parse::<i64>()
            .ok()
            .filter(|n| (MIN..=MAX).contains(n))
            .map(Int)
            .ok_or_else(|| format!("must be an integer from {MIN} to {MAX}, got '{v}'"))
    }
}

/// An RFC 3339 timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Time(pub DateTime<Utc>);

impl TryFrom<String> for Time {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        DateTime::parse_from_rfc3339(&v)
            .map(|t| Time(t.with_timezone(&Utc)))
            .map_err(|_| format!("must be an RFC 3339 timestamp, got '{v}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Params {
        #[serde(default)]
        limit: Int<1, 100, 20>,
        from: Option<Time>,
        name: Option<String>,
        #[serde(default)]
        flag: bool,
        n: Option<u32>,
    }

    fn parse(q: &[(&str, &str)]) -> Result<Params, String> {
        let pairs = q.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        from_pairs(pairs.collect()).map_err(|e| e.0)
    }

    #[test]
    fn values_are_typed_and_refusals_name_the_parameter() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.limit.0, p.from, p.name, p.flag, p.n),
            (20, None, None, false, None)
        );
        let p = parse(&[
            ("limit", "7"),
            ("from", "2026-01-01T01:00:00+01:00"),
            ("name", ""),
            ("flag", "true"),
            ("n", "3"),
        ])
        .unwrap();
        assert_eq!(p.limit, Int(7));
        assert_eq!(p.from.unwrap().0.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(p.name.as_deref(), Some(""));
        assert!(p.flag);
        assert_eq!(p.n, Some(3));
        for (q, says) in [
            (
                ("limit", "0"),
                "limit must be an integer from 1 to 100, got '0'",
            ),
            (
                ("limit", "x"),
                "limit must be an integer from 1 to 100, got 'x'",
            ),
            (
                ("from", "yesterday"),
                "from must be an RFC 3339 timestamp, got 'yesterday'",
            ),
            (("flag", "maybe"), "flag must be true or false, got 'maybe'"),
            (("n", "-1"), "n must be a non-negative integer, got '-1'"),
            (
                ("colour", "red"),
                "unknown query parameter 'colour'; allowed: limit, from, name, flag, n",
            ),
        ] {
            assert_eq!(parse(&[q]).unwrap_err(), says);
        }
    }

    #[test]
    fn the_last_of_a_repeated_name_wins() {
        assert_eq!(
            parse(&[("limit", "0"), ("limit", "5")]).unwrap().limit,
            Int(5)
        );
    }
}
