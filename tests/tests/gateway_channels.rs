//! The channel lifecycle (protocol.md §3–4, §8.2): join replies and their shapes, error joins,
//! duplicate joins, leave, stale join_refs, unknown events, malformed frames, and channel tokens
//! (refresh, expiry).

use bytes::Bytes;
use realtime_protocol::Vsn;
use realtime_tests::gateway::{Received, TestGateway, WAIT, now_secs};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const ROOM: &str = "realtime:room1";

fn default_config() -> Value {
    json!({
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [],
        "private": false
    })
}

#[tokio::test]
async fn join_reply_shape_v2() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    c.send_text(&format!(
        r#"["6","6","{ROOM}","phx_join",{{"config":{},"access_token":"{}"}}]"#,
        default_config(),
        gw.tokens().anon()
    ))
    .await?;
    let reply = c.recv_text().await?;
    assert_eq!(
        reply.raw_json(),
        json!(["6", "6", ROOM, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
    c.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn join_reply_shape_v1_has_no_join_ref() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V1).await?;
    c.send_text(&format!(
        r#"{{"topic":"{ROOM}","event":"phx_join","payload":{{"config":{}}},"ref":"1","join_ref":"1"}}"#,
        default_config()
    ))
    .await?;
    let reply = c.recv_text().await?;
    assert_eq!(
        reply.raw_json(),
        json!({"topic": ROOM, "event": "phx_reply", "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": "1"})
    );
    Ok(())
}

#[tokio::test]
async fn postgres_changes_entries_are_echoed_with_integer_ids() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let entries = json!([
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.1"},
        {"event": "*", "schema": "public"},
        {"event": "UPDATE", "schema": "public", "table": "todos", "select": ["id", "title"]}
    ]);
    for vsn in [Vsn::V1, Vsn::V2] {
        let mut c = gw.connect(vsn).await?;
        let mut config = default_config();
        config["postgres_changes"] = entries.clone();
        let (join_ref, reply) = c.join_ok(ROOM, config).await?;
        let echoed = reply.response()["postgres_changes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(echoed.len(), 3, "{}", reply.raw);
        for (sent, got) in entries.as_array().unwrap().iter().zip(&echoed) {
            let mut got = got.clone();
            let id = got.as_object_mut().unwrap().remove("id");
            assert!(
                id.as_ref().is_some_and(Value::is_u64),
                "id must be an integer: {id:?}"
            );
            assert_eq!(&got, sent, "entry echoed verbatim plus id");
        }
        // The reply comes first (§3.6); any system message follows it, with the join_ref.
        for r in c.sync().await? {
            let t = r.text().expect("text");
            assert_eq!(t.event, "system", "{t:?}");
            if vsn == Vsn::V2 {
                assert_eq!(t.join_ref, json!(join_ref));
            }
            assert_eq!(t.msg_ref, Value::Null);
            assert_eq!(t.payload["extension"], "postgres_changes");
            assert_eq!(t.payload["channel"], "room1");
        }
    }
    Ok(())
}

#[tokio::test]
async fn unmatched_topic_join_is_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let join_ref = c
        .join("room1", &json!({"config": default_config()}))
        .await?;
    let reply = c.expect_reply(&join_ref).await?;
    assert_eq!(
        reply.raw_json(),
        json!([join_ref, join_ref, "room1", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    Ok(())
}

#[tokio::test]
async fn empty_topic_name_is_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let join_ref = c
        .join("realtime:", &json!({"config": default_config()}))
        .await?;
    let reply = c.expect_reply(&join_ref).await?;
    assert_eq!(reply.join_ref, json!(join_ref));
    assert_eq!(
        reply.payload,
        json!({"status": "error", "response": {"reason": "TopicNameRequired: You must provide a topic name"}})
    );
    c.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn expired_channel_token_is_refused_with_seconds() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let token = gw.tokens().expired(100);
    let join_ref = c
        .join(
            ROOM,
            &json!({"config": default_config(), "access_token": token}),
        )
        .await?;
    let reply = c.expect_reply(&join_ref).await?;
    assert_eq!(reply.status(), Some("error"), "{}", reply.raw);
    let reason = reply.response()["reason"].as_str().unwrap_or_default();
    let n: i64 = reason
        .strip_prefix("InvalidJWTToken: Token has expired ")
        .and_then(|r| r.strip_suffix(" seconds ago"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reason {reason:?}"));
    assert!((100..=105).contains(&n), "{reason}");
    Ok(())
}

#[tokio::test]
async fn bad_channel_tokens_get_reference_reasons() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let t = gw.tokens().clone();
    for (token, reason) in [
        (
            t.custom(&json!({"exp": now_secs() + 60})),
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
        ),
        (
            "garbage".to_owned(),
            "MalformedJWT: The token provided is not a valid JWT",
        ),
        (
            t.wrong_secret(),
            "JwtSignatureError: Failed to validate JWT signature",
        ),
    ] {
        let join_ref = c
            .join(
                ROOM,
                &json!({"config": default_config(), "access_token": token}),
            )
            .await?;
        let reply = c.expect_reply(&join_ref).await?;
        assert_eq!(
            reply.payload,
            json!({"status": "error", "response": {"reason": reason}})
        );
    }
    // sb_ keys are ignored and the connect token is used.
    let join_ref = c
        .join(
            ROOM,
            &json!({"config": default_config(), "access_token": "sb_publishable_x"}),
        )
        .await?;
    assert_eq!(c.expect_reply(&join_ref).await?.status(), Some("ok"));
    Ok(())
}

#[tokio::test]
async fn join_error_reply_waits_for_the_channel_backoff_without_blocking_the_socket()
-> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.channel_error_backoff_ms = 400).await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let started = Instant::now();
    let join_ref = c
        .join("realtime:", &json!({"config": default_config()}))
        .await?;
    // The heartbeat sent after the join is answered first.
    let before = c.sync().await?;
    assert!(before.is_empty(), "{before:?}");
    assert!(started.elapsed() < Duration::from_millis(400));
    let reply = c.expect_reply(&join_ref).await?;
    assert_eq!(reply.status(), Some("error"));
    assert!(started.elapsed() >= Duration::from_millis(400));
    Ok(())
}

#[tokio::test]
async fn duplicate_join_closes_the_old_join_ref() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let (old, _) = c.join_ok(ROOM, default_config()).await?;
    let new = c.join(ROOM, &json!({"config": default_config()})).await?;
    let mut got = [c.recv_text().await?, c.recv_text().await?];
    got.sort_by_key(|t| t.event.clone());
    assert_eq!(
        got[0].raw_json(),
        json!([old, old, ROOM, "phx_close", {}]),
        "old channel closed with ref = join_ref"
    );
    assert_eq!(
        got[1].raw_json(),
        json!([new, new, ROOM, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
    c.expect_nothing().await?;
    assert_eq!(gw.metric("realtime_channels").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn duplicate_join_v1_close_carries_old_ref() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V1).await?;
    let (old, _) = c.join_ok(ROOM, default_config()).await?;
    let new = c.join(ROOM, &json!({"config": default_config()})).await?;
    let mut got = [c.recv_text().await?, c.recv_text().await?];
    got.sort_by_key(|t| t.event.clone());
    assert_eq!(
        got[0].raw_json(),
        json!({"topic": ROOM, "event": "phx_close", "payload": {}, "ref": old})
    );
    assert_eq!(got[1].msg_ref, json!(new));
    Ok(())
}

#[tokio::test]
async fn leave_replies_then_closes_with_join_ref() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let mut other = gw.connect(Vsn::V2).await?;
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    let (ojr, _) = other.join_ok(ROOM, default_config()).await?;
    let leave = c.push(Some(&jr), ROOM, "phx_leave", &json!({})).await?;
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([jr, leave, ROOM, "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([jr, jr, ROOM, "phx_close", {}])
    );
    c.expect_nothing().await?;
    // After leaving, the socket no longer receives the topic's broadcasts.
    other.broadcast(&ojr, ROOM, "e", &json!({})).await?;
    other.sync().await?;
    c.expect_nothing().await?;
    // Leaving a topic that has no channel is answered ok anyway; other events get unmatched topic.
    let r = c
        .push(None, "realtime:nope", "phx_leave", &json!({}))
        .await?;
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([null, r, "realtime:nope", "phx_reply", {"status": "ok", "response": {}}])
    );
    let r = c
        .push(
            None,
            "realtime:nope",
            "broadcast",
            &json!({"type": "broadcast", "event": "e", "payload": {}}),
        )
        .await?;
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([null, r, "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );
    Ok(())
}

#[tokio::test]
async fn leave_v1_shape() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V1).await?;
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    let leave = c.push(Some(&jr), ROOM, "phx_leave", &json!({})).await?;
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!({"topic": ROOM, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": leave})
    );
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!({"topic": ROOM, "event": "phx_close", "payload": {}, "ref": jr})
    );
    Ok(())
}

#[tokio::test]
async fn pushes_with_a_stale_join_ref_are_ignored() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let mut peer = gw.connect(Vsn::V2).await?;
    let ack = json!({"broadcast": {"ack": true, "self": false}, "presence": {"key": ""}, "postgres_changes": [], "private": false});
    let (old, _) = c.join_ok(ROOM, ack.clone()).await?;
    let (new, _) = c.join_ok(ROOM, ack).await?;
    peer.join_ok(ROOM, default_config()).await?;
    c.sync().await?; // the old channel's phx_close
    // A broadcast (JSON and binary) and a leave on the old join_ref: no reply, no delivery, no leave.
    c.broadcast(&old, ROOM, "e", &json!({"n": 1})).await?;
    c.broadcast_binary(
        &old,
        ROOM,
        "e",
        realtime_protocol::PayloadEncoding::Json,
        b"{}",
        b"",
    )
    .await?;
    c.push(Some(&old), ROOM, "phx_leave", &json!({})).await?;
    c.expect_nothing().await?;
    peer.expect_nothing().await?;
    // The current join_ref still works, and so does a null join_ref.
    let r = c.broadcast(&new, ROOM, "e", &json!({"n": 2})).await?;
    assert_eq!(c.expect_reply(&r).await?.status(), Some("ok"));
    let b = peer.recv_text().await?;
    assert_eq!(b.payload["payload"], json!({"n": 2}));
    let r = c
        .push(
            None,
            ROOM,
            "broadcast",
            &json!({"type": "broadcast", "event": "e", "payload": {"n": 3}}),
        )
        .await?;
    assert_eq!(c.expect_reply(&r).await?.status(), Some("ok"));
    assert_eq!(peer.recv_text().await?.payload["payload"], json!({"n": 3}));
    Ok(())
}

#[tokio::test]
async fn unknown_events_on_a_joined_channel_are_ignored() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    c.push(
        Some(&jr),
        ROOM,
        "postgres_changes",
        &json!({"type": "postgres_changes"}),
    )
    .await?;
    c.push(Some(&jr), ROOM, "whatever", &json!({})).await?;
    c.expect_nothing().await?;
    // The channel is still there.
    let leave = c.push(Some(&jr), ROOM, "phx_leave", &json!({})).await?;
    assert_eq!(c.expect_reply(&leave).await?.status(), Some("ok"));
    Ok(())
}

