//! Connect-time behaviour (protocol.md §1): paths, `vsn`, connect auth with the exact HTTP statuses
//! and JSON bodies of §1.5, the refusal delay, and the heartbeat replies of §3.2.

use realtime_protocol::Vsn;
use realtime_tests::gateway::{
    Client, Received, SECRET, TestGateway, Tokens, UNSIGNED_TOKEN, WAIT,
};
use serde_json::json;
use std::time::{Duration, Instant};

const SOCKET: &str = "/realtime/v1/websocket";

async fn assert_refused(gw: &TestGateway, path: &str, status: u16, error: &str) {
    let r = gw.upgrade(path, &[]).await.expect("response");
    assert_eq!(r.status, status, "{path}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    assert_eq!(
        r.json().expect("json body"),
        json!({ "error": error }),
        "{path}"
    );
}

#[tokio::test]
async fn every_socket_path_upgrades() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let key = gw.tokens().anon();
    for path in [
        "/realtime/v1/websocket",
        "/socket/websocket",
        "/realtime/v1//websocket",
    ] {
        let mut c = Client::connect(
            &gw.ws_url(&format!("{path}?apikey={key}&vsn=2.0.0")),
            Vsn::V2,
        )
        .await?;
        c.expect_nothing().await?;
    }
    // Without vsn the socket speaks V1.
    let mut c = Client::connect(&gw.ws_url(&format!("{SOCKET}?apikey={key}")), Vsn::V1).await?;
    let hb = c.heartbeat().await?;
    let reply = c.recv_text().await?;
    assert_eq!(reply.msg_ref, json!(hb));
    assert!(reply.raw.starts_with('{'), "V1 object: {}", reply.raw);
    Ok(())
}

#[tokio::test]
async fn accepted_vsn_values() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let key = gw.tokens().anon();
    for (vsn, expect) in [
        ("1.0.0", Vsn::V1),
        ("1.0.7", Vsn::V1),
        ("2.0.0", Vsn::V2),
        ("2.0.3", Vsn::V2),
    ] {
        let r = gw
            .upgrade(&format!("{SOCKET}?apikey={key}&vsn={vsn}"), &[])
            .await?;
        assert_eq!(r.status, 101, "vsn {vsn}");
        let mut c = Client::connect(
            &gw.ws_url(&format!("{SOCKET}?apikey={key}&vsn={vsn}")),
            expect,
        )
        .await?;
        c.expect_nothing().await?;
    }
    Ok(())
}

#[tokio::test]
async fn bad_vsn_is_403_with_empty_body() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let key = gw.tokens().anon();
    for vsn in ["3.0.0", "1.1.0", "2.1.0", "2.0", "x", ""] {
        let r = gw
            .upgrade(&format!("{SOCKET}?apikey={key}&vsn={vsn}"), &[])
            .await?;
        assert_eq!(r.status, 403, "vsn {vsn:?}");
        assert!(r.body.is_empty(), "vsn {vsn:?}: body {:?}", r.text());
    }
    Ok(())
}

#[tokio::test]
async fn connect_auth_errors_have_reference_statuses_and_texts() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let t = Tokens::new(SECRET);
    let q = |key: &str| format!("{SOCKET}?apikey={key}&vsn=2.0.0");
    assert_refused(
        &gw,
        &format!("{SOCKET}?vsn=2.0.0"),
        401,
        "API key is missing",
    )
    .await;
    assert_refused(&gw, &q(&t.expired(30)), 401, "Token has expired").await;
    assert_refused(
        &gw,
        &q(&t.custom(&json!({"exp": 4_102_444_800u64}))),
        401,
        "Fields `role` and `exp` are required in JWT",
    )
    .await;
    assert_refused(
        &gw,
        &q(&t.custom(&json!({"role": "anon"}))),
        401,
        "Fields `role` and `exp` are required in JWT",
    )
    .await;
    assert_refused(
        &gw,
        &q("not-a-jwt"),
        401,
        "The token provided is not a valid JWT",
    )
    .await;
    assert_refused(
        &gw,
        &q(&t.wrong_secret()),
        401,
        "Failed to validate JWT signature",
    )
    .await;
    assert_refused(
        &gw,
        &q(UNSIGNED_TOKEN),
        401,
        "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
    )
    .await;
    assert_eq!(gw.metric("realtime_connections_refused_total").await?, 7.0);
    assert_eq!(gw.metric("realtime_connections").await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn hs384_hs512_and_service_role_are_accepted() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let t = gw.tokens().clone();
    let claims = json!({"role": "authenticated", "sub": "u1", "exp": realtime_tests::gateway::now_secs() + 600});
    for key in [
        t.with_algorithm(jsonwebtoken::Algorithm::HS384, &claims),
        t.with_algorithm(jsonwebtoken::Algorithm::HS512, &claims),
        t.service_role(),
    ] {
        let mut c = gw.connect_with_key(Vsn::V2, &key).await?;
        c.join_ok("realtime:room", json!({})).await?;
    }
    Ok(())
}

