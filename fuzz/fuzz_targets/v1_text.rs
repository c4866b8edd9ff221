//! V1 text frames (JSON objects): decoding never panics, and whatever decodes survives an
//! encode → decode round trip with the same topic, event, ref and payload text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_protocol::Vsn;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(m) = Vsn::V1.decode(text) else {
        return;
    };
    // The V1 serializer never writes join_ref.
    let encoded = Vsn::V1.encode(
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        &m.event,
        m.payload.get(),
    );
    let back = Vsn::V1
        .decode(&encoded)
        .expect("an encoded V1 frame decodes");
    assert_eq!(back.topic, m.topic);
    assert_eq!(back.event, m.event);
    assert_eq!(back.msg_ref, m.msg_ref);
    assert!(back.join_ref.is_none());
    assert_eq!(back.payload.get(), m.payload.get());
});
