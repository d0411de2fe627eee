//! The states a delivery and an endpoint's breaker can be in, named once for Rust, the
//! database (`text` columns with CHECK constraints, migrations/actions/V1) and the API. Static
//! SQL still spells them as literals: the partial indexes on `status IN ('pending',
//! 'delivering')` only serve queries that say so literally.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a delivery is in its course (`actions.deliveries.status`). Deserialized from a query
/// parameter's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case", try_from = "String")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub(super) enum DeliveryStatus {
    /// Due at `next_attempt_at`.
    Pending,
    /// Claimed by a worker until `next_attempt_at`.
    Delivering,
    Delivered,
    /// Out of retries.
    Failed,
    /// The rule already fired for the same type and aggregate within its window.
    Deduplicated,
    /// Short-circuited by the endpoint's breaker.
    CircuitOpen,
    /// The rule was deleted or disabled before the call.
    Cancelled,
}

impl DeliveryStatus {
    pub(super) const ALL: [Self; 7] = [
        Self::Pending,
        Self::Delivering,
        Self::Delivered,
        Self::Failed,
        Self::Deduplicated,
        Self::CircuitOpen,
        Self::Cancelled,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivering => "delivering",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Deduplicated => "deduplicated",
            Self::CircuitOpen => "circuit_open",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An endpoint's circuit breaker (`actions.endpoint_health.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub(super) enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are short-circuited until `open_until`.
    Open,
    /// One trial call is in progress.
    HalfOpen,
}

impl BreakerState {
    #[cfg(test)]
    const ALL: [Self; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a delivery status")]
pub(super) struct UnknownStatus(String);

impl FromStr for DeliveryStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

impl TryFrom<String> for DeliveryStatus {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse().map_err(|_| {
            let names: Vec<_> = Self::ALL.map(Self::as_str).into();
            format!("must be one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../migrations/actions/V1__rules_and_deliveries.sql");

    /// The quoted values of the first `CHECK (<column> IN (...))` in the schema.
    fn allowed(column: &str) -> Vec<&'static str> {
        let start = SCHEMA
            .find(&format!("CHECK ({column} IN"))
            .unwrap_or_else(|| panic!("no CHECK on {column}"));
        let list = &SCHEMA[start..];
        let list = &list[..list.find("))").expect("CHECK closes")];
        list.split('\'').skip(1).step_by(2).collect()
    }

    #[test]
    fn names_are_the_schemas_and_the_apis() {
        let statuses: Vec<_> = DeliveryStatus::ALL.map(DeliveryStatus::as_str).into();
        assert_eq!(statuses, allowed("status"));
        let states: Vec<_> = BreakerState::ALL.map(BreakerState::as_str).into();
        assert_eq!(states, allowed("state"));
        for s in DeliveryStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(s.as_str().parse::<DeliveryStatus>().unwrap(), s);
        }
        for s in BreakerState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("circuit-open".parse::<DeliveryStatus>().is_err());
    }
}
