//! The limit server: the smallest fan-out relay on the gateway's stack (tokio, hyper upgrade,
//! tokio-tungstenite), to measure what this machine can do at all.
//!
//! It accepts any socket on any path (no auth), answers `phx_join`, `phx_leave` and `heartbeat`
//! with an ok reply, and relays each broadcast to the topic's other members with one pre-built
//! frame shared by all of them: a kind-3 binary push becomes one kind-4 frame, a JSON text
//! `broadcast` one V2 text frame. Presence is the least that the presence scenario needs: a
//! `track` stores the meta and sends one `presence_diff` frame to every member; a join with
//! presence enabled gets `presence_state`; a closing socket sends the leaves.
//!
//! It is not a product: no V1, no `ack` option, no limits beyond a bounded outbox per socket
//! whose overflow drops frames (counted in `dropped`).

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use realtime_protocol::binary;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Frames a socket's outbox holds; beyond that frames to it are dropped.
const OUTBOX_FRAMES: usize = 4096;
/// Frames written before a flush.
const WRITE_BATCH: usize = 64;

type Outbox = mpsc::Sender<Message>;

/// A joined socket: its id, its outbox, and whether it gets its own broadcasts back.
type Member = (u64, Outbox, bool);

#[derive(Default)]
struct Topic {
    members: Vec<Member>,
    /// presence key → (socket id, meta JSON with its `phx_ref`).
    presence: HashMap<String, (u64, String)>,
    /// socket id → its presence key on this topic.
    keys: HashMap<u64, String>,
}