#[tokio::test]
async fn malformed_frames_are_dropped_and_the_socket_keeps_working() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut v2 = gw.connect(Vsn::V2).await?;
    let (jr, _) = v2.join_ok(ROOM, default_config()).await?;
    for bad in [
        "not json",
        "{}",
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}"#,
        "[1,2]",
        r#"[null,"1",5,"heartbeat",{}]"#,
        "",
        "[",
    ] {
        v2.send_text(bad).await?;
    }
    for bad in [
        &[][..],
        &[3, 0, 0][..],
        &[0, 1, 2, 3, 4, 5, 6, 7][..],
        &[4, 0, 0, 0, 1][..],
        &[3, 50, 0, 0, 0, 0, 1, b'x'][..],
    ] {
        v2.send_binary(Bytes::copy_from_slice(bad)).await?;
    }
    v2.expect_nothing().await?;

    let mut v1 = gw.connect(Vsn::V1).await?;
    for bad in [
        "[null,\"1\",\"phoenix\",\"heartbeat\",{}]",
        r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#,
        r#"{"topic":"phoenix","payload":{},"ref":"1"}"#,
        r#"{"event":"heartbeat","payload":{},"ref":"1"}"#,
        r#"{"topic":"phoenix","event":"heartbeat","ref":"1"}"#,
        "{",
    ] {
        v1.send_text(bad).await?;
    }
    // Binary on a V1 socket is dropped too.
    v1.send_binary(Bytes::from_static(&[3, 0, 0, 0, 0, 0, 1, b'{', b'}']))
        .await?;
    v1.expect_nothing().await?;

    // Both sockets still work.
    let leave = v2.push(Some(&jr), ROOM, "phx_leave", &json!({})).await?;
    assert_eq!(v2.expect_reply(&leave).await?.status(), Some("ok"));
    v1.join_ok(ROOM, default_config()).await?;
    let malformed = gw.metric("realtime_malformed_messages_total").await?;
    assert_eq!(malformed, 19.0);
    Ok(())
}

