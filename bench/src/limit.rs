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
//! Both serializers: a V1 socket gets JSON objects, and a binary push reaches it as a JSON
//! `broadcast` (or not at all when the payload is binary), as protocol.md §2.4 says; each frame is
//! built at most once per serializer.
//!
//! It is not a product: no `ack` option, no limits beyond a bounded outbox per socket
//! whose overflow drops frames (counted in `dropped`).

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use realtime_protocol::binary::{self, PayloadEncoding};
use realtime_protocol::{Ref, Vsn, payload};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
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

/// A joined socket: its id, its outbox, whether it gets its own broadcasts back, and its
/// serializer.
type Member = (u64, Outbox, bool, Vsn);

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

    /// Sends a frame to every member; the `sender`, if any, only when it asked for `self`.
    /// `frame` builds the frame for a serializer (`None`: nothing for it); it runs at most once
    /// per serializer, and the frame is shared by all members that use it.
    fn fan_out(
        &self,
        members: &[Member],
        sender: Option<u64>,
        frame: impl Fn(Vsn) -> Option<Message>,
    ) {
        let mut built: [Option<Option<Message>>; 2] = [None, None];
        for (id, tx, echo, vsn) in members {
            if !*echo && Some(*id) == sender {
                continue;
            }
            let slot = &mut built[usize::from(*vsn == Vsn::V2)];
            let Some(frame) = slot.get_or_insert_with(|| frame(*vsn)) else {
                continue;
            };
            if tx.try_send(frame.clone()).is_err() {
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
    // `vsn=2.0.x` is V2; anything else (or nothing) V1, as the gateway maps a missing `vsn`.
    let vsn = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("vsn="))
        .map_or(Vsn::V1, |v| {
            if v.starts_with("2.") {
                Vsn::V2
            } else {
                Vsn::V1
            }
        });
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
            serve_socket(relay, ws, vsn).await;
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
async fn serve_socket(relay: Arc<Relay>, mut ws: Ws, vsn: Vsn) {
    let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOX_FRAMES);
    let mut joined: Vec<Arc<str>> = Vec::new();
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Binary(frame))) => relay_binary(&relay, id, &frame),
                Some(Ok(Message::Text(text))) => {
                    handle_text(&relay, id, vsn, &tx, &mut joined, text.as_str());
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
    let topics = relay.topics();
    let Some(topic) = topics.get(push.topic.as_str()) else {
        return;
    };
    relay.fan_out(&topic.members, Some(id), |vsn| match vsn {
        Vsn::V2 => binary::encode_user_broadcast(
            &push.topic,
            &push.event,
            &push.metadata,
            push.encoding,
            &push.payload,
        )
        .ok()
        .map(Message::Binary),
        // V1 sockets get a JSON `broadcast`, or nothing when the payload is binary.
        Vsn::V1 => {
            let payload = std::str::from_utf8(&push.payload).ok()?;
            (push.encoding == PayloadEncoding::Json).then(|| {
                let body = payload::user_broadcast_json(&push.event, payload, None);
                Message::text(vsn.encode(None, None, &push.topic, "broadcast", &body))
            })
        }
    });
}

/// A client text frame in either serializer: V2 `[join_ref, ref, topic, event, payload]` or a V1
/// object.
#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(rename = "ref", borrow, default)]
    msg_ref: Option<&'a RawValue>,
    #[serde(borrow, default)]
    join_ref: Option<&'a RawValue>,
}

type Decoded<'a> = (
    Option<Ref>,
    Option<Ref>,
    Cow<'a, str>,
    Cow<'a, str>,
    &'a RawValue,
);

fn decode_text(vsn: Vsn, text: &str) -> Option<Decoded<'_>> {
    let refs = |r: Option<&RawValue>| r.and_then(Ref::from_raw);
    match vsn {
        Vsn::V2 => {
            let (jr, r, topic, event, payload) = serde_json::from_str::<(
                Option<&RawValue>,
                Option<&RawValue>,
                Cow<'_, str>,
                Cow<'_, str>,
                &RawValue,
            )>(text)
            .ok()?;
            Some((refs(jr), refs(r), topic, event, payload))
        }
        Vsn::V1 => {
            let f = serde_json::from_str::<V1Frame<'_>>(text).ok()?;
            Some((
                refs(f.join_ref),
                refs(f.msg_ref),
                f.topic,
                f.event,
                f.payload,
            ))
        }
    }
}

fn handle_text(
    relay: &Relay,
    id: u64,
    vsn: Vsn,
    tx: &Outbox,
    joined: &mut Vec<Arc<str>>,
    text: &str,
) {
    let Some((join_ref, msg_ref, topic, event, payload)) = decode_text(vsn, text) else {
        return;
    };
    let topic = topic.as_ref();
    let send = |jr: Option<&Ref>, r: Option<&Ref>, event: &str, payload: &str| {
        let _ = tx.try_send(Message::text(vsn.encode(jr, r, topic, event, payload)));
    };
    let reply = |response: &str| {
        let body = format!("{{\"status\":\"ok\",\"response\":{response}}}");
        send(join_ref.as_ref(), msg_ref.as_ref(), "phx_reply", &body);
    };
    match event.as_ref() {
        "heartbeat" => reply("{}"),
        "phx_join" => {
            let topic: Arc<str> = topic.into();
            let (echo, presence) = join_config(payload);
            let mut topics = relay.topics();
            let entry = topics.entry(topic.clone()).or_default();
            entry.members.push((id, tx.clone(), echo, vsn));
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
                send(join_ref.as_ref(), None, "presence_state", &state);
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
            if let Some(t) = relay.topics().get(topic) {
                relay.fan_out(&t.members, Some(id), |vsn| {
                    Some(Message::text(vsn.encode(
                        None,
                        None,
                        topic,
                        "broadcast",
                        payload.get(),
                    )))
                });
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
        "{{\"joins\":{{{}:{{\"metas\":[{meta}]}}}},\"leaves\":{{}}}}",
        json_str(&key)
    );
    t.presence.insert(key, (id, meta));
    relay.fan_out(&t.members, None, |vsn| {
        Some(Message::text(vsn.encode(
            None,
            None,
            topic,
            "presence_diff",
            &diff,
        )))
    });
}

fn leave(relay: &Relay, topics: &mut HashMap<Arc<str>, Topic>, topic: &str, id: u64) {
    let Some(t) = topics.get_mut(topic) else {
        return;
    };
    t.members.retain(|(m, ..)| *m != id);
    let key = t.keys.remove(&id).unwrap_or_else(|| format!("s{id}"));
    if t.presence.get(&key).is_some_and(|(owner, _)| *owner == id)
        && let Some((_, meta)) = t.presence.remove(&key)
    {
        let diff = format!(
            "{{\"joins\":{{}},\"leaves\":{{{}:{{\"metas\":[{meta}]}}}}}}",
            json_str(&key)
        );
        relay.fan_out(&t.members, None, |vsn| {
            Some(Message::text(vsn.encode(
                None,
                None,
                topic,
                "presence_diff",
                &diff,
            )))
        });
    }
    if t.members.is_empty() {
        topics.remove(topic);
    }
}

fn json_str(s: &str) -> String {
    realtime_protocol::frame::json_str(s)
}
