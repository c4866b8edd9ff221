//! The gateway in-process, for end-to-end tests that start real things.
//!
//! - [`TestGateway`] runs [`realtime_gateway::run`] on a `127.0.0.1:0` listener the test binds, with
//!   a shutdown the test controls, and knows its bound address.
//! - [`Tokens`] mints HS256 tokens with the gateway's secret: anon, service_role, expired, expiring
//!   soon, custom claims, wrongly signed.
//! - [`Client`] is a small Phoenix client over tokio-tungstenite that speaks V1 (JSON objects) and
//!   V2 (JSON arrays, binary kind 3 pushes). Everything it receives is decoded back with the
//!   protocol crate: text frames with [`Vsn::decode`], binary frames with
//!   [`binary::decode_user_broadcast`]. A binary frame on a V1 socket, or a binary kind other than 4,
//!   is an error, because real clients choke on both.
//! - [`HttpResponse`] and [`TestGateway::request`]: raw HTTP/1.1 over a `TcpStream`, for connect
//!   refusals, REST broadcast, `/healthcheck` and `/metrics`.
//!
//! Every wait has a timeout ([`WAIT`] unless told otherwise). To prove that something did *not*
//! happen, [`Client::sync`] sends a heartbeat and collects what arrives before its reply: the
//! gateway handles one socket's frames in order, so anything a push caused is queued before the
//! heartbeat's reply — except what waits on the database (a private join, the first broadcast or
//! track of a private channel, a token refresh, a join with Postgres Changes): the socket answers
//! heartbeats meanwhile, so wait for those pushes' own frames instead.

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use realtime_gateway::Config;
use realtime_protocol::binary::{self, BinaryPush, PayloadEncoding};
use realtime_protocol::{Ref, Vsn};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The JWT secret every [`TestGateway`] is configured with.
pub const SECRET: &str = "test-secret-for-the-gateway-harness-32-chars";

/// How long a test waits for an expected event.
pub const WAIT: Duration = Duration::from_secs(5);

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token with header `{"alg":"none","typ":"JWT"}` and no signature.
pub const UNSIGNED_TOKEN: &str =
    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJyb2xlIjoiYW5vbiIsImV4cCI6NDEwMjQ0NDgwMH0.";

/// Mints tokens signed with one secret.
#[derive(Clone, Debug)]
pub struct Tokens {
    secret: String,
}

impl Tokens {
    pub fn new(secret: &str) -> Tokens {
        Tokens {
            secret: secret.to_owned(),
        }
    }

    /// Signs arbitrary claims (HS256).
    pub fn custom(&self, claims: &Value) -> String {
        realtime_gateway::auth::sign_hs256(&self.secret, claims)
    }

    /// Signs claims with another HMAC algorithm.
    pub fn with_algorithm(&self, alg: jsonwebtoken::Algorithm, claims: &Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("hmac signing never fails")
    }

    /// A role's token valid for an hour.
    pub fn role(&self, role: &str) -> String {
        self.expiring_in_as(role, 3600)
    }

    pub fn anon(&self) -> String {
        self.role("anon")
    }

    pub fn service_role(&self) -> String {
        self.role("service_role")
    }

    /// An anon token whose `exp` is `seconds_ago` in the past.
    pub fn expired(&self, seconds_ago: i64) -> String {
        self.expiring_in_as("anon", -seconds_ago)
    }

    /// An anon token whose `exp` is `seconds` from now.
    pub fn expiring_in(&self, seconds: i64) -> String {
        self.expiring_in_as("anon", seconds)
    }

    fn expiring_in_as(&self, role: &str, seconds: i64) -> String {
        let now = now_secs();
        self.custom(&json!({
            "iss": "supabase",
            "ref": "test",
            "role": role,
            "iat": now.min(now + seconds),
            "exp": now + seconds,
        }))
    }

    /// A valid-looking anon token signed with a different secret.
    pub fn wrong_secret(&self) -> String {
        Tokens::new("some-other-secret-that-is-also-32-chars-long").anon()
    }
}

/// A gateway running in this process on `127.0.0.1:<ephemeral>`.
///
/// Dropping it triggers the gateway's shutdown.
#[derive(Debug)]
pub struct TestGateway {
    addr: SocketAddr,
    tokens: Tokens,
    shutdown: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<Result<(), realtime_gateway::RunError>>>,
}

impl TestGateway {
    /// Starts with [`Config::for_tests`].
    pub async fn start() -> anyhow::Result<TestGateway> {
        TestGateway::start_with(|_| {}).await
    }

