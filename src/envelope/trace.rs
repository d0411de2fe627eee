//! The event's trace context: a W3C `traceparent` (Trace Context, version 00), made, parsed and
//! checked here and nowhere else. It arrives on HTTP requests, is kept in the envelope's
//! `metadata.traceparent`, travels as the bus header of the same name and goes out on each webhook
//! call; `infra::telemetry` only converts it to and from OpenTelemetry contexts.

use uuid::Uuid;

/// The header that carries it, on HTTP requests, bus messages and webhook calls alike.
pub const HEADER: &str = "traceparent";

/// A W3C trace id: 32 hex characters, not all zero.
pub fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// A `traceparent` value checked for shape (version 00).
pub fn is_valid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && is_trace_id(parts[1])
        && parts[2].len() == 16
        && parts[2].bytes().all(|b| b.is_ascii_hexdigit())
        && parts[3].len() == 2
        && parts[3].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The trace id of a valid `traceparent` (for log lines), `None` otherwise.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    is_valid(traceparent).then(|| &traceparent[3..35])
}

/// A `traceparent` from its parts (an OpenTelemetry span context prints them as hex).
pub fn format(
    trace_id: impl std::fmt::Display,
    span_id: impl std::fmt::Display,
    flags: u8,
) -> String {
    format!("00-{trace_id}-{span_id}-{flags:02x}")
}

/// A new span id: 16 hex characters, never all zero (a UUID v7's variant bits see to that).
fn new_span_id() -> String {
    Uuid::now_v7().simple().to_string()[16..].to_string()
}

/// Starts a trace, sampled, for what brought none.
pub fn new_trace() -> String {
    let trace = Uuid::now_v7().simple().to_string();
    format!("00-{trace}-{}-01", new_span_id())
}

/// A sampled `traceparent` in a trace the client named by its id (checked with [`is_trace_id`]).
pub fn for_trace_id(trace_id: &str) -> String {
    format!("00-{}-{}-01", trace_id.to_ascii_lowercase(), new_span_id())
}

/// The trace of `parent` continued with a new span id (its flags kept), or a new trace when
/// `parent` is absent or not a valid `traceparent`.
pub fn child_of(parent: Option<&str>) -> String {
    match parent.filter(|p| is_valid(p)) {
        Some(p) => format!("00-{}-{}-{}", &p[3..35], new_span_id(), &p[53..55]),
        None => new_trace(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_ones_are_valid() {
        for tp in [
            new_trace(),
            for_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736"),
            child_of(None),
        ] {
            assert!(is_valid(&tp), "{tp}");
            assert_eq!(tp.len(), 55);
        }
        assert!(for_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").starts_with("00-4bf92f35"));
        assert_eq!(
            trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_of("garbage"), None);
    }

    #[test]
    fn invalid_ones_are_refused() {
        for bad in [
            "",
            "garbage",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00-0af7651916cd43dd8448eb211c80319x-b7ad6b7169203331-01",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn traceparent_continues_the_events_trace() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_of(Some(parent));
        assert!(child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        let fresh = child_of(Some("garbage"));
        assert_eq!(fresh.len(), 55);
    }
}
