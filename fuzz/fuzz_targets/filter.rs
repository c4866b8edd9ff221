//! The Postgres Changes filter syntax, as clients send it (`config.postgres_changes[].filter`):
//! parsing, compiling for every column kind and evaluating never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        realtime_gateway::changes::fuzzing::filter(text);
    }
});
