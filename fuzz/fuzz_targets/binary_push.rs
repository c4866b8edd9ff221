//! Binary frames: the kind-3 decoder (client broadcast push) and the kind-4 decoder never panic;
//! a decoded kind 3 re-encodes to the same bytes, and so does a decoded kind 4.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use realtime_protocol::binary;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok(push) = binary::decode(&frame) {
        if push.encoding == binary::PayloadEncoding::Json {
            assert!(serde_json::from_slice::<&serde_json::value::RawValue>(&push.payload).is_ok());
        }
        let again = binary::encode_push(&push).expect("decoded strings fit their length bytes");
        assert_eq!(again, frame);
        assert_eq!(binary::decode(&again).expect("re-decodes"), push);
    }
    if let Ok(b) = binary::decode_user_broadcast(data) {
        let again =
            binary::encode_user_broadcast(b.topic, b.event, b.metadata, b.encoding, b.payload)
                .expect("decoded strings fit their length bytes");
        assert_eq!(&again[..], data);
    }
});
