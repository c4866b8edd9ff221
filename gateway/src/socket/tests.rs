//! The socket's lifecycle driven in memory, without TCP and on a paused clock: heartbeats, the
//! idle timeout, token expiry, the delay of join refusals, and replies to pushes on a channel
//! that is still joining. They take milliseconds of real time and cannot flake on a loaded
//! machine.

use super::serve;
use crate::auth::{Verifier, sign_hs256};
use crate::channel::SocketParams;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::topics::{LocalBus, NodeId, Registry};
use futures_util::{Sink, Stream};
use realtime_protocol::Vsn;
use serde_json::{Value, json};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SECRET: &str = "in-memory-test-secret-0123456789abcdef";

/// The server's end of an in-memory WebSocket.
struct Pipe {
    from_client: mpsc::UnboundedReceiver<Message>,
    to_client: mpsc::UnboundedSender<Message>,
}

impl Stream for Pipe {
    type Item = Result<Message, WsError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.from_client.poll_recv(cx).map(|m| m.map(Ok))
    }
}

impl Sink<Message> for Pipe {
    type Error = WsError;
    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        self.to_client
            .send(item)
            .map_err(|_| WsError::ConnectionClosed)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
}

/// The client's end: V2 frames in, frames out.
struct Client {
    tx: mpsc::UnboundedSender<Message>,
    rx: mpsc::UnboundedReceiver<Message>,
    next_ref: u32,
}

impl Client {
    fn push(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        self.next_ref += 1;
        let msg_ref = self.next_ref.to_string();
        let frame = json!([join_ref, msg_ref, topic, event, payload]).to_string();
        self.tx.send(Message::Text(frame.into())).unwrap();
        msg_ref
    }

    /// The next text frame as `[join_ref, ref, topic, event, payload]`, or the close frame.
    async fn next(&mut self) -> Message {
        self.rx
            .recv()
            .await
            .expect("socket ended without a close frame")
    }

    async fn next_json(&mut self) -> Value {
        match self.next().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

struct Harness {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

fn start(configure: impl FnOnce(&mut Config)) -> (Harness, Client) {
    let mut config = Config::for_tests(SECRET);
    configure(&mut config);
    let secret = config.jwt_secret.clone().unwrap();
    let shared = Arc::new(Shared {
        verifier: Verifier::from_config(&config, &secret).unwrap(),
        config,
        registry: Arc::new(Registry::new(Arc::new(LocalBus), NodeId::random())),
        metrics: Arc::new(Metrics::default()),
        postgres: None,
        cluster: None,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let (to_server, from_client) = mpsc::unbounded_channel();
    let (to_client, from_server) = mpsc::unbounded_channel();
    let params = SocketParams {
        vsn: Vsn::V2,
        connect_token: token(3600),
        headers: Arc::from("{}"),
    };
    let pipe = Pipe {
        from_client,
        to_client,
    };
    let task = tokio::spawn(serve(shared.clone(), pipe, params));
    let client = Client {
        tx: to_server,
        rx: from_server,
        next_ref: 0,
    };
    (Harness { shared, task }, client)
}

fn token(expires_in: i64) -> String {
    let exp = crate::auth::now_seconds() as i64 + expires_in;
    sign_hs256(SECRET, &json!({"role": "anon", "exp": exp}))
}

fn join_payload(access_token: &str) -> Value {
    json!({"config": {"broadcast": {"ack": true, "self": true}, "presence": {"enabled": false}, "private": false},
           "access_token": access_token})
}

#[tokio::test(start_paused = true)]
async fn heartbeat_is_answered_on_the_phoenix_topic() {
    let (_h, mut client) = start(|_| {});
    let r = client.push(None, "phoenix", "heartbeat", json!({}));
    let reply = client.next_json().await;
    assert_eq!(reply[1], json!(r));
    assert_eq!(reply[2], "phoenix");
    assert_eq!(reply[3], "phx_reply");
    assert_eq!(reply[4]["status"], "ok");
}

#[tokio::test(start_paused = true)]
async fn idle_socket_closes_after_the_timeout_and_heartbeats_keep_it_open() {
    let (h, mut client) = start(|c| c.websocket_idle_timeout_ms = 60_000);
    let started = Instant::now();
    // Heartbeats every 25 s keep it open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(25)).await;
        client.push(None, "phoenix", "heartbeat", json!({}));
        assert_eq!(client.next_json().await[3], "phx_reply");
    }
    assert!(started.elapsed() >= Duration::from_secs(100));
    let quiet = Instant::now();
    match client.next().await {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected the idle close, got {other:?}"),
    }
    let idle = quiet.elapsed();
    assert!(
        idle >= Duration::from_secs(60) && idle < Duration::from_secs(61),
        "{idle:?}"
    );
    h.task.await.unwrap();
    let metrics = h.shared.metrics.render();
    assert!(
        metrics.contains("realtime_socket_closes_total{reason=\"idle_timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_channel_token_ends_the_channel_with_the_reason() {
    let (_h, mut client) = start(|c| c.websocket_idle_timeout_ms = 3_600_000);
    let join_ref = client.push(None, "realtime:room", "phx_join", join_payload(&token(30)));
    let _ = join_ref;
    let reply = client.next_json().await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let joined = Instant::now();
    let system = client.next_json().await;
    assert_eq!(system[3], "system", "{system}");
    assert!(
        system[4]["message"]
            .as_str()
            .unwrap()
            .contains("Token has expired"),
        "{system}"
    );
    let close = client.next_json().await;
    assert_eq!(close[3], "phx_close");
    let waited = joined.elapsed();
    assert!(
        waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn join_refusals_wait_the_backoff_and_heartbeats_do_not() {
    let (_h, mut client) = start(|c| c.channel_error_backoff_ms = 5_000);
    let started = Instant::now();
    client.push(
        None,
        "realtime:room",
        "phx_join",
        join_payload("not-a-token"),
    );
    client.push(None, "phoenix", "heartbeat", json!({}));
    let first = client.next_json().await;
    assert_eq!(
        first[2], "phoenix",
        "the heartbeat is answered first: {first}"
    );
    assert!(started.elapsed() < Duration::from_millis(10));
    let refusal = client.next_json().await;
    assert_eq!(refusal[2], "realtime:room");
    assert_eq!(refusal[4]["status"], "error");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn broadcast_with_ack_reaches_self_and_leave_closes() {
    let (_h, mut client) = start(|_| {});
    let join_ref = client.push(
        None,
        "realtime:room",
        "phx_join",
        join_payload(&token(3600)),
    );
    assert_eq!(client.next_json().await[4]["status"], "ok");
    let r = client.push(
        Some(&join_ref),
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": {"a": 1}}),
    );
    let delivered = client.next_json().await;
    assert_eq!(delivered[3], "broadcast");
    assert_eq!(delivered[4]["payload"], json!({"a": 1}));
    let ack = client.next_json().await;
    assert_eq!(
        (ack[1].clone(), ack[3].clone()),
        (json!(r), json!("phx_reply"))
    );
    client.push(Some(&join_ref), "realtime:room", "phx_leave", json!({}));
    assert_eq!(client.next_json().await[3], "phx_reply");
    let close = client.next_json().await;
    assert_eq!(close[3], "phx_close");
    assert_eq!(
        close[1],
        json!(join_ref),
        "phx_close carries the join_ref as ref"
    );
}
