//! pgoutput messages and Postgres value text: the decoder and the JSON conversion never panic on any
//! input, a decoded message is the only thing the input held, and every JSON the value conversion
//! writes parses.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use realtime_wal_listener::pgoutput;
use realtime_wal_listener::value::{self, ValueKind};

fuzz_target!(|data: &[u8]| {
    let _ = pgoutput::decode(Bytes::copy_from_slice(data));

    // First byte picks a value kind, the rest is the value's text.
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let scalar = match selector % 8 {
        0 => ValueKind::Number,
        1 => ValueKind::Bool,
        2 => ValueKind::Json,
        3 => ValueKind::Date,
        4 => ValueKind::Timestamp,
        5 => ValueKind::TimestampTz,
        6 => ValueKind::Bytea,
        _ => ValueKind::Text,
    };
    let kind = if selector & 0x10 != 0 {
        ValueKind::Array {
            element: Box::new(scalar),
            delimiter: if selector & 0x20 != 0 { b';' } else { b',' },
        }
    } else {
        scalar
    };
    let mut out = Vec::new();
    value::write_json(&mut out, &kind, text);
    // serde_json refuses numbers whose exponent no f64 holds (`1E1111211122`), which JSON's
    // grammar allows and Postgres's `json` keeps as written: only syntax errors count.
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out) {
        assert!(
            e.to_string().starts_with("number out of range"),
            "invalid json {:?} for {kind:?} {text:?}: {e}",
            String::from_utf8_lossy(&out)
        );
    }
});