#[tokio::test]
async fn x_api_key_header_wins_over_apikey_param() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let good = gw.tokens().anon();
    let bad = gw.tokens().expired(10);
    let r = gw
        .upgrade(
            &format!("{SOCKET}?apikey={bad}&vsn=2.0.0"),
            &[("x-api-key", &good)],
        )
        .await?;
    assert_eq!(r.status, 101, "{}", r.text());
    let r = gw
        .upgrade(
            &format!("{SOCKET}?apikey={good}&vsn=2.0.0"),
            &[("x-api-key", &bad)],
        )
        .await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()?, json!({"error": "Token has expired"}));
    Ok(())
}

#[tokio::test]
async fn refusal_waits_for_the_connect_backoff() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.connect_error_backoff_ms = 400).await?;
    let started = Instant::now();
    let r = gw.upgrade(&format!("{SOCKET}?vsn=2.0.0"), &[]).await?;
    let took = started.elapsed();
    assert_eq!(r.status, 401);
    assert!(took >= Duration::from_millis(400), "refused after {took:?}");
    assert!(took < WAIT, "refused after {took:?}");
    // A good connect is not delayed.
    let started = Instant::now();
    let mut c = gw.connect(Vsn::V2).await?;
    c.expect_nothing().await?;
    assert!(started.elapsed() < Duration::from_millis(400));
    Ok(())
}

#[tokio::test]
async fn heartbeat_replies_v1_and_v2() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;

    let mut v2 = gw.connect(Vsn::V2).await?;
    v2.send_text(r#"[null,"10","phoenix","heartbeat",{}]"#)
        .await?;
    let r = v2.recv_text().await?;
    assert_eq!(
        r.raw_json(),
        json!([null, "10", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );

    let mut v1 = gw.connect(Vsn::V1).await?;
    v1.send_text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"10"}"#)
        .await?;
    let r = v1.recv_text().await?;
    assert_eq!(
        r.raw_json(),
        json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "10"})
    );
    Ok(())
}

#[tokio::test]
async fn refs_are_echoed_as_the_exact_json_value() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut v2 = gw.connect(Vsn::V2).await?;
    v2.send_text(r#"[null,10,"phoenix","heartbeat",{}]"#)
        .await?;
    let r = v2.recv_text().await?;
    assert_eq!(r.msg_ref, json!(10));
    v2.send_text(r#"[null,"a\"b","phoenix","heartbeat",{}]"#)
        .await?;
    let r = v2.recv_text().await?;
    assert_eq!(r.msg_ref, json!("a\"b"));
    // Extra elements are ignored.
    v2.send_text(r#"[null,"7","phoenix","heartbeat",{},"extra"]"#)
        .await?;
    let r = v2.recv_text().await?;
    assert_eq!(r.msg_ref, json!("7"));
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_a_socket_past_the_idle_timeout() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.websocket_idle_timeout_ms = 300).await?;
    let mut c = gw.connect(Vsn::V2).await?;
    let started = Instant::now();
    // Heartbeat every 100 ms for four idle periods: every one is answered.
    while started.elapsed() < Duration::from_millis(1200) {
        let hb = c.heartbeat().await?;
        let r = c.recv_within(Duration::from_millis(500)).await?;
        assert!(
            matches!(&r, Received::Text(t) if t.msg_ref == json!(hb)),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then silence: closed within a few idle periods, with a close frame.
    let (before, closed) = c.drain_until_closed(Duration::from_secs(3)).await?;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(closed.frame, Some((1000, "idle timeout".to_owned())));
    Ok(())
}

#[tokio::test]
async fn vsn_is_checked_before_auth_and_without_the_backoff() -> anyhow::Result<()> {
    // Phoenix negotiates the serializer before the socket's connect callback runs.
    let gw = TestGateway::start_with(|c| c.connect_error_backoff_ms = 1000).await?;
    let started = Instant::now();
    let r = gw.upgrade(&format!("{SOCKET}?vsn=3.0.0"), &[]).await?;
    assert_eq!(r.status, 403);
    assert!(r.body.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn oversized_frame_ends_only_that_socket() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.max_frame_size = 1000).await?;
    let mut big = gw.connect(Vsn::V2).await?;
    let mut other = gw.connect(Vsn::V2).await?;
    let filler = "x".repeat(2000);
    big.send_text(&format!(
        r#"[null,"1","phoenix","heartbeat",{{"f":"{filler}"}}]"#
    ))
    .await?;
    let (before, closed) = big.drain_until_closed(WAIT).await?;
    assert!(before.is_empty(), "{before:?}");
    if let Some((code, _)) = closed.frame {
        assert_eq!(code, 1009, "message too big");
    }
    other.expect_nothing().await?;
    // Under the limit is fine.
    let mut ok = gw.connect(Vsn::V2).await?;
    ok.send_text(&format!(
        r#"[null,"1","phoenix","heartbeat",{{"f":"{}"}}]"#,
        "x".repeat(500)
    ))
    .await?;
    assert_eq!(ok.recv_text().await?.msg_ref, json!("1"));
    Ok(())
}
