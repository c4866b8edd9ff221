//! HTTP besides the WebSocket (protocol.md §5.4): the batch and per-event REST broadcast endpoints
//! under `/api` and `/realtime/v1/api`, their auth and errors, `/healthcheck` and `/metrics`.

use realtime_protocol::{PayloadEncoding, Vsn};
use realtime_tests::gateway::{Client, TestGateway, metric_value};
use serde_json::{Value, json};

const ROOM: &str = "realtime:room1";

fn config() -> Value {
    json!({"broadcast": {"ack": false, "self": false}, "presence": {"key": ""}, "postgres_changes": [], "private": false})
}

async fn subscribers(gw: &TestGateway, topic: &str) -> (Client, Client) {
    let mut v1 = gw.connect(Vsn::V1).await.expect("connect");
    v1.join_ok(topic, config()).await.expect("join");
    let mut v2 = gw.connect(Vsn::V2).await.expect("connect");
    v2.join_ok(topic, config()).await.expect("join");
    (v1, v2)
}

#[tokio::test]
async fn batch_broadcast_reaches_v1_and_v2_as_json() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut v1, mut v2) = subscribers(&gw, ROOM).await;
    let anon = gw.tokens().anon();
    let body = json!({"messages": [
        {"topic": "room1", "event": "cursor", "payload": {"x": 1}, "private": false},
        {"topic": "room1", "event": "with-id", "payload": {"y": "é"}, "id": "5c3e3d1a-6a7f-4a56-9a6b-0d6f2a3b4c5d"},
        {"topic": "elsewhere", "event": "cursor", "payload": {}}
    ]})
    .to_string();
    for path in [
        "/api/broadcast",
        "/realtime/v1/api/broadcast?apikey=x&vsn=2.0.0",
    ] {
        let r = gw
            .request(
                "POST",
                path,
                &[("apikey", &anon), ("content-type", "application/json")],
                body.as_bytes(),
            )
            .await?;
        assert_eq!(r.status, 202, "{path}: {}", r.text());
        assert!(r.body.is_empty());
        assert_eq!(
            v2.recv_text().await?.raw_json(),
            json!([null, null, ROOM, "broadcast", {"event": "cursor", "payload": {"x": 1}, "type": "broadcast"}])
        );
        assert_eq!(
            v2.recv_text().await?.payload,
            json!({"event": "with-id", "payload": {"y": "é"}, "type": "broadcast", "meta": {"id": "5c3e3d1a-6a7f-4a56-9a6b-0d6f2a3b4c5d"}})
        );
        assert_eq!(
            v1.recv_text().await?.raw_json(),
            json!({"topic": ROOM, "event": "broadcast", "payload": {"event": "cursor", "payload": {"x": 1}, "type": "broadcast"}, "ref": null})
        );
        assert_eq!(v1.recv_text().await?.payload["event"], "with-id");
    }
    v1.expect_nothing().await?;
    v2.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn batch_broadcast_auth_and_validation() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let body = json!({"messages": [{"topic": "room1", "event": "e", "payload": {}}]}).to_string();
    let post = |headers: Vec<(&'static str, String)>, body: String| {
        let gw = &gw;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            gw.request("POST", "/api/broadcast", &h, body.as_bytes())
                .await
        }
    };
    let ct = ("content-type", "application/json".to_owned());
    // Unauthenticated, expired, wrongly signed.
    for headers in [
        vec![ct.clone()],
        vec![ct.clone(), ("apikey", gw.tokens().expired(5))],
        vec![ct.clone(), ("apikey", gw.tokens().wrong_secret())],
        vec![
            ct.clone(),
            (
                "authorization",
                format!("Bearer {}", gw.tokens().expired(5)),
            ),
        ],
    ] {
        let r = post(headers.clone(), body.clone()).await?;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.json()?, json!({"message": "Unauthorized"}));
    }
    // Authorization: Bearer is accepted (and preferred over apikey).
    let r = post(
        vec![
            ct.clone(),
            ("apikey", "garbage".to_owned()),
            ("authorization", format!("Bearer {}", gw.tokens().anon())),
        ],
        body.clone(),
    )
    .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    // Validation errors are 422.
    let auth = ("apikey", gw.tokens().anon());
    for bad in [
        json!({"messages": []}),
        json!({}),
        json!({"messages": [{"event": "e", "payload": {}}]}),
        json!({"messages": [{"topic": "room1", "event": "e", "payload": "not an object"}]}),
        json!({"messages": [{"topic": "room1", "payload": {}}]}),
    ] {
        let r = post(vec![ct.clone(), auth.clone()], bad.to_string()).await?;
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        assert!(r.json()?.get("errors").is_some(), "{}", r.text());
    }
    Ok(())
}

