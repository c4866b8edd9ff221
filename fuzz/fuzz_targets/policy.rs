//! Row policies as `pg_get_expr` prints them (read from the database): compiling and deciding a
//! row for a caller never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        realtime_gateway::changes::fuzzing::policy(text);
    }
});