#[tokio::test]
async fn access_token_refresh_is_never_answered_and_keeps_the_channel() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let mut peer = gw.connect(Vsn::V2).await?;
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    peer.join_ok(ROOM, default_config()).await?;
    let t = gw.tokens().clone();
    for token in [t.anon(), t.service_role(), "sb_publishable_x".to_owned()] {
        c.push(
            Some(&jr),
            ROOM,
            "access_token",
            &json!({"access_token": token}),
        )
        .await?;
    }
    c.push(
        Some(&jr),
        ROOM,
        "access_token",
        &json!({"access_token": null}),
    )
    .await?;
    c.expect_nothing().await?;
    // Still joined: receives a broadcast.
    peer.push(
        None,
        ROOM,
        "broadcast",
        &json!({"type": "broadcast", "event": "e", "payload": {"k": 1}}),
    )
    .await?;
    let b = c.recv_text().await?;
    assert_eq!(
        (b.event.as_str(), &b.payload["payload"]),
        ("broadcast", &json!({"k": 1}))
    );
    Ok(())
}

#[tokio::test]
async fn expired_refresh_token_closes_the_channel_with_system_then_phx_close() -> anyhow::Result<()>
{
    let gw = TestGateway::start().await?;
    for vsn in [Vsn::V2, Vsn::V1] {
        let mut c = gw.connect(vsn).await?;
        let (jr, _) = c.join_ok(ROOM, default_config()).await?;
        let token = gw.tokens().expired(42);
        c.push(
            Some(&jr),
            ROOM,
            "access_token",
            &json!({"access_token": token}),
        )
        .await?;
        let system = c.recv_text().await?;
        assert_eq!(system.event, "system", "{}", system.raw);
        if vsn == Vsn::V2 {
            assert_eq!(system.join_ref, json!(jr));
        }
        assert_eq!(system.msg_ref, Value::Null);
        let message = system.payload["message"].as_str().unwrap_or_default();
        let n: i64 = message
            .strip_prefix("Token has expired ")
            .and_then(|r| r.strip_suffix(" seconds ago"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected message {message:?}"));
        assert!((42..=46).contains(&n), "{message}");
        assert_eq!(system.payload["extension"], "system");
        assert_eq!(system.payload["status"], "error");
        assert_eq!(system.payload["channel"], "room1");
        let close = c.recv_text().await?;
        assert_eq!(close.event, "phx_close");
        assert_eq!(close.msg_ref, json!(jr));
        assert_eq!(close.payload, json!({}));
        c.expect_nothing().await?;
    }
    Ok(())
}

#[tokio::test]
async fn invalid_refresh_tokens_close_the_channel_with_the_reason() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    for (token, message) in [
        (
            gw.tokens().custom(&json!({"exp": now_secs() + 60})),
            "Fields `role` and `exp` are required in JWT",
        ),
        ("".to_owned(), "The token provided is not a valid JWT"),
    ] {
        let (jr, _) = c.join_ok(ROOM, default_config()).await?;
        c.push(
            Some(&jr),
            ROOM,
            "access_token",
            &json!({"access_token": token}),
        )
        .await?;
        let system = c.recv_text().await?;
        assert_eq!(system.event, "system");
        assert_eq!(system.payload["message"], message);
        let close = c.recv_text().await?;
        assert_eq!(close.raw_json(), json!([jr, jr, ROOM, "phx_close", {}]));
    }
    Ok(())
}

#[tokio::test]
async fn channel_closes_when_its_token_expires() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let token = gw.tokens().expiring_in(2);
    let jr = c
        .join(
            ROOM,
            &json!({"config": default_config(), "access_token": token}),
        )
        .await?;
    assert_eq!(c.expect_reply(&jr).await?.status(), Some("ok"));
    let started = Instant::now();
    let system = c.recv_within(WAIT).await?;
    let Received::Text(system) = system else {
        panic!("{system:?}")
    };
    assert_eq!(system.event, "system", "{}", system.raw);
    let message = system.payload["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Token has expired ") && message.ends_with(" seconds ago"),
        "{message}"
    );
    assert!(started.elapsed() <= Duration::from_secs(3));
    let close = c.recv_text().await?;
    assert_eq!(close.raw_json(), json!([jr, jr, ROOM, "phx_close", {}]));
    // The socket itself stays open.
    c.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn refresh_moves_the_expiry() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let jr = c
        .join(
            ROOM,
            &json!({"config": default_config(), "access_token": gw.tokens().expiring_in(2)}),
        )
        .await?;
    assert_eq!(c.expect_reply(&jr).await?.status(), Some("ok"));
    c.push(
        Some(&jr),
        ROOM,
        "access_token",
        &json!({"access_token": gw.tokens().anon()}),
    )
    .await?;
    // Past the first token's expiry, nothing arrives (the wait is the assertion).
    match c.recv_within(Duration::from_millis(3500)).await {
        Err(_) => {}
        Ok(r) => panic!("channel closed although its token was refreshed: {r:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn channels_per_socket_are_capped() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.max_channels_per_client = 2).await?;
    let mut c = gw.connect(Vsn::V2).await?;
    c.join_ok("realtime:a", default_config()).await?;
    c.join_ok("realtime:b", default_config()).await?;
    let jr = c
        .join("realtime:c", &json!({"config": default_config()}))
        .await?;
    assert_eq!(
        c.expect_reply(&jr).await?.payload,
        json!({"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}})
    );
    // Rejoining a topic already joined is not a new channel.
    let (_, reply) = c.join_ok("realtime:b", default_config()).await?;
    assert_eq!(reply.status(), Some("ok"));
    Ok(())
}

#[tokio::test]
async fn replay_on_a_public_channel_is_refused() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let mut config = default_config();
    config["broadcast"]["replay"] = json!({"since": 1_763_407_103_911u64, "limit": 10});
    let jr = c.join(ROOM, &json!({"config": config})).await?;
    assert_eq!(
        c.expect_reply(&jr).await?.payload,
        json!({"status": "error", "response": {"reason": "UnableToReplayMessages: Replay is not allowed for public channels"}})
    );
    Ok(())
}

#[tokio::test]
async fn lenient_join_payload_booleans_and_unknown_keys() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut a = gw.connect(Vsn::V2).await?;
    // String booleans in any case, unknown keys, and a version field are all accepted.
    let config = json!({
        "broadcast": {"ack": "TRUE", "self": "true", "unknown": 1},
        "presence": {"key": "k", "enabled": "True"},
        "postgres_changes": [],
        "private": "false",
        "something_new": {"x": 1}
    });
    let jr = a
        .join(
            ROOM,
            &json!({"config": config, "version": "realtime-js/2.119.1", "extra": true}),
        )
        .await?;
    assert_eq!(a.expect_reply(&jr).await?.status(), Some("ok"));
    assert_eq!(
        a.recv_text().await?.event,
        "presence_state",
        "presence enabled by \"True\""
    );
    let r = a.broadcast(&jr, ROOM, "e", &json!({})).await?;
    // self and ack from string booleans: the own broadcast and the ack.
    let got = a.sync().await?;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().any(|g| g.is_event(ROOM, "broadcast")));
    assert!(
        got.iter()
            .any(|g| g.text().is_some_and(|t| t.msg_ref == json!(r)))
    );
    Ok(())
}