#[derive(Default)]
struct Relay {
    topics: Mutex<HashMap<Arc<str>, Topic>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl Relay {
    fn topics(&self) -> MutexGuard<'_, HashMap<Arc<str>, Topic>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `frame` to every member; the `sender`, if any, only when it asked for `self`.
    fn fan_out(&self, members: &[Member], sender: Option<u64>, frame: &Message) {
        for (id, tx, echo) in members {
            if (*echo || Some(*id) != sender) && tx.try_send(frame.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Serves until `shutdown` completes.
pub async fn run(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let relay = Arc::new(Relay::default());
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_connection(relay.clone(), stream));
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

async fn serve_connection(relay: Arc<Relay>, stream: TcpStream) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let relay = relay.clone();
        async move { Ok::<_, Infallible>(upgrade(relay, req)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

fn upgrade(relay: Arc<Relay>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        let stats = format!("dropped {}\n", relay.dropped.load(Ordering::Relaxed));
        return Response::new(Full::new(Bytes::from(stats)));
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            // The gateway's buffer sizes, so that footprints compare like for like.
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(8192);
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            serve_socket(relay, ws).await;
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        header::CONNECTION,
        "upgrade".parse().expect("static header"),
    );
    h.insert(header::UPGRADE, "websocket".parse().expect("static header"));
    if let Ok(v) = accept.parse() {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One socket: read and handle client frames, drain the outbox in batches.
async fn serve_socket(relay: Arc<Relay>, mut ws: Ws) {
    let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOX_FRAMES);
    let mut joined: Vec<Arc<str>> = Vec::new();
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Binary(frame))) => relay_binary(&relay, id, &frame),
                Some(Ok(Message::Text(text))) => {
                    handle_text(&relay, id, &tx, &mut joined, text.as_str());
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            Some(first) = rx.recv() => {
                if write_batch(&mut ws, &mut rx, first).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut topics = relay.topics();
    for topic in joined {
        leave(&relay, &mut topics, &topic, id);
    }
}

async fn write_batch(
    ws: &mut Ws,
    rx: &mut mpsc::Receiver<Message>,
    first: Message,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.feed(first).await?;
    for _ in 1..WRITE_BATCH {
        match rx.try_recv() {
            Ok(frame) => ws.feed(frame).await?,
            Err(_) => break,
        }
    }
    ws.flush().await
}

/// A kind-3 push becomes one kind-4 frame for every other member of the topic.
fn relay_binary(relay: &Relay, id: u64, frame: &Bytes) {
    let Ok(push) = binary::decode(frame) else {
        return;
    };
    let Ok(out) = binary::encode_user_broadcast(
        &push.topic,
        &push.event,
        &push.metadata,
        push.encoding,
        &push.payload,
    ) else {
        return;
    };
    let out = Message::Binary(out);
    let topics = relay.topics();
    if let Some(topic) = topics.get(push.topic.as_str()) {
        relay.fan_out(&topic.members, Some(id), &out);
    }
}

fn handle_text(relay: &Relay, id: u64, tx: &Outbox, joined: &mut Vec<Arc<str>>, text: &str) {
    let Ok((join_ref, msg_ref, topic, event, payload)) =
        serde_json::from_str::<(Option<&RawValue>, Option<&RawValue>, &str, &str, &RawValue)>(text)
    else {
        return;
    };
    let refs = |r: Option<&RawValue>| r.map_or("null", |r| r.get()).to_owned();
    let (join_ref, msg_ref) = (refs(join_ref), refs(msg_ref));
    let reply = |response: &str| {
        let frame = format!(
            "[{join_ref},{msg_ref},{},\"phx_reply\",{{\"status\":\"ok\",\"response\":{response}}}]",
            json_str(topic)
        );
        let _ = tx.try_send(Message::text(frame));
    };
    match event {
        "heartbeat" => reply("{}"),
        "phx_join" => {
            let topic: Arc<str> = topic.into();
            let (echo, presence) = join_config(payload);
            let mut topics = relay.topics();
            let entry = topics.entry(topic.clone()).or_default();
            entry.members.push((id, tx.clone(), echo));
            reply("{\"postgres_changes\":[]}");
            if let Some(key) = presence {
                let key = if key.is_empty() {
                    format!("s{id}")
                } else {
                    key
                };
                entry.keys.insert(id, key);
                let mut state = String::from("{");
                for (k, (_, meta)) in &entry.presence {
                    if state.len() > 1 {
                        state.push(',');
                    }
                    state.push_str(&format!("{}:{{\"metas\":[{meta}]}}", json_str(k)));
                }
                state.push('}');
                let frame = format!(
                    "[{join_ref},null,{},\"presence_state\",{state}]",
                    json_str(&topic)
                );
                let _ = tx.try_send(Message::text(frame));
            }
            drop(topics);
            joined.push(topic);
        }
        "phx_leave" => {
            reply("{}");
            if let Some(i) = joined.iter().position(|t| &**t == topic) {
                let t = joined.swap_remove(i);
                leave(relay, &mut relay.topics(), &t, id);
            }
        }
        "broadcast" => {
            let frame = Message::text(format!(
                "[null,null,{},\"broadcast\",{}]",
                json_str(topic),
                payload.get()
            ));
            if let Some(t) = relay.topics().get(topic) {
                relay.fan_out(&t.members, Some(id), &frame);
            }
        }
        "presence" => {
            reply("{}");
            track(relay, id, topic, payload);
        }
        _ => {}
    }
}

/// `config.broadcast.self`, and `Some(key)` when the join enables presence (an empty key
/// becomes one derived from the socket).
fn join_config(payload: &RawValue) -> (bool, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload.get()) else {
        return (false, None);
    };
    let config = &v["config"];
    let echo = config["broadcast"]["self"].as_bool() == Some(true);
    let p = &config["presence"];
    let presence =
        (p["enabled"].as_bool() == Some(true)).then(|| p["key"].as_str().unwrap_or("").to_owned());
    (echo, presence)
}

static NEXT_PHX_REF: AtomicU64 = AtomicU64::new(1);

fn track(relay: &Relay, id: u64, topic: &str, payload: &RawValue) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload.get()) else {
        return;
    };
    if v.get("event").and_then(|e| e.as_str()) != Some("track") {
        return;
    }
    let mut meta = v
        .get("payload")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let phx_ref = NEXT_PHX_REF.fetch_add(1, Ordering::Relaxed).to_string();
    if let Some(m) = meta.as_object_mut() {
        m.insert("phx_ref".into(), phx_ref.clone().into());
    }
    let meta = meta.to_string();
    let mut topics = relay.topics();
    let Some(t) = topics.get_mut(topic) else {
        return;
    };
    let key = t.keys.get(&id).cloned().unwrap_or_else(|| format!("s{id}"));
    let diff = format!(
        "[null,null,{},\"presence_diff\",{{\"joins\":{{{}:{{\"metas\":[{meta}]}}}},\"leaves\":{{}}}}]",
        json_str(topic),
        json_str(&key)
    );
    t.presence.insert(key, (id, meta));
    relay.fan_out(&t.members, None, &Message::text(diff));
}

fn leave(relay: &Relay, topics: &mut HashMap<Arc<str>, Topic>, topic: &str, id: u64) {
    let Some(t) = topics.get_mut(topic) else {
        return;
    };
    t.members.retain(|(m, _, _)| *m != id);
    let key = t.keys.remove(&id).unwrap_or_else(|| format!("s{id}"));
    if t.presence.get(&key).is_some_and(|(owner, _)| *owner == id)
        && let Some((_, meta)) = t.presence.remove(&key)
    {
        let diff = format!(
            "[null,null,{},\"presence_diff\",{{\"joins\":{{}},\"leaves\":{{{}:{{\"metas\":[{meta}]}}}}}}]",
            json_str(topic),
            json_str(&key)
        );
        relay.fan_out(&t.members, None, &Message::text(diff));
    }
    if t.members.is_empty() {
        topics.remove(topic);
    }
}

fn json_str(s: &str) -> String {
    realtime_protocol::frame::json_str(s)
}
