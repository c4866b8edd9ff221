//! A client that speaks like supabase-js (realtime-js 2.119) over either serializer. V2: JSON
//! array text frames for joins, heartbeats and presence, broadcasts as binary kind-3 pushes,
//! kind-4 binary and text deliveries. V1 (realtime-js 2.11): JSON objects only.
//!
//! Every broadcast payload the load generator sends starts with `{"t":<µs>`, the send time in
//! microseconds on this process's clock ([`now_us`]), so a receiver in the same process reads its
//! latency without parsing JSON.

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use realtime_protocol::binary::{self, BinaryPush, PayloadEncoding};
use realtime_protocol::{Ref, Vsn};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// realtime-js's heartbeat interval.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(25);

/// A connected socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the first call in this process.
pub fn now_us() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The `realtime-js` join payload for a public channel.
pub fn join_payload(self_broadcast: bool, presence_key: Option<&str>, token: &str) -> String {
    join_payload_with(self_broadcast, presence_key, token, false, "[]")
}

/// The `realtime-js` join payload: `private` channel or not, `postgres_changes` bindings (a JSON
/// array, `[]` for none).
pub fn join_payload_with(
    self_broadcast: bool,
    presence_key: Option<&str>,
    token: &str,
    private: bool,
    postgres_changes: &str,
) -> String {
    let (key, enabled) = presence_key.map_or(("", false), |k| (k, true));
    format!(
        "{{\"config\":{{\"broadcast\":{{\"ack\":false,\"self\":{self_broadcast}}},\"presence\":{{\"key\":{},\"enabled\":{enabled}}},\"postgres_changes\":{postgres_changes},\"private\":{private}}},\"access_token\":{}}}",
        realtime_protocol::frame::json_str(key),
        realtime_protocol::frame::json_str(token),
    )
}

/// A text frame in `vsn`'s serializer (V2: JSON array; V1: JSON object).
pub fn text_frame(
    vsn: Vsn,
    join_ref: Option<u64>,
    msg_ref: u64,
    topic: &str,
    event: &str,
    payload: &str,
) -> Message {
    let jr = join_ref.map(|r| Ref::from_string(&r.to_string()));
    let r = Ref::from_string(&msg_ref.to_string());
    Message::text(vsn.encode(jr.as_ref(), Some(&r), topic, event, payload))
}

/// A broadcast push as realtime-js builds it for `channel.send({type:'broadcast', ...})`: a
/// binary kind-3 frame on V2, a JSON `broadcast` text frame on V1.
pub fn broadcast_push(
    vsn: Vsn,
    join_ref: u64,
    msg_ref: u64,
    topic: &str,
    event: &str,
    payload: Bytes,
) -> Message {
    if vsn == Vsn::V1 {
        let body = realtime_protocol::payload::user_broadcast_json(
            event,
            std::str::from_utf8(&payload).unwrap_or("{}"),
            None,
        );
        return text_frame(vsn, Some(join_ref), msg_ref, topic, "broadcast", &body);
    }
    let push = BinaryPush {
        join_ref: Some(Ref::from_string(&join_ref.to_string())),
        msg_ref: Some(Ref::from_string(&msg_ref.to_string())),
        topic: topic.to_owned(),
        event: event.to_owned(),
        metadata: Bytes::new(),
        encoding: PayloadEncoding::Json,
        payload,
    };
    Message::Binary(binary::encode_push(&push).unwrap_or_default())
}

/// A broadcast payload of about `size` bytes stamped with the send time: `{"t":<µs>,"p":"xx…"}`.
pub fn stamped_payload(size: usize) -> Bytes {
    let t = now_us();
    let head = format!("{{\"t\":{t},\"p\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    Bytes::from(out)
}

/// The send stamp of a delivered broadcast: the first `"t":<digits>` in the frame.
pub fn stamp_of(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\":";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// What one received frame was, as far as the load generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A broadcast delivery (kind 4, or a text `broadcast`) with its send stamp if any.
    Broadcast(Option<u64>),
    /// A `phx_reply` with its `ref` and whether the status was ok.
    Reply { msg_ref: Option<u64>, ok: bool },
    /// A `presence_state` or `presence_diff` (the text, for the caller to parse).
    Presence,
    /// Anything else.
    Other,
}

/// Classifies a frame cheaply: binary frames are kind-4 broadcasts; text frames are looked at by
/// their event.
pub fn classify(msg: &Message) -> Received {
    match msg {
        Message::Binary(b) => match binary::decode_user_broadcast(b) {
            Ok(ub) => Received::Broadcast(stamp_of(ub.payload)),
            Err(_) => Received::Other,
        },
        Message::Text(t) => {
            let t = t.as_str();
            // `[join_ref,ref,topic,event,payload]`: the event is the fourth element.
            if t.contains("\"phx_reply\"") {
                let Ok(frame) = Vsn::V2.decode(t).or_else(|_| Vsn::V1.decode(t)) else {
                    return Received::Other;
                };
                let ok = serde_json::from_str::<serde_json::Value>(frame.payload.get())
                    .is_ok_and(|p| p["status"] == "ok");
                Received::Reply {
                    msg_ref: frame
                        .msg_ref
                        .and_then(|r| serde_json::from_str::<String>(r.as_json()).ok())
                        .and_then(|r| r.parse().ok()),
                    ok,
                }
            } else if t.contains("\"presence_diff\"") || t.contains("\"presence_state\"") {
                Received::Presence
            } else if t.contains("\"broadcast\"") {
                Received::Broadcast(stamp_of(t.as_bytes()))
            } else {
                Received::Other
            }
        }
        _ => Received::Other,
    }
}

/// Where to connect and with which key.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// The `apikey` (a JWT the gateway accepts; the limit server ignores it).
    pub token: String,
    /// The serializer to ask for.
    pub vsn: Vsn,
}

