//! Broadcast over sockets (protocol.md §2.3–2.4, §5.1–5.3): `self` and `ack`, topic isolation,
//! order, V1/V2/binary mixing, and the payload cap.

use realtime_protocol::{PayloadEncoding, Vsn};
use realtime_tests::gateway::{Client, Received, TestGateway};
use serde_json::{Value, json};

const ROOM: &str = "realtime:room1";

fn config(ack: bool, self_broadcast: bool) -> Value {
    json!({
        "broadcast": {"ack": ack, "self": self_broadcast},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [],
        "private": false
    })
}

async fn joined(gw: &TestGateway, vsn: Vsn, topic: &str, config: Value) -> (Client, String) {
    let mut c = gw.connect(vsn).await.expect("connect");
    let (jr, _) = c.join_ok(topic, config).await.expect("join");
    (c, jr)
}

#[tokio::test]
async fn self_false_skips_the_sender_and_reaches_the_others() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut b, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    a.broadcast(&ajr, ROOM, "cursor", &json!({"x": 1})).await?;
    // No ack, no self delivery.
    a.expect_nothing().await?;
    let got = b.recv_text().await?;
    assert_eq!(
        got.raw_json(),
        json!([null, null, ROOM, "broadcast", {"type": "broadcast", "event": "cursor", "payload": {"x": 1}}])
    );
    Ok(())
}

#[tokio::test]
async fn self_true_delivers_to_the_sender_and_ack_replies_ok() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(true, true)).await;
    let (mut b, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let r = a.broadcast(&ajr, ROOM, "cursor", &json!({"x": 2})).await?;
    let got = a.sync().await?;
    assert_eq!(got.len(), 2, "{got:?}");
    let frames: Vec<Value> = got.iter().map(|r| r.text().unwrap().raw_json()).collect();
    assert!(
        frames.contains(
            &json!([null, null, ROOM, "broadcast", {"type": "broadcast", "event": "cursor", "payload": {"x": 2}}])
        ),
        "{frames:?}"
    );
    assert!(
        frames.contains(&json!([ajr, r, ROOM, "phx_reply", {"status": "ok", "response": {}}])),
        "{frames:?}"
    );
    assert_eq!(b.recv_text().await?.payload["payload"], json!({"x": 2}));
    Ok(())
}

#[tokio::test]
async fn ack_with_self_false_replies_and_does_not_echo() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V1, ROOM, config(true, false)).await;
    let r = a.broadcast(&ajr, ROOM, "cursor", &json!({})).await?;
    let got = a.sync().await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].text().unwrap().raw_json(),
        json!({"topic": ROOM, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
    );
    Ok(())
}