#[tokio::test]
async fn single_event_endpoint_json_goes_as_user_broadcast() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut v1, mut v2) = subscribers(&gw, ROOM).await;
    let anon = gw.tokens().anon();
    let r = gw
        .request(
            "POST",
            "/realtime/v1/api/broadcast/room1/events/cursor?apikey=x&vsn=2.0.0",
            &[("apikey", &anon), ("content-type", "application/json")],
            br#"{"a":2}"#,
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    let b = v2.recv_binary().await?;
    assert_eq!(
        (b.topic.as_str(), b.event.as_str(), b.encoding),
        (ROOM, "cursor", PayloadEncoding::Json)
    );
    assert!(b.metadata.is_empty());
    assert_eq!(b.payload_json()?, json!({"a": 2}));
    assert_eq!(
        v1.recv_text().await?.raw_json(),
        json!({"topic": ROOM, "event": "broadcast", "payload": {"event": "cursor", "payload": {"a": 2}, "type": "broadcast"}, "ref": null})
    );
    Ok(())
}

#[tokio::test]
async fn single_event_endpoint_binary_reaches_only_v2() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut v1, mut v2) = subscribers(&gw, ROOM).await;
    let anon = gw.tokens().anon();
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/bytes",
            &[
                ("authorization", &format!("Bearer {anon}")),
                ("content-type", "application/octet-stream"),
            ],
            &[1, 2, 3],
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    let b = v2.recv_binary().await?;
    assert_eq!(
        (b.event.as_str(), b.encoding, b.payload.as_slice()),
        ("bytes", PayloadEncoding::Binary, &[1u8, 2, 3][..])
    );
    v1.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn single_event_endpoint_decodes_percent_encoded_segments() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let topic = "realtime:room 1/x";
    let (_v1, mut v2) = subscribers(&gw, topic).await;
    let anon = gw.tokens().anon();
    let r = gw
        .request(
            "POST",
            "/realtime/v1/api/broadcast/room%201%2Fx/events/ev%20t?apikey=x&vsn=2.0.0",
            &[("apikey", &anon), ("content-type", "application/json")],
            br#"{"a":2}"#,
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    let b = v2.recv_binary().await?;
    assert_eq!((b.topic.as_str(), b.event.as_str()), (topic, "ev t"));
    Ok(())
}

#[tokio::test]
async fn single_event_endpoint_errors() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let anon = gw.tokens().anon();
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[("apikey", &anon), ("content-type", "text/plain")],
            b"hi",
        )
        .await?;
    assert_eq!(r.status, 415);
    assert_eq!(
        r.json()?,
        json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"})
    );
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[("content-type", "application/json")],
            b"{}",
        )
        .await?;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()?, json!({"message": "Unauthorized"}));
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[("apikey", &anon), ("content-type", "application/json")],
            b"{not json",
        )
        .await?;
    assert_eq!(r.status, 422, "{}", r.text());
    // A missing content type is treated as JSON.
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[("apikey", &anon)],
            b"{}",
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    Ok(())
}

#[tokio::test]
async fn healthcheck_answers_ok() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let r = gw.request("GET", "/healthcheck", &[], b"").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    let r = gw.request("GET", "/no/such/path", &[], b"").await?;
    assert_eq!(r.status, 404);
    Ok(())
}