/// The reference closes with the inspected atom `:signature_error` (protocol.md §3.5), which tells
/// a developer nothing; the gateway says which check failed, in the words it uses at connect.
#[tokio::test]
async fn refresh_with_a_bad_signature_closes_saying_the_signature_failed() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    let token = gw.tokens().wrong_secret();
    c.push(
        Some(&jr),
        ROOM,
        "access_token",
        &json!({"access_token": token}),
    )
    .await?;
    let system = c.recv_text().await?;
    assert_eq!(
        system.raw_json(),
        json!([jr, null, ROOM, "system", {"extension": "system", "status": "error", "message": "Failed to validate JWT signature", "channel": "room1"}])
    );
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([jr, jr, ROOM, "phx_close", {}])
    );
    Ok(())
}

#[tokio::test]
async fn connect_token_expiry_closes_channels_that_use_it() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let key = gw.tokens().expiring_in(2);
    let mut c = gw.connect_with_key(Vsn::V2, &key).await?;
    // No access_token: the connect token is the channel token.
    let (jr, _) = c.join_ok(ROOM, default_config()).await?;
    let system = c.recv_within(WAIT).await?;
    let system = system.text().cloned().expect("system frame");
    assert_eq!(system.event, "system", "{}", system.raw);
    assert!(
        system.payload["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Token has expired ")),
        "{}",
        system.raw
    );
    assert_eq!(
        c.recv_text().await?.raw_json(),
        json!([jr, jr, ROOM, "phx_close", {}])
    );
    // The socket stays open.
    c.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn user_token_wins_over_access_token() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let jr = c
        .join(
            ROOM,
            &json!({"config": default_config(), "access_token": gw.tokens().anon(), "user_token": gw.tokens().expired(60)}),
        )
        .await?;
    let reply = c.expect_reply(&jr).await?;
    assert_eq!(reply.status(), Some("error"), "{}", reply.raw);
    assert!(
        reply.response()["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("InvalidJWTToken: Token has expired ")),
        "{}",
        reply.raw
    );
    Ok(())
}

