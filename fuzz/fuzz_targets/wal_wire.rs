//! The shared change log's encoding of transaction parts: decoding never panics on any input, and
//! a part it reads, written again, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_wal_listener::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(tx) = wire::decode(data) {
        let mut out = Vec::new();
        wire::encode(&tx, &mut out);
        let again = wire::decode(&out).expect("what encode writes decodes");
        assert_eq!(again, tx);
    }
});