impl Endpoint {
    pub fn url(&self) -> String {
        format!(
            "ws://{}/realtime/v1/websocket?apikey={}&vsn={}",
            self.addr,
            self.token,
            match self.vsn {
                Vsn::V1 => "1.0.0",
                Vsn::V2 => "2.0.0",
            }
        )
    }
}

/// A joined socket: the stream and its channels' join refs, in join order.
pub struct Client {
    pub ws: Ws,
    pub vsn: Vsn,
    pub topics: Vec<(String, u64)>,
    next_ref: u64,
    /// Bytes received in frames so far.
    pub bytes_in: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("topics", &self.topics)
            .finish()
    }
}

impl Client {
    /// Connects (TCP_NODELAY, like browsers).
    pub async fn connect(endpoint: &Endpoint) -> anyhow::Result<Client> {
        // Small buffers: one process holds up to ~19k of these.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(8192);
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(endpoint.url(), Some(config), true)
                .await
                .with_context(|| format!("connecting to {}", endpoint.addr))?;
        Ok(Client {
            ws,
            vsn: endpoint.vsn,
            topics: Vec::new(),
            next_ref: 1,
            bytes_in: 0,
        })
    }

    pub fn next_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    /// Joins `realtime:<name>` and waits for the ok reply (frames before it are skipped).
    pub async fn join(
        &mut self,
        name: &str,
        self_broadcast: bool,
        presence_key: Option<&str>,
        token: &str,
    ) -> anyhow::Result<()> {
        self.join_with(name, &join_payload(self_broadcast, presence_key, token))
            .await
    }

    /// Joins `realtime:<name>` with a join payload of the caller's and waits for the ok reply.
    pub async fn join_with(&mut self, name: &str, payload: &str) -> anyhow::Result<()> {
        let topic = format!("realtime:{name}");
        let join_ref = self.next_ref();
        self.ws
            .send(text_frame(
                self.vsn,
                Some(join_ref),
                join_ref,
                &topic,
                "phx_join",
                payload,
            ))
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no join reply within 10 s")?;
            let Some(msg) = msg else {
                bail!("socket closed while joining {topic}")
            };
            let msg = msg?;
            self.bytes_in += msg.len() as u64;
            if let Received::Reply { msg_ref, ok } = classify(&msg)
                && msg_ref == Some(join_ref)
            {
                if !ok {
                    bail!("join of {topic} refused: {msg}");
                }
                self.topics.push((topic, join_ref));
                return Ok(());
            }
        }
    }

    /// A heartbeat frame with a fresh ref.
    pub fn heartbeat(&mut self) -> Message {
        let r = self.next_ref();
        text_frame(self.vsn, None, r, "phoenix", "heartbeat", "{}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_is_json_of_the_asked_size_and_its_stamp_reads_back() {
        let p = stamped_payload(1024);
        assert_eq!(p.len(), 1024);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(stamp_of(&p), v["t"].as_u64());
        assert!(stamped_payload(4).starts_with(b"{\"t\":"));
    }

    #[test]
    fn a_kind_4_delivery_is_a_broadcast_with_its_stamp() {
        let frame = binary::encode_user_broadcast(
            "realtime:r",
            "bench",
            b"",
            PayloadEncoding::Json,
            b"{\"t\":42,\"p\":\"\"}",
        )
        .unwrap();
        assert_eq!(
            classify(&Message::Binary(frame)),
            Received::Broadcast(Some(42))
        );
        let reply =
            Message::text(r#"["1","1","realtime:r","phx_reply",{"status":"ok","response":{}}]"#);
        assert_eq!(
            classify(&reply),
            Received::Reply {
                msg_ref: Some(1),
                ok: true
            }
        );
        let v1 = Message::text(
            r#"{"topic":"realtime:r","event":"phx_reply","payload":{"status":"error","response":{}},"ref":"7"}"#,
        );
        assert_eq!(
            classify(&v1),
            Received::Reply {
                msg_ref: Some(7),
                ok: false
            }
        );
        let v1 = broadcast_push(Vsn::V1, 1, 2, "realtime:r", "bench", stamped_payload(64));
        assert!(matches!(classify(&v1), Received::Broadcast(Some(_))));
    }

    #[test]
    fn the_join_payload_has_realtime_js_shape() {
        let p: serde_json::Value =
            serde_json::from_str(&join_payload(false, Some("k"), "tok")).unwrap();
        assert_eq!(
            p["config"]["presence"],
            serde_json::json!({"key": "k", "enabled": true})
        );
        assert_eq!(
            p["config"]["broadcast"],
            serde_json::json!({"ack": false, "self": false})
        );
        assert_eq!(p["config"]["postgres_changes"], serde_json::json!([]));
        assert_eq!(p["access_token"], "tok");
    }
}