#[tokio::test]
async fn topics_are_isolated() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut same, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut other, _) = joined(&gw, Vsn::V2, "realtime:room2", config(false, false)).await;
    let (mut prefix, _) = joined(&gw, Vsn::V2, "realtime:room", config(false, false)).await;
    let (mut case, _) = joined(&gw, Vsn::V2, "realtime:ROOM1", config(false, false)).await;
    a.broadcast(&ajr, ROOM, "e", &json!({"n": 1})).await?;
    a.sync().await?;
    assert_eq!(same.recv_text().await?.payload["payload"], json!({"n": 1}));
    other.expect_nothing().await?;
    prefix.expect_nothing().await?;
    case.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn hundred_messages_arrive_in_order_with_payloads_intact() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut v2, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut v1, _) = joined(&gw, Vsn::V1, ROOM, config(false, false)).await;
    let payload = |i: u32| json!({"i": i, "text": "héllo \u{1F600} \"quoted\" \\ \n", "nested": {"a": [1, 2.5, null, true, {"b": "ü"}], "empty": {}}});
    for i in 0..100 {
        a.broadcast(&ajr, ROOM, "seq", &payload(i)).await?;
    }
    for receiver in [&mut v2, &mut v1] {
        for i in 0..100 {
            let got = receiver.recv_text().await?;
            assert_eq!(got.event, "broadcast");
            assert_eq!(got.payload["event"], "seq");
            assert_eq!(got.payload["payload"], payload(i), "message {i}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn json_broadcast_extra_keys_are_relayed_verbatim() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut b, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut c, _) = joined(&gw, Vsn::V1, ROOM, config(false, false)).await;
    let text = format!(
        r#"["{ajr}","9","{ROOM}","broadcast",{{"type":"broadcast","event":"cursor","payload":{{"x":1.50,"y":"é"}},"extra":[1]}}]"#
    );
    a.send_text(&text).await?;
    let got = b.recv_text().await?;
    assert_eq!(
        got.raw,
        format!(
            r#"[null,null,"{ROOM}","broadcast",{{"type":"broadcast","event":"cursor","payload":{{"x":1.50,"y":"é"}},"extra":[1]}}]"#
        ),
        "payload relayed byte for byte"
    );
    let got = c.recv_text().await?;
    assert_eq!(
        got.raw_json(),
        json!({"topic": ROOM, "event": "broadcast", "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1.50, "y": "é"}, "extra": [1]}, "ref": null})
    );
    Ok(())
}

#[tokio::test]
async fn binary_kind3_goes_out_as_kind4_to_v2_and_json_to_v1() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(true, true)).await;
    let (mut v2, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut v1, _) = joined(&gw, Vsn::V1, ROOM, config(false, false)).await;
    let payload = "{\"x\":\"é\"}";
    // realtime-js 2.119 sends {"persist":true} metadata; it is not forwarded.
    let r = a
        .broadcast_binary(
            &ajr,
            ROOM,
            "cursor",
            PayloadEncoding::Json,
            payload.as_bytes(),
            br#"{"persist":true}"#,
        )
        .await?;
    let b = v2.recv_binary().await?;
    assert_eq!(b.topic, ROOM);
    assert_eq!(b.event, "cursor");
    assert_eq!(b.encoding, PayloadEncoding::Json);
    assert!(b.metadata.is_empty(), "client metadata is not forwarded");
    assert_eq!(b.payload, payload.as_bytes());
    let got = v1.recv_text().await?;
    assert_eq!(
        got.raw_json(),
        json!({"topic": ROOM, "event": "broadcast", "payload": {"event": "cursor", "payload": {"x": "é"}, "type": "broadcast"}, "ref": null})
    );
    // The sender (self: true, ack: true) gets its own kind 4 and the ack.
    let got = a.sync().await?;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .any(|g| matches!(g, Received::Binary(b) if b.event == "cursor"))
    );
    assert!(
        got.iter()
            .any(|g| g.text().is_some_and(|t| t.event == "phx_reply"
                && t.msg_ref == json!(r)
                && t.join_ref == json!(ajr)
                && t.status() == Some("ok")))
    );
    Ok(())
}

#[tokio::test]
async fn captured_kind3_frame_is_understood() -> anyhow::Result<()> {
    // protocol.md §2.3, captured from realtime-js 2.119.1: join_ref "6", ref "7".
    let gw = TestGateway::start().await?;
    let mut a = gw.connect(Vsn::V2).await?;
    a.send_text(&format!(
        r#"["6","6","{ROOM}","phx_join",{{"config":{}}}]"#,
        config(true, false)
    ))
    .await?;
    assert_eq!(a.expect_reply("6").await?.status(), Some("ok"));
    let (mut b, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let frame: Vec<u8> = [
        &[0x03, 0x01, 0x01, 0x0e, 0x06, 0x00, 0x01][..],
        b"6",
        b"7",
        b"realtime:room1",
        b"cursor",
        "{\"x\":\"é\"}".as_bytes(),
    ]
    .concat();
    a.send_binary(frame.into()).await?;
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!(["6", "7", ROOM, "phx_reply", {"status": "ok", "response": {}}])
    );
    let got = b.recv_binary().await?;
    assert_eq!(got.topic, ROOM);
    assert_eq!(got.payload_json()?, json!({"x": "é"}));
    Ok(())
}

#[tokio::test]
async fn binary_payload_reaches_v2_and_is_dropped_for_v1() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut v2, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let (mut v1, _) = joined(&gw, Vsn::V1, ROOM, config(false, false)).await;
    let raw = [0u8, 1, 2, 0xff, 0xfe];
    a.broadcast_binary(&ajr, ROOM, "bytes", PayloadEncoding::Binary, &raw, b"")
        .await?;
    let got = v2.recv_binary().await?;
    assert_eq!(
        (got.event.as_str(), got.encoding, got.payload.as_slice()),
        ("bytes", PayloadEncoding::Binary, &raw[..])
    );
    a.sync().await?;
    // Nothing at all for the V1 socket (and certainly no binary frame, which the client would
    // fail on).
    v1.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn v1_sender_reaches_v2_receiver_as_json_array() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut v1, jr) = joined(&gw, Vsn::V1, ROOM, config(false, false)).await;
    let (mut v2, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    v1.broadcast(&jr, ROOM, "hello", &json!({"from": "v1"}))
        .await?;
    let got = v2.recv_text().await?;
    assert_eq!(
        got.raw_json(),
        json!([null, null, ROOM, "broadcast", {"type": "broadcast", "event": "hello", "payload": {"from": "v1"}}])
    );
    Ok(())
}

