//! Property tests: whatever the serializers encode, they decode back to the same message.

use bytes::Bytes;
use proptest::prelude::*;
use realtime_protocol::binary::{self, BinaryPush, PayloadEncoding};
use realtime_protocol::{Ref, Vsn};
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".*".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".*", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn opt_ref() -> impl Strategy<Value = Option<Ref>> {
    prop::option::of(".{0,12}".prop_map(|s| Ref::from_string(&s)))
}

proptest! {
    #[test]
    fn v2_text_round_trip(join_ref in opt_ref(), msg_ref in opt_ref(), topic in ".*", event in ".*", payload in json_value()) {
        let text = Vsn::V2.encode(join_ref.as_ref(), msg_ref.as_ref(), &topic, &event, &payload.to_string());
        let back = Vsn::V2.decode(&text).unwrap();
        prop_assert_eq!(back.join_ref, join_ref);
        prop_assert_eq!(back.msg_ref, msg_ref);
        prop_assert_eq!(back.topic, topic);
        prop_assert_eq!(back.event, event);
        prop_assert_eq!(back.payload.get(), payload.to_string());
    }

    #[test]
    fn v1_text_round_trip(msg_ref in opt_ref(), topic in ".*", event in ".*", payload in json_value()) {
        let text = Vsn::V1.encode(None, msg_ref.as_ref(), &topic, &event, &payload.to_string());
        let back = Vsn::V1.decode(&text).unwrap();
        prop_assert_eq!(back.join_ref, None);
        prop_assert_eq!(back.msg_ref, msg_ref);
        prop_assert_eq!(back.topic, topic);
        prop_assert_eq!(back.event, event);
        prop_assert_eq!(back.payload.get(), payload.to_string());
    }

    #[test]
    fn kind3_round_trip(join_ref in "[^\u{0}]{1,20}", msg_ref in ".{1,20}", topic in ".{0,60}", event in ".{0,60}", json in json_value(), raw in prop::collection::vec(any::<u8>(), 0..64), use_json in any::<bool>()) {
        let (encoding, payload) = if use_json {
            (PayloadEncoding::Json, Bytes::from(json.to_string()))
        } else {
            (PayloadEncoding::Binary, Bytes::from(raw))
        };
        let push = BinaryPush {
            join_ref: Some(Ref::from_string(&join_ref)),
            msg_ref: Some(Ref::from_string(&msg_ref)),
            topic, event, metadata: Bytes::from_static(br#"{"persist":true}"#), encoding, payload,
        };
        let frame = binary::encode_push(&push).unwrap();
        prop_assert_eq!(binary::decode(&frame).unwrap(), push);
    }

    #[test]
    fn kind4_round_trip(topic in ".{0,60}", event in ".{0,60}", payload in prop::collection::vec(any::<u8>(), 0..128)) {
        let frame = binary::encode_user_broadcast(&topic, &event, b"{}", PayloadEncoding::Binary, &payload).unwrap();
        let back = binary::decode_user_broadcast(&frame).unwrap();
        prop_assert_eq!(back.topic, topic.as_str());
        prop_assert_eq!(back.event, event.as_str());
        prop_assert_eq!(back.payload, &payload[..]);
    }

    #[test]
    fn decoders_never_panic(text in ".*", bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = Vsn::V1.decode(&text);
        let _ = Vsn::V2.decode(&text);
        let _ = binary::decode(&Bytes::from(bytes.clone()));
        let _ = binary::decode_user_broadcast(&bytes);
        if let Ok(raw) = serde_json::value::RawValue::from_string(text) {
            let _ = realtime_protocol::payload::JoinPayload::parse(&raw);
        }
    }
}
