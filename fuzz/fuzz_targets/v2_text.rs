//! V2 text frames (JSON arrays): decoding never panics, and whatever decodes survives an
//! encode → decode round trip with the same refs, topic, event and payload text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_protocol::Vsn;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(m) = Vsn::V2.decode(text) else {
        return;
    };
    let encoded = Vsn::V2.encode(
        m.join_ref.as_ref(),
        m.msg_ref.as_ref(),
        &m.topic,
        &m.event,
        m.payload.get(),
    );
    let back = Vsn::V2
        .decode(&encoded)
        .expect("an encoded V2 frame decodes");
    assert_eq!(back.join_ref, m.join_ref);
    assert_eq!(back.msg_ref, m.msg_ref);
    assert_eq!(back.topic, m.topic);
    assert_eq!(back.event, m.event);
    assert_eq!(back.payload.get(), m.payload.get());
});
