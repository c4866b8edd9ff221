//! Client payloads: the lenient `phx_join`, `access_token` and `presence` parsers never panic on
//! any JSON value, and every `postgres_changes` entry echoes back as a JSON object with an
//! integer `id`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_protocol::payload::{self, JoinPayload, PresencePush};
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = RawValue::from_string(text.to_owned()) else {
        return;
    };
    let join = JoinPayload::parse(&raw);
    for entry in &join.postgres_changes {
        let echoed = entry.echo_with_id(12345);
        let value: Value = serde_json::from_str(&echoed).expect("echo is JSON");
        assert_eq!(
            value.get("id").and_then(Value::as_u64),
            Some(12345),
            "{echoed}"
        );
    }
    let _ = payload::parse_access_token(&raw);
    let _ = PresencePush::parse(&raw);
});