    /// Starts with [`Config::for_tests`] changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> anyhow::Result<TestGateway> {
        let mut config = Config::for_tests(SECRET);
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn(realtime_gateway::run(config, listener, async move {
            // A dropped sender shuts down as well.
            let _ = rx.await;
        }));
        Ok(TestGateway {
            addr,
            tokens: Tokens::new(SECRET),
            shutdown: Some(tx),
            run: Some(run),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// `ws://addr<path_and_query>`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// The socket URL supabase-js builds: `/realtime/v1/websocket?apikey=…&vsn=…`.
    pub fn socket_path(vsn: Vsn, apikey: &str) -> String {
        let vsn = match vsn {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        };
        format!("/realtime/v1/websocket?apikey={apikey}&log_level=info&vsn={vsn}")
    }

    /// Connects a client with an anon key.
    pub async fn connect(&self, vsn: Vsn) -> anyhow::Result<Client> {
        self.connect_with_key(vsn, &self.tokens.anon()).await
    }

    /// Connects a client with `apikey` as the connect token.
    pub async fn connect_with_key(&self, vsn: Vsn, apikey: &str) -> anyhow::Result<Client> {
        Client::connect(&self.ws_url(&Self::socket_path(vsn, apikey)), vsn).await
    }

    /// Asks the gateway to shut down and waits up to `limit` for `run` to return; gives how long
    /// it took.
    pub async fn shutdown(mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let run = self.run.take().context("gateway already stopped")?;
        let result = tokio::time::timeout(limit, run)
            .await
            .with_context(|| format!("run did not return within {limit:?} of shutdown"))?;
        result.context("gateway task panicked")??;
        Ok(started.elapsed())
    }

    /// Sends one raw HTTP/1.1 request (`Connection: close` unless it is an upgrade) and reads the
    /// response.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<HttpResponse> {
        let mut stream = TcpStream::connect(self.addr).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: realtime-dev.localhost\r\n");
        let upgrade = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("upgrade"));
        if !upgrade {
            head.push_str("Connection: close\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        tokio::time::timeout(WAIT, read_response(&mut stream))
            .await
            .context("no HTTP response in time")?
    }

    /// A WebSocket upgrade request as a browser sends it, answered raw (for refusals).
    pub async fn upgrade(
        &self,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<HttpResponse> {
        let mut headers = vec![
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        headers.extend_from_slice(extra);
        self.request("GET", path_and_query, &headers, b"").await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let r = self.request("GET", "/metrics", &[], b"").await?;
        ensure!(r.status == 200, "/metrics answered {}", r.status);
        Ok(r.text())
    }

    /// One series of `/metrics` (`name` or `name{labels}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric_value(&self.metrics().await?, series).unwrap_or(0.0))
    }

    /// Polls `/metrics` until `series` satisfies `pred`, for at most `limit`.
    pub async fn wait_for_metric(
        &self,
        series: &str,
        limit: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(series).await?;
            if pred(v) {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "{series} is still {v} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of one series in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A raw HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", self.text()))
    }
}

async fn read_response(stream: &mut TcpStream) -> anyhow::Result<HttpResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        ensure!(
            n > 0,
            "connection closed before the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[header_end + 4..].to_vec();
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 101 {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if let Some(len) = response
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        while body.len() < len {
            let n = stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed inside the body");
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else {
        // Chunked or close-delimited: read to the end.
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        if chunked {
            body = dechunk(&body)?;
        }
    }
    response.body = body;
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(data.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A text frame from the server, decoded with the socket's serializer.
#[derive(Clone, Debug, PartialEq)]
pub struct TextFrame {
    /// `null` when absent (always on V1, which never sends it).
    pub join_ref: Value,
    pub msg_ref: Value,
    pub topic: String,
    pub event: String,
    pub payload: Value,
    /// The frame as received.
    pub raw: String,
}

impl TextFrame {
    /// `payload.status` of a `phx_reply`.
    pub fn status(&self) -> Option<&str> {
        self.payload.get("status").and_then(Value::as_str)
    }

    /// `payload.response` of a `phx_reply`.
    pub fn response(&self) -> &Value {
        self.payload.get("response").unwrap_or(&Value::Null)
    }

    /// The raw frame as JSON.
    pub fn raw_json(&self) -> Value {
        serde_json::from_str(&self.raw).unwrap_or(Value::Null)
    }
}

/// A kind-4 user broadcast, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct UserBroadcast {
    pub topic: String,
    pub event: String,
    pub metadata: Vec<u8>,
    pub encoding: PayloadEncoding,
    pub payload: Vec<u8>,
}

impl UserBroadcast {
    pub fn payload_json(&self) -> anyhow::Result<Value> {
        ensure!(
            self.encoding == PayloadEncoding::Json,
            "payload encoding is binary"
        );
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

/// How a socket ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The close frame's code and reason, when the server sent one.
    pub frame: Option<(u16, String)>,
}

/// Whatever the server sent next.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    Text(TextFrame),
    Binary(UserBroadcast),
    Closed(Closed),
}

impl Received {
    pub fn text(&self) -> Option<&TextFrame> {
        match self {
            Received::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_event(&self, topic: &str, event: &str) -> bool {
        self.text()
            .is_some_and(|t| t.topic == topic && t.event == event)
    }
}

/// The refs of a push, JSON-encoded as realtime-js sends them (decimal strings).
fn text_ref(r: Option<&str>) -> Option<Ref> {
    r.map(Ref::from_string)
}

/// A Phoenix client speaking V1 or V2.
#[derive(Debug)]
pub struct Client {
    vsn: Vsn,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
    /// Set once the socket ended; later receives report it again.
    ended: Option<Closed>,
}

impl Client {
    /// Opens a WebSocket to `url` (the serializer must match its `vsn`).
    pub async fn connect(url: &str, vsn: Vsn) -> anyhow::Result<Client> {
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connect to {url}"))?;
        ensure!(response.status().as_u16() == 101, "upgrade refused");
        Ok(Client::from_ws(ws, vsn))
    }

    /// Opens a WebSocket over a TCP socket with a tiny receive buffer: a client that stops
    /// reading fills the gateway's side quickly.
    pub async fn connect_small_buffer(
        addr: SocketAddr,
        url: &str,
        vsn: Vsn,
    ) -> anyhow::Result<Client> {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let stream = socket.connect(addr).await?;
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
        )
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {url}"))?;
        Ok(Client::from_ws(ws, vsn))
    }

    fn from_ws(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, vsn: Vsn) -> Client {
        Client {
            vsn,
            ws,
            next_ref: 0,
            ended: None,
        }
    }

    pub fn vsn(&self) -> Vsn {
        self.vsn
    }

    /// The next `ref`, a decimal string like realtime-js's.
    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, bytes: Bytes) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(bytes)).await?;
        Ok(())
    }

    /// Sends a push with explicit refs, encoded with the socket's serializer.
    pub async fn push_with_refs(
        &mut self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> anyhow::Result<()> {
        let (join_ref, msg_ref) = (text_ref(join_ref), text_ref(msg_ref));
        let payload = payload.to_string();
        let text = match self.vsn {
            Vsn::V2 => Vsn::V2.encode(join_ref.as_ref(), msg_ref.as_ref(), topic, event, &payload),
            // The V1 serializer never writes `join_ref`, but V1 clients send it.
            Vsn::V1 => {
                let mut frame = json!({
                    "topic": topic,
                    "event": event,
                    "payload": serde_json::from_str::<Value>(&payload)?,
                    "ref": msg_ref.as_ref().map(|r| serde_json::from_str::<Value>(r.as_json())).transpose()?,
                });
                if let Some(j) = &join_ref {
                    frame["join_ref"] = serde_json::from_str(j.as_json())?;
                }
                frame.to_string()
            }
        };
        self.send_text(&text).await
    }

    /// Sends a push with a fresh `ref`; returns the ref.
    pub async fn push(
        &mut self,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> anyhow::Result<String> {
        let msg_ref = self.make_ref();
        self.push_with_refs(join_ref, Some(&msg_ref), topic, event, payload)
            .await?;
        Ok(msg_ref)
    }

    /// Sends `phx_join` (join_ref = ref); returns the join ref.
    pub async fn join(&mut self, topic: &str, payload: &Value) -> anyhow::Result<String> {
        let join_ref = self.make_ref();
        self.push_with_refs(Some(&join_ref), Some(&join_ref), topic, "phx_join", payload)
            .await?;
        Ok(join_ref)
    }

    /// Joins with `{"config": config}` (the connect token is the channel token) and waits for an
    /// ok reply; returns the join ref and the reply.
    pub async fn join_ok(
        &mut self,
        topic: &str,
        config: Value,
    ) -> anyhow::Result<(String, TextFrame)> {
        let join_ref = self.join(topic, &json!({ "config": config })).await?;
        let reply = self.expect_reply(&join_ref).await?;
        ensure!(
            reply.status() == Some("ok"),
            "join of {topic} refused: {}",
            reply.raw
        );
        Ok((join_ref, reply))
    }

    /// A `heartbeat` on topic `phoenix`; returns its ref.
    pub async fn heartbeat(&mut self) -> anyhow::Result<String> {
        self.push(None, "phoenix", "heartbeat", &json!({})).await
    }

    /// A JSON `broadcast` push (what V1 clients send); returns its ref.
    pub async fn broadcast(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> anyhow::Result<String> {
        let body = json!({"type": "broadcast", "event": event, "payload": payload});
        self.push(Some(join_ref), topic, "broadcast", &body).await
    }

    /// A binary kind-3 broadcast push (what realtime-js ≥ 2.91 sends on V2); returns its ref.
    pub async fn broadcast_binary(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        encoding: PayloadEncoding,
        payload: &[u8],
        metadata: &[u8],
    ) -> anyhow::Result<String> {
        let msg_ref = self.make_ref();
        let frame = binary::encode_push(&BinaryPush {
            join_ref: Some(Ref::from_string(join_ref)),
            msg_ref: Some(Ref::from_string(&msg_ref)),
            topic: topic.to_owned(),
            event: event.to_owned(),
            metadata: Bytes::copy_from_slice(metadata),
            encoding,
            payload: Bytes::copy_from_slice(payload),
        })?;
        self.send_binary(frame).await?;
        Ok(msg_ref)
    }

    /// The next frame, within [`WAIT`].
    pub async fn recv(&mut self) -> anyhow::Result<Received> {
        self.recv_within(WAIT).await
    }

    /// The next frame, within `limit`. A close frame or the end of the stream gives
    /// [`Received::Closed`].
    pub async fn recv_within(&mut self, limit: Duration) -> anyhow::Result<Received> {
        if let Some(closed) = &self.ended {
            return Ok(Received::Closed(closed.clone()));
        }
        loop {
            let next = tokio::time::timeout(limit, self.ws.next())
                .await
                .with_context(|| format!("nothing received within {limit:?}"))?;
            let message = match next {
                None => return Ok(self.end(None)),
                Some(Err(e)) => {
                    // A connection reset or a torn close counts as ended without a close frame.
                    let _ = e;
                    return Ok(self.end(None));
                }
                Some(Ok(m)) => m,
            };
            return match message {
                Message::Text(text) => Ok(Received::Text(self.decode_text(text.as_str())?)),
                Message::Binary(bytes) => {
                    ensure!(
                        self.vsn == Vsn::V2,
                        "binary frame on a V1 socket: {bytes:02x?}"
                    );
                    let b = binary::decode_user_broadcast(&bytes).map_err(|e| {
                        anyhow::anyhow!("undecodable binary frame {bytes:02x?}: {e}")
                    })?;
                    Ok(Received::Binary(UserBroadcast {
                        topic: b.topic.to_owned(),
                        event: b.event.to_owned(),
                        metadata: b.metadata.to_vec(),
                        encoding: b.encoding,
                        payload: b.payload.to_vec(),
                    }))
                }
                Message::Close(frame) => {
                    let frame = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
                    Ok(self.end(frame))
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
        }
    }

    fn end(&mut self, frame: Option<(u16, String)>) -> Received {
        let closed = Closed { frame };
        self.ended = Some(closed.clone());
        Received::Closed(closed)
    }

    fn decode_text(&self, text: &str) -> anyhow::Result<TextFrame> {
        let m = self
            .vsn
            .decode(text)
            .map_err(|e| anyhow::anyhow!("undecodable text frame {text:?}: {e}"))?;
        let as_value =
            |r: Option<Ref>| r.map_or(Ok(Value::Null), |r| serde_json::from_str(r.as_json()));
        Ok(TextFrame {
            join_ref: as_value(m.join_ref)?,
            msg_ref: as_value(m.msg_ref)?,
            topic: m.topic,
            event: m.event,
            payload: serde_json::from_str(m.payload.get())?,
            raw: text.to_owned(),
        })
    }

    /// The next frame, which must be text.
    pub async fn recv_text(&mut self) -> anyhow::Result<TextFrame> {
        match self.recv().await? {
            Received::Text(t) => Ok(t),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a kind-4 user broadcast.
    pub async fn recv_binary(&mut self) -> anyhow::Result<UserBroadcast> {
        match self.recv().await? {
            Received::Binary(b) => Ok(b),
            other => bail!("expected a binary frame, got {other:?}"),
        }
    }

    /// Receives until `pred` matches, within [`WAIT`] in total; returns the match and what came
    /// before it.
    pub async fn recv_until(
        &mut self,
        pred: impl Fn(&Received) -> bool,
    ) -> anyhow::Result<(Received, Vec<Received>)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self
                .recv_within(left)
                .await
                .with_context(|| format!("waiting for a match after {before:?}"))?;
            if pred(&r) {
                return Ok((r, before));
            }
            if let Received::Closed(c) = &r {
                bail!("socket closed ({c:?}) while waiting; received before: {before:?}");
            }
            before.push(r);
        }
    }

    /// Waits for the `phx_reply` with `ref` = `msg_ref`, skipping anything else.
    pub async fn expect_reply(&mut self, msg_ref: &str) -> anyhow::Result<TextFrame> {
        let want = json!(msg_ref);
        let (r, _) = self
            .recv_until(|r| {
                r.text()
                    .is_some_and(|t| t.event == "phx_reply" && t.msg_ref == want)
            })
            .await
            .with_context(|| format!("no phx_reply for ref {msg_ref}"))?;
        Ok(r.text().cloned().expect("matched a text frame"))
    }

    /// Waits for `event` on `topic`, skipping anything else.
    pub async fn expect_event(&mut self, topic: &str, event: &str) -> anyhow::Result<TextFrame> {
        let (r, _) = self
            .recv_until(|r| r.is_event(topic, event))
            .await
            .with_context(|| format!("no {event} on {topic}"))?;
        Ok(r.text().cloned().expect("matched a text frame"))
    }

    /// Sends a heartbeat and returns everything received before its reply. Pushes sent earlier on
    /// this socket were handled before the heartbeat, so whatever they caused for this socket is
    /// in the result (unless they wait on the database; see the module docs).
    pub async fn sync(&mut self) -> anyhow::Result<Vec<Received>> {
        let hb = self.heartbeat().await?;
        let want = json!(hb);
        let (_, before) = self
            .recv_until(|r| {
                r.text()
                    .is_some_and(|t| t.topic == "phoenix" && t.msg_ref == want)
            })
            .await
            .context("no heartbeat reply")?;
        Ok(before)
    }

    /// Like [`Client::sync`], and fails if anything arrived before the heartbeat reply.
    pub async fn expect_nothing(&mut self) -> anyhow::Result<()> {
        let got = self.sync().await?;
        ensure!(got.is_empty(), "expected nothing, received {got:?}");
        Ok(())
    }

    /// Reads until the socket ends, within `limit`; returns what arrived before and how it ended.
    pub async fn drain_until_closed(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(Vec<Received>, Closed)> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.recv_within(left).await.with_context(|| {
                format!(
                    "socket still open after {limit:?} ({} frames received)",
                    before.len()
                )
            })?;
            match r {
                Received::Closed(c) => return Ok((before, c)),
                other => before.push(other),
            }
        }
    }

    /// Closes the socket from the client side (code 1000).
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await?;
        Ok(())
    }
}

/// Setup for [`TestGateway::on_database`]: `public.items (id, v)`, readable by anon, in the
/// publication.
pub const ITEMS: &str = "create table public.items (id bigserial primary key, v int not null);
     grant select on public.items to anon;
     alter publication supabase_realtime add table public.items;";

impl TestGateway {
    /// A gateway on `db` (a fresh database of the harness's cluster): Supabase's roles and auth
    /// helpers applied, then `setup`, then the gateway started with its own slot; returns once
    /// its `realtime` schema exists and the change stream is live.
    pub async fn on_database(
        db: &crate::postgres::TestDb,
        setup: &str,
    ) -> anyhow::Result<TestGateway> {
        TestGateway::on_database_with(db, setup, |_| {}).await
    }

    /// [`TestGateway::on_database`] with the configuration changed by `configure`.
    pub async fn on_database_with(
        db: &crate::postgres::TestDb,
        setup: &str,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestGateway> {
        const ROLES_AND_AUTH: &str =
            include_str!("../../supabase/migrations/0001_roles_and_auth.sql");
        // Roles are the cluster's: tests in one process create them one at a time.
        static ROLES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let client = db.client().await?;
        {
            let _one = ROLES.lock().await;
            client.batch_execute(ROLES_AND_AUTH).await?;
        }
        client.batch_execute(setup).await?;
        let (url, slot) = (db.url.clone(), format!("gw_{}", db.name));
        let gw = TestGateway::start_with(|c| {
            c.database_url = Some(realtime_gateway::Secret::new(url.clone()));
            c.slot_name = slot.clone();
            configure(c);
        })
        .await?;
        crate::postgres::wait_for(Duration::from_secs(15), "the realtime schema", || async {
            let n: i64 = client
                .query_one(
                    "select count(*) from pg_tables where schemaname = 'realtime' and tablename = 'messages'",
                    &[],
                )
                .await?
                .get(0);
            Ok((n == 1).then_some(()))
        })
        .await?;
        gw.wait_for_metric("realtime_wal_streaming", Duration::from_secs(20), |v| {
            v == 1.0
        })
        .await?;
        Ok(gw)
    }
}