#[tokio::test]
async fn payload_over_the_cap_is_refused_with_ack() -> anyhow::Result<()> {
    // 1 KB → the cap is 1 × 1000 + 500 bytes.
    let gw = TestGateway::start_with(|c| c.max_payload_size_in_kb = 1).await?;
    let (mut a, ajr) = joined(&gw, Vsn::V2, ROOM, config(true, false)).await;
    let (mut b, _) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let big = "x".repeat(2000);
    let r = a.broadcast(&ajr, ROOM, "big", &json!({"s": big})).await?;
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!([ajr, r, ROOM, "phx_reply", {"status": "error", "response": {"error": "payload_size_exceeded"}}])
    );
    let r = a
        .broadcast_binary(
            &ajr,
            ROOM,
            "big",
            PayloadEncoding::Binary,
            big.as_bytes(),
            b"",
        )
        .await?;
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!([ajr, r, ROOM, "phx_reply", {"status": "error", "response": {"error": "payload_size_exceeded"}}])
    );
    a.sync().await?;
    b.expect_nothing().await?;
    // Under the cap passes.
    let r = a
        .broadcast(&ajr, ROOM, "small", &json!({"s": "x".repeat(900)}))
        .await?;
    assert_eq!(a.expect_reply(&r).await?.status(), Some("ok"));
    assert_eq!(b.recv_text().await?.payload["event"], "small");
    // The socket stays open after a refusal.
    let (mut quiet, qjr) = joined(&gw, Vsn::V2, "realtime:q", config(false, false)).await;
    quiet
        .broadcast(&qjr, "realtime:q", "big", &json!({"s": big}))
        .await?;
    quiet.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn join_reply_comes_before_concurrent_fan_out() -> anyhow::Result<()> {
    // §3.6: the reply is always the first frame of a join, even while the topic is busy.
    let gw = TestGateway::start().await?;
    let (mut publisher, pjr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    let blast = tokio::spawn(async move {
        for i in 0..2000 {
            publisher
                .broadcast(&pjr, ROOM, "busy", &json!({ "i": i }))
                .await
                .expect("send");
        }
        publisher
    });
    for vsn in [Vsn::V2, Vsn::V1, Vsn::V2, Vsn::V1, Vsn::V2] {
        let mut c = gw.connect(vsn).await?;
        let mut config = config(false, false);
        config["presence"] = json!({"key": "k", "enabled": true});
        let jr = c.join(ROOM, &json!({ "config": config })).await?;
        let first = c.recv_text().await?;
        assert_eq!(
            (first.event.as_str(), &first.msg_ref),
            ("phx_reply", &json!(jr)),
            "{}",
            first.raw
        );
        let second = c.recv_text().await?;
        assert_eq!(second.event, "presence_state", "{}", second.raw);
    }
    blast.await?;
    Ok(())
}

#[tokio::test]
async fn fan_out_to_two_hundred_mixed_subscribers() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut subscribers = Vec::new();
    for i in 0..200 {
        let vsn = if i % 2 == 0 { Vsn::V1 } else { Vsn::V2 };
        let (c, _) = joined(&gw, vsn, ROOM, config(false, false)).await;
        subscribers.push(c);
    }
    let (mut publisher, pjr) = joined(&gw, Vsn::V2, ROOM, config(false, false)).await;
    for i in 0..50 {
        if i % 2 == 0 {
            publisher
                .broadcast(&pjr, ROOM, "n", &json!({ "i": i }))
                .await?;
        } else {
            let body = json!({ "i": i }).to_string();
            publisher
                .broadcast_binary(&pjr, ROOM, "n", PayloadEncoding::Json, body.as_bytes(), b"")
                .await?;
        }
    }
    let tasks: Vec<_> = subscribers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0..50u64 {
                    let n = match c.recv().await? {
                        Received::Text(t) => t.payload["payload"]["i"].as_u64(),
                        Received::Binary(b) => b.payload_json()?["i"].as_u64(),
                        Received::Closed(closed) => anyhow::bail!("closed: {closed:?}"),
                    };
                    anyhow::ensure!(n == Some(i), "expected {i}, got {n:?}");
                }
                c.expect_nothing().await
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}
