//! A client's request body, as ingestion reads it: any bytes that parse as JSON go through
//! `validate_request`. Checked beyond "does not panic": what is admitted round-trips through
//! the bus encoding unchanged, a catalogue type's payload reads into its type (what ingestion
//! admits, consumers can read), and a refusal always names at least one field.
#![no_main]

use chrono::DateTime;
use cornjacket::envelope::catalogue::{self, Payload};
use cornjacket::envelope::{Envelope, Rules, Source, Submission, validate_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The consumers' decoder sees bus messages, which may be anything.
    let _ = Envelope::decode(data);
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let now = DateTime::from_timestamp(1_780_000_000, 0).unwrap();
    for (strict, source) in [(false, Source::Http), (true, Source::Mqtt)] {
        let sub = Submission {
            source,
            subject: Some("fuzz".into()),
            traceparent: None,
            aggregate_id: (source == Source::Mqtt).then(|| "dev-1".to_string()),
            ai_allowed: source == Source::Http,
        };
        match validate_request(
            &body,
            &sub,
            Rules {
                strict_types: strict,
            },
            now,
        ) {
            Ok(env) => {
                let again = Envelope::decode(env.to_json().as_bytes()).expect("admitted decodes");
                assert_eq!(again, env, "the bus encoding round-trips");
                let p = &env.payload;
                let readable = match env.event_type.as_str() {
                    catalogue::SensorReading::EVENT_TYPE => {
                        catalogue::SensorReading::read(p).map(drop)
                    }
                    catalogue::UserLogin::EVENT_TYPE => catalogue::UserLogin::read(p).map(drop),
                    catalogue::SystemAlert::EVENT_TYPE => catalogue::SystemAlert::read(p).map(drop),
                    catalogue::AiAnomaly::EVENT_TYPE => catalogue::AiAnomaly::read(p).map(drop),
                    catalogue::DeviceInactive::EVENT_TYPE => {
                        catalogue::DeviceInactive::read(p).map(drop)
                    }
                    catalogue::DeviceActive::EVENT_TYPE => {
                        catalogue::DeviceActive::read(p).map(drop)
                    }
                    _ => Ok(()),
                };
                assert!(readable.is_ok(), "admitted but unreadable: {readable:?}");
            }
            Err(errors) => assert!(!errors.is_empty(), "a refusal names what is wrong"),
        }
    }
});