#[tokio::test]
async fn metrics_count_connections_channels_and_messages() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let r = gw.request("GET", "/metrics", &[], b"").await?;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    for series in [
        "realtime_connections",
        "realtime_channels",
        "realtime_messages_in_total",
        "realtime_messages_out_total",
        "realtime_bytes_out_total",
        "realtime_socket_closes_total{reason=\"slow_consumer\"}",
        "realtime_socket_closes_total{reason=\"idle_timeout\"}",
        "realtime_socket_closes_total{reason=\"shutdown\"}",
        "realtime_socket_closes_total{reason=\"client\"}",
    ] {
        assert!(metric_value(&text, series).is_some(), "{series} in\n{text}");
    }
    assert_eq!(metric_value(&text, "realtime_connections"), Some(0.0));

    let mut a = gw.connect(Vsn::V2).await?;
    let (ajr, _) = a.join_ok(ROOM, config()).await?;
    let mut b = gw.connect(Vsn::V1).await?;
    b.join_ok(ROOM, config()).await?;
    b.join_ok("realtime:other", config()).await?;
    a.broadcast(&ajr, ROOM, "e", &json!({"n": 1})).await?;
    b.recv_text().await?;
    let text = gw.metrics().await?;
    assert_eq!(metric_value(&text, "realtime_connections"), Some(2.0));
    assert_eq!(metric_value(&text, "realtime_channels"), Some(3.0));
    assert!(metric_value(&text, "realtime_messages_in_total").unwrap_or(0.0) >= 4.0);
    assert!(metric_value(&text, "realtime_messages_out_total").unwrap_or(0.0) >= 4.0);
    assert!(metric_value(&text, "realtime_bytes_out_total").unwrap_or(0.0) > 0.0);

    // A client close is counted and the gauges come back down.
    a.close().await?;
    drop(a);
    gw.wait_for_metric(
        "realtime_socket_closes_total{reason=\"client\"}",
        std::time::Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await?;
    gw.wait_for_metric(
        "realtime_connections",
        std::time::Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await?;
    assert_eq!(gw.metric("realtime_channels").await?, 2.0);
    Ok(())
}

#[tokio::test]
async fn rest_is_cors_open() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let r = gw
        .request(
            "OPTIONS",
            "/realtime/v1/api/broadcast",
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "apikey, authorization, content-type, x-client-info",
                ),
            ],
            b"",
        )
        .await?;
    assert!(
        r.status == 200 || r.status == 204,
        "{} {}",
        r.status,
        r.text()
    );
    let allowed = r.header("access-control-allow-origin").unwrap_or_default();
    assert!(
        allowed == "*" || allowed == "https://app.example",
        "{allowed:?}"
    );
    let anon = gw.tokens().anon();
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[
                ("origin", "https://app.example"),
                ("apikey", &anon),
                ("content-type", "application/json"),
            ],
            b"{}",
        )
        .await?;
    assert_eq!(r.status, 202);
    assert!(
        r.header("access-control-allow-origin").is_some(),
        "{:?}",
        r.headers
    );
    Ok(())
}

#[tokio::test]
async fn rest_payload_cap_is_a_422() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.max_payload_size_in_kb = 1).await?;
    let (mut v1, mut v2) = subscribers(&gw, ROOM).await;
    let anon = gw.tokens().anon();
    let big = json!({"s": "x".repeat(2000)});
    let body = json!({"messages": [{"topic": "room1", "event": "e", "payload": big}]}).to_string();
    let r = gw
        .request(
            "POST",
            "/api/broadcast",
            &[("apikey", &anon), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        r.json()?,
        json!({"errors": {"messages": [{"payload": ["Payload size exceeds tenant limit"]}]}})
    );
    let r = gw
        .request(
            "POST",
            "/api/broadcast/room1/events/e",
            &[("apikey", &anon), ("content-type", "application/json")],
            big.to_string().as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(
        r.json()?,
        json!({"errors": {"payload": ["Payload size exceeds tenant limit"]}})
    );
    v1.expect_nothing().await?;
    v2.expect_nothing().await?;
    Ok(())
}
