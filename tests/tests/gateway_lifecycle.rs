//! How sockets end (protocol.md §1.6, issue 2's fan-out rules): the idle timeout, the
//! slow-consumer rule (a socket that does not drain is closed and never slows the others), and
//! graceful shutdown (every socket gets a close frame; `run` returns within its deadline).

use realtime_protocol::Vsn;
use realtime_tests::gateway::{Client, Received, TestGateway};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const ROOM: &str = "realtime:room1";

fn config(presence_key: &str) -> Value {
    json!({
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": presence_key, "enabled": !presence_key.is_empty()},
        "postgres_changes": [],
        "private": false
    })
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_socket() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.websocket_idle_timeout_ms = 300).await?;
    let started = Instant::now();
    let mut silent = gw.connect(Vsn::V2).await?;
    let (before, closed) = silent.drain_until_closed(Duration::from_secs(5)).await?;
    let took = started.elapsed();
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(closed.frame, Some((1000, "idle timeout".to_owned())));
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    gw.wait_for_metric(
        "realtime_socket_closes_total{reason=\"idle_timeout\"}",
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn idle_timeout_of_a_joined_socket_removes_its_presence() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.websocket_idle_timeout_ms = 500).await?;
    let mut silent = gw.connect(Vsn::V2).await?;
    let (sjr, _) = silent.join_ok(ROOM, config("sleeper")).await?;
    silent
        .push(
            Some(&sjr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "track", "payload": {"z": 1}}),
        )
        .await?;
    let mut awake = gw.connect(Vsn::V2).await?;
    awake.join_ok(ROOM, config("awake")).await?;
    // Keep `awake` alive with heartbeats while waiting for the sleeper's leave.
    let deadline = Instant::now() + Duration::from_secs(5);
    let leave = loop {
        assert!(Instant::now() < deadline, "no leave for the idle socket");
        awake.heartbeat().await?;
        match awake.recv_within(Duration::from_millis(150)).await {
            Ok(Received::Text(t))
                if t.event == "presence_diff" && t.payload["leaves"].get("sleeper").is_some() =>
            {
                break t;
            }
            Ok(Received::Closed(c)) => panic!("awake socket closed: {c:?}"),
            _ => {}
        }
    };
    assert_eq!(leave.payload["joins"], json!({}));
    let (_, closed) = silent.drain_until_closed(Duration::from_secs(1)).await?;
    assert_eq!(closed.frame, Some((1000, "idle timeout".to_owned())));
    Ok(())
}

/// Receives `n` broadcasts on `c`, checking their sequence numbers continue from `next`.
async fn receive_in_order(c: &mut Client, next: &mut u64, n: u64) -> anyhow::Result<()> {
    for _ in 0..n {
        let got = match c.recv().await? {
            Received::Text(t) => t.payload["payload"]["i"].as_u64(),
            Received::Binary(b) => b.payload_json()?["i"].as_u64(),
            Received::Closed(closed) => {
                anyhow::bail!("fast subscriber closed at message {next}: {closed:?}")
            }
        };
        anyhow::ensure!(got == Some(*next), "expected message {next}, got {got:?}");
        *next += 1;
    }
    Ok(())
}

#[tokio::test]
async fn slow_consumer_is_closed_and_the_others_get_everything() -> anyhow::Result<()> {
    // The frame bound trips first (64 × 16 KB < 2 MB).
    slow_consumer(64, 2 * 1024 * 1024).await
}

#[tokio::test]
async fn slow_consumer_by_bytes_is_closed_and_the_others_get_everything() -> anyhow::Result<()> {
    // The byte bound trips first (24 × 16 KB > 256 KB).
    slow_consumer(100_000, 256 * 1024).await
}