#[tokio::test]
async fn one_socket_many_channels_leave_one_keeps_the_others() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let (a, _) = c.join_ok("realtime:a", default_config()).await?;
    let (b, _) = c.join_ok("realtime:b", default_config()).await?;
    assert_ne!(a, b);
    let mut peer = gw.connect(Vsn::V1).await?;
    let (pa, _) = peer.join_ok("realtime:a", default_config()).await?;
    let (pb, _) = peer.join_ok("realtime:b", default_config()).await?;
    let leave = c
        .push(Some(&a), "realtime:a", "phx_leave", &json!({}))
        .await?;
    c.expect_reply(&leave).await?;
    c.expect_event("realtime:a", "phx_close").await?;
    peer.broadcast(&pa, "realtime:a", "e", &json!({"to": "a"}))
        .await?;
    peer.broadcast(&pb, "realtime:b", "e", &json!({"to": "b"}))
        .await?;
    peer.sync().await?;
    let got = c.sync().await?;
    assert_eq!(got.len(), 1, "{got:?}");
    let t = got[0].text().expect("text");
    assert_eq!(
        (t.topic.as_str(), &t.payload["payload"]),
        ("realtime:b", &json!({"to": "b"}))
    );
    assert_eq!(gw.metric("realtime_channels").await?, 3.0);
    Ok(())
}

#[tokio::test]
async fn invalid_join_payloads_are_not_rejected() -> anyhow::Result<()> {
    // §4.1: InvalidJoinPayload is logged and the join goes on with what could be cast.
    let gw = TestGateway::start().await?;
    let mut c = gw.connect(Vsn::V2).await?;
    for (i, payload) in [
        json!("not an object"),
        json!({"config": null}),
        json!({"config": {"broadcast": "nope", "presence": 7, "postgres_changes": "x"}}),
        json!({}),
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("realtime:lenient{i}");
        let jr = c.join(&topic, &payload).await?;
        let reply = c.expect_reply(&jr).await?;
        assert_eq!(reply.status(), Some("ok"), "{payload}: {}", reply.raw);
    }
    Ok(())
}
