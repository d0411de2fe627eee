//! An event's bus message (SPEC §5): keyed by its aggregate id (so an aggregate's events share a
//! partition and keep their order), the envelope JSON as its body, and headers naming its type,
//! its id and its trace context, plus a marker when it is sent again. Every publisher (the outbox
//! processor, `cornjacket replay`, the bus recovery, a dead-letter replay) builds it here, and
//! every consumer reads its headers here.

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;

/// The header names.
pub mod header {
    pub const EVENT_TYPE: &str = "event_type";
    pub const EVENT_ID: &str = "event_id";
    pub const TRACEPARENT: &str = crate::envelope::trace::HEADER;
    /// Present on what is replayed (`cornjacket replay`, a dead-letter replay): an old event,
    /// not news.
    pub const REPLAY: &str = "cj-replay";
    /// Present on what the bus recovery republished after a broker lost it.
    pub const REDELIVERY: &str = "cj-redelivery";
}

/// Why an event is on the bus again, and the marker header that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// `cornjacket replay` republished it from the event store.
    Replay,
    /// A dead letter handed back to its consumer's sink.
    DeadLetter,
    /// The bus recovery republished it after the broker lost it.
    BusRecovery,
}

impl Resend {
    fn header(self) -> (&'static str, &'static str) {
        match self {
            Self::Replay => (header::REPLAY, "1"),
            Self::DeadLetter => (header::REPLAY, "dlq"),
            Self::BusRecovery => (header::REDELIVERY, "bus-recovery"),
        }
    }

    /// The marker alone: the headers of a dead letter handed back to its sink, which reads no
    /// other header of it.
    pub fn headers(self) -> OwnedHeaders {
        let (key, value) = self.header();
        OwnedHeaders::new().insert(Header {
            key,
            value: Some(value),
        })
    }
}

/// One event on its way to the bus.
#[derive(Debug, Clone, Copy)]
pub struct EventMessage<'a> {
    pub event_type: &'a str,
    pub event_id: &'a str,
    pub aggregate_id: &'a str,
    /// The envelope JSON.
    pub body: &'a str,
    pub traceparent: Option<&'a str>,
    pub resend: Option<Resend>,
}

impl<'a> EventMessage<'a> {
    /// The record for `topic` (the event type's, `Topics::for_event_type`).
    pub fn record(&self, topic: &'a str) -> FutureRecord<'a, str, str> {
        FutureRecord::to(topic)
            .key(self.aggregate_id)
            .payload(self.body)
            .headers(self.headers())
    }

    /// `event_type`, `event_id`, the trace context when there is one, then the resend marker.
    fn headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: header::EVENT_TYPE,
                value: Some(self.event_type),
            })
            .insert(Header {
                key: header::EVENT_ID,
                value: Some(self.event_id),
            });
        if let Some(tp) = self.traceparent {
            headers = headers.insert(Header {
                key: header::TRACEPARENT,
                value: Some(tp),
            });
        }
        if let Some(r) = self.resend {
            let (key, value) = r.header();
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers
    }
}

/// The first header `name` of a received message, when it is UTF-8.
pub fn header<'m, M: Message>(m: &'m M, name: &str) -> Option<&'m str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The trace context the publisher sent (not checked: telemetry ignores an invalid one).
pub fn traceparent<M: Message>(m: &M) -> Option<&str> {
    header(m, header::TRACEPARENT)
}

/// Whether the message is a replay (`cornjacket replay` or a dead-letter replay).
pub fn is_replay<M: Message>(m: &M) -> bool {
    header(m, header::REPLAY).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn received(headers: OwnedHeaders) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        )
    }

    #[test]
    fn what_publishers_write_consumers_read() {
        let msg = EventMessage {
            event_type: "sensor.reading",
            event_id: "id-1",
            aggregate_id: "dev-1",
            body: "{}",
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            resend: Some(Resend::Replay),
        };
        let record = msg.record("sensor-events");
        assert_eq!(record.key, Some("dev-1"));
        let m = received(record.headers.clone().unwrap());
        let all: Vec<(&str, &str)> = m
            .headers()
            .unwrap()
            .iter()
            .map(|h| (h.key, std::str::from_utf8(h.value.unwrap()).unwrap()))
            .collect();
        assert_eq!(
            all,
            [
                ("event_type", "sensor.reading"),
                ("event_id", "id-1"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                ),
                ("cj-replay", "1"),
            ]
        );
        assert_eq!(traceparent(&m), msg.traceparent);
        assert!(is_replay(&m));

        let dlq = received(Resend::DeadLetter.headers());
        assert!(is_replay(&dlq));
        assert_eq!(traceparent(&dlq), None);
        let recovered = received(Resend::BusRecovery.headers());
        assert!(!is_replay(&recovered));
        assert_eq!(header(&recovered, header::REDELIVERY), Some("bus-recovery"));
    }
}
