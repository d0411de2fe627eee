//! A rule's condition, as the actions API parses it, evaluated against an envelope: the input's
//! first line is the condition's JSON, the rest the envelope's. Parsing either refuses with at
//! least one field or gives a condition that evaluates without panicking, whatever the
//! envelope holds (any JSON, however deep).
#![no_main]

use cornjacket::services::actions::condition::Condition;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cond, env) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    let Ok(cond) = serde_json::from_slice::<serde_json::Value>(cond) else {
        return;
    };
    let env = serde_json::from_slice::<serde_json::Value>(env).unwrap_or_default();
    match Condition::parse(&cond) {
        Ok(c) => {
            let _ = c.matches(&env);
        }
        Err(errors) => assert!(!errors.is_empty(), "a refusal names what is wrong"),
    }
});