async fn slow_consumer(max_frames: usize, max_bytes: usize) -> anyhow::Result<()> {
    const WINDOW: u64 = 12;
    let gw = TestGateway::start_with(|c| {
        c.outbox_max_frames = max_frames;
        c.outbox_max_bytes = max_bytes;
    })
    .await?;
    let url = gw.ws_url(&TestGateway::socket_path(Vsn::V2, &gw.tokens().anon()));
    let mut slow = Client::connect_small_buffer(gw.addr(), &url, Vsn::V2).await?;
    slow.join_ok(ROOM, config("")).await?;
    let mut publisher = gw.connect(Vsn::V2).await?;
    let (pjr, _) = publisher.join_ok(ROOM, config("")).await?;
    let mut fast_v2 = gw.connect(Vsn::V2).await?;
    fast_v2.join_ok(ROOM, config("")).await?;
    let mut fast_v1 = gw.connect(Vsn::V1).await?;
    fast_v1.join_ok(ROOM, config("")).await?;

    // From here on `slow` is never read. Publish 16 KB messages in windows, waiting for the fast
    // subscribers to have each window, until the slow socket is closed (and a bit more).
    let filler = "x".repeat(16 * 1024);
    let (mut sent, mut next_v2, mut next_v1) = (0u64, 0u64, 0u64);
    let mut windows_after_close = 0;
    let started = Instant::now();
    while windows_after_close < 8 {
        anyhow::ensure!(
            sent < 20_000,
            "the slow consumer was never closed after {sent} messages ({} MB)",
            sent * 16 / 1024
        );
        for _ in 0..WINDOW {
            publisher
                .broadcast(&pjr, ROOM, "load", &json!({"i": sent, "f": filler}))
                .await?;
            sent += 1;
        }
        receive_in_order(&mut fast_v2, &mut next_v2, WINDOW).await?;
        receive_in_order(&mut fast_v1, &mut next_v1, WINDOW).await?;
        if windows_after_close > 0
            || gw
                .metric("realtime_socket_closes_total{reason=\"slow_consumer\"}")
                .await?
                >= 1.0
        {
            windows_after_close += 1;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!((next_v2, next_v1), (sent, sent), "fast subscribers got all");
    assert_eq!(
        gw.metric("realtime_socket_closes_total{reason=\"slow_consumer\"}")
            .await?,
        1.0
    );
    assert_eq!(
        gw.metric("realtime_socket_closes_total{reason=\"error\"}")
            .await?,
        0.0
    );
    assert!(gw.metric("realtime_dropped_deliveries_total").await? >= 1.0);
    // The publisher was never slowed down to a crawl by the stuck socket.
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");

    // The slow socket, read at last: some of the messages, then the end of the socket.
    let (before, closed) = slow.drain_until_closed(Duration::from_secs(10)).await?;
    let received = before
        .iter()
        .filter(|r| matches!(r, Received::Binary(_) | Received::Text(_)))
        .count();
    assert!(
        (received as u64) < sent,
        "slow socket received {received} of {sent}"
    );
    eprintln!(
        "slow consumer: {sent} published in {elapsed:?}; slow socket got {received} then {closed:?}"
    );
    if let Some((code, reason)) = &closed.frame {
        assert_eq!(
            (*code, reason.as_str()),
            (1008, "slow consumer: outbox full")
        );
    }
    // Everyone else is still served.
    publisher.expect_nothing().await?;
    fast_v2.expect_nothing().await?;
    fast_v1.expect_nothing().await?;
    assert_eq!(gw.metric("realtime_connections").await?, 3.0);
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_closes_sockets_and_returns_within_the_deadline() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.shutdown_timeout_ms = 2000).await?;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for vsn in [Vsn::V1, Vsn::V2, Vsn::V2] {
        let mut c = gw.connect(vsn).await?;
        c.join_ok(ROOM, config("")).await?;
        clients.push(c);
    }
    let mut idle = gw.connect(Vsn::V2).await?; // connected, never joined
    idle.expect_nothing().await?;
    clients.push(idle);

    let stopping = tokio::spawn(gw.shutdown(Duration::from_secs(5)));
    for c in &mut clients {
        let (_, closed) = c.drain_until_closed(Duration::from_secs(3)).await?;
        assert_eq!(
            closed.frame,
            Some((1001, "server shutting down".to_owned())),
            "every socket gets a close frame"
        );
    }
    let took = stopping.await??;
    assert!(took < Duration::from_secs(2), "run returned after {took:?}");
    // The listener is gone.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_deadline_bounds_a_client_that_never_answers_the_close() -> anyhow::Result<()> {
    // A client that never reads: its close frame cannot be delivered, yet `run` returns within
    // the deadline.
    let gw = TestGateway::start_with(|c| {
        c.shutdown_timeout_ms = 1500;
        c.outbox_max_frames = 100_000;
        c.outbox_max_bytes = 512 * 1024 * 1024;
    })
    .await?;
    let url = gw.ws_url(&TestGateway::socket_path(Vsn::V2, &gw.tokens().anon()));
    let mut stuck = Client::connect_small_buffer(gw.addr(), &url, Vsn::V2).await?;
    stuck.join_ok(ROOM, config("")).await?;
    let mut publisher = gw.connect(Vsn::V2).await?;
    let (pjr, _) = publisher.join_ok(ROOM, config("")).await?;
    let filler = "y".repeat(64 * 1024);
    for i in 0..200 {
        publisher
            .broadcast(&pjr, ROOM, "load", &json!({"i": i, "f": filler}))
            .await?;
    }
    publisher.sync().await?;
    let took = gw.shutdown(Duration::from_secs(6)).await?;
    assert!(took < Duration::from_secs(4), "run returned after {took:?}");
    let (_, closed) = publisher.drain_until_closed(Duration::from_secs(1)).await?;
    assert_eq!(
        closed.frame,
        Some((1001, "server shutting down".to_owned()))
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_is_prompt_with_an_idle_keep_alive_http_connection() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(|c| c.shutdown_timeout_ms = 5000).await?;
    let mut http = tokio::net::TcpStream::connect(gw.addr()).await?;
    http.write_all(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), http.read(&mut buf)).await??;
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = gw.shutdown(Duration::from_secs(8)).await?;
    assert!(
        took < Duration::from_secs(2),
        "an idle keep-alive connection held shutdown for {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_does_not_wait_for_delayed_join_errors() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| {
        c.shutdown_timeout_ms = 8000;
        c.channel_error_backoff_ms = 4000;
    })
    .await?;
    let mut c = gw.connect(Vsn::V2).await?;
    c.join("realtime:", &json!({"config": config("")})).await?;
    c.sync().await?;
    let took = gw.shutdown(Duration::from_secs(10)).await?;
    let (_, closed) = c.drain_until_closed(Duration::from_secs(1)).await?;
    assert_eq!(
        closed.frame,
        Some((1001, "server shutting down".to_owned()))
    );
    assert!(
        took < Duration::from_secs(2),
        "a pending join error reply held shutdown for {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_delayed_connect_refusal() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| {
        c.shutdown_timeout_ms = 8000;
        c.connect_error_backoff_ms = 4000;
    })
    .await?;
    let addr = gw.addr();
    // An upgrade without a key: its 401 is held back for the backoff.
    let refused = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        anyhow::Ok(out)
    });
    // Make sure the request is in: a metric counts the refusal as soon as it is decided.
    gw.wait_for_metric(
        "realtime_connections_refused_total",
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await?;
    let took = gw.shutdown(Duration::from_secs(10)).await?;
    let _ = refused.await?;
    assert!(
        took < Duration::from_secs(2),
        "a pending connect refusal held shutdown for {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn receiving_does_not_count_as_activity() -> anyhow::Result<()> {
    // The idle timeout is about frames from the client (Phoenix `timeout`); a socket that only
    // receives still idles out.
    let gw = TestGateway::start_with(|c| c.websocket_idle_timeout_ms = 600).await?;
    let mut listener = gw.connect(Vsn::V2).await?;
    listener.join_ok(ROOM, config("")).await?;
    let mut talker = gw.connect(Vsn::V2).await?;
    let (tjr, _) = talker.join_ok(ROOM, config("")).await?;
    let started = Instant::now();
    let mut received = 0;
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "listener never idled out"
        );
        talker.broadcast(&tjr, ROOM, "tick", &json!({})).await?;
        talker.sync().await?;
        match listener.recv_within(Duration::from_millis(200)).await {
            Ok(Received::Closed(c)) => break c,
            Ok(_) => received += 1,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(received > 0);
    assert_eq!(closed.frame, Some((1000, "idle timeout".to_owned())));
    // The talker, which kept sending, is still open.
    talker.expect_nothing().await?;
    Ok(())
}
