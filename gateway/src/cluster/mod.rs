//! Several gateway nodes as one, over NATS: what a client publishes on one node reaches the
//! members of its topic on every node, and presence is the whole cluster's.
//!
//! - **Broadcast.** The origin delivers to its own members from memory, then the topic's
//!   critical section hands the message to [`Cluster::forward`], which queues one envelope
//!   (`envelope`) for the node's single NATS connection (`no_echo`: the server never sends a
//!   node its own messages). One subject per topic, `{prefix}.t.{hash}`; a node subscribes to
//!   it while it has members of the topic (interest routing), and a join is answered only once
//!   the server has the subscription (`interest`: a request the server answers itself orders
//!   after the SUB). Order is kept per sender: one connection, one writer task, one reader task
//!   per topic.
//! - **Presence.** Each node owns its channels' metas and sends every diff of them, numbered,
//!   on `{prefix}.pres.{hash}`; every node follows all of them and keeps a copy per origin
//!   incarnation (`crate::topics::presence`). A gap in the numbers, an unknown node, a node
//!   seen again after it was down: the copy is replaced by a snapshot the origin answers on
//!   `{prefix}.node.{incarnation}`. Heartbeats (`{prefix}.node.hb`) carry the last number; a
//!   node not heard from for `NODE_DOWN_AFTER_MS` is dropped (its members leave), and one that
//!   says it is leaving is dropped at once.
//! - **Without NATS** each node serves its own sockets as a single node does; what could not
//!   reach the others is counted (`realtime_cluster_dropped_total`), and presence is asked for
//!   again from every node once the connection is back.
//!
//! Postgres Changes and broadcasts from the database never pass here: every node reads them
//! from the change log.

mod envelope;
mod peers;

use crate::topics::bus::Ready;
use crate::topics::{Bus, Message, NodeId, Registry, TopicKey};
use bytes::Bytes;
use envelope::{Body, Delta, Heartbeat};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Messages waiting for the connection, at most (then they are dropped and counted).
const QUEUE_MESSAGES: usize = 65_536;
/// Bytes waiting for the connection, at most.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long a join waits for its topic's subscription to reach the server.
const INTEREST_WAIT: Duration = Duration::from_secs(2);
/// How long a snapshot request waits for its answer.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3);
/// What the envelope adds to a payload at most (ids, event name, topic), for the `max_payload` check.
pub(crate) const ENVELOPE_ALLOWANCE: usize = 4096;

/// How the node joins the cluster.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// NATS servers, `nats://host:port`, comma-separated.
    pub(crate) urls: String,
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) heartbeat: Duration,
    pub(crate) down_after: Duration,
    pub(crate) linger: Duration,
    /// The largest message this node may publish (the payload cap and the envelope): a server
    /// whose `max_payload` is smaller drops those, so it is said at every connect.
    pub(crate) largest_message: usize,
}

/// Counters of the cluster, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ClusterMetrics {
    pub(crate) published: AtomicU64,
    pub(crate) received: AtomicU64,
    /// Messages that could not reach the other nodes (no connection, a full queue).
    pub(crate) dropped: AtomicU64,
    /// Envelopes that could not be read.
    pub(crate) malformed: AtomicU64,
    pub(crate) snapshots_requested: AtomicU64,
    pub(crate) snapshots_applied: AtomicU64,
    pub(crate) nodes_down: AtomicU64,
    pub(crate) slow_consumer: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) subscriptions: AtomicU64,
}

/// This node's side of the cluster: its identity, its NATS connection and what it follows.
pub(crate) struct Cluster {
    node: NodeId,
    name: String,
    prefix: String,
    settings: Settings,
    client: async_nats::Client,
    connected: AtomicBool,
    queue: Queue,
    /// Presence diffs are numbered and queued under one lock, so they leave in number order.
    presence: Mutex<u64>,
    registry: OnceLock<Weak<Registry>>,
    interest: Mutex<HashMap<TopicKey, Interest>>,
    pub(crate) metrics: ClusterMetrics,
    pub(crate) peers_up: AtomicU64,
    /// Set by the connection's events: presence is asked for again.
    resync: tokio::sync::Notify,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A topic this node follows.
struct Interest {
    ready: watch::Receiver<bool>,
    /// The last join that wanted it: it is kept for the linger time after that.
    wanted: Instant,
    task: tokio::task::AbortHandle,
}

/// The writer's queue, bounded in messages and bytes.
struct Queue {
    tx: mpsc::Sender<(String, Bytes)>,
    bytes: Arc<AtomicU64>,
}

impl Cluster {
    /// Connects (in the background when the server is not there yet) and starts the node's
    /// tasks. The registry is attached with [`Cluster::attach`] before anything is published.
    pub(crate) async fn start(
        settings: Settings,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Cluster>, String> {
        let node = NodeId::random();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let options = async_nats::ConnectOptions::new()
            .name(format!("realtime-gateway {}", settings.name))
            .no_echo()
            .ping_interval(Duration::from_secs(2))
            .connection_timeout(Duration::from_secs(2))
            .subscription_capacity(8192)
            .client_capacity(8192)
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        // A comma list: async-nats parses a string as one address, a list as several.
        let servers: Vec<&str> = settings
            .urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if servers.is_empty() {
            return Err("CLUSTER_NATS_URL: no server".into());
        }
        let client = options
            .connect(servers.as_slice())
            .await
            .map_err(|e| format!("CLUSTER_NATS_URL: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        let bytes = Arc::new(AtomicU64::new(0));
        let cluster = Arc::new(Cluster {
            node,
            name: settings.name.clone(),
            prefix: settings.prefix.clone(),
            settings,
            connected: AtomicBool::new(
                client.connection_state() == async_nats::connection::State::Connected,
            ),
            client,
            queue: Queue {
                tx,
                bytes: bytes.clone(),
            },
            presence: Mutex::new(0),
            registry: OnceLock::new(),
            interest: Mutex::new(HashMap::new()),
            metrics: ClusterMetrics::default(),
            peers_up: AtomicU64::new(0),
            resync: tokio::sync::Notify::new(),
        });
        info!(node = %cluster.name, incarnation = %format_args!("{:016x}", node.0), "cluster: joining over NATS");
        tracker.spawn(write_loop(cluster.clone(), rx, bytes, shutdown.clone()));
        tracker.spawn(events_loop(cluster.clone(), events_rx, shutdown.clone()));
        tracker.spawn(peers::run(cluster.clone(), shutdown.clone()));
        tracker.spawn(sweep_interest(cluster.clone(), shutdown));
        if cluster.is_connected() {
            cluster.check_max_payload();
        }
        Ok(cluster)
    }

    /// Warns when the server would refuse this node's largest messages (they are dropped and
    /// counted in `realtime_cluster_dropped_total`).
    fn check_max_payload(&self) {
        let limit = self.client.server_info().max_payload;
        if limit < self.settings.largest_message {
            warn!(
                server_max_payload = limit,
                largest_message = self.settings.largest_message,
                "cluster: the NATS server's max_payload is below MAX_PAYLOAD_SIZE_IN_KB: larger broadcasts stay on their node (set max_payload: 8MB in nats-server's config)"
            );
        }
    }

    pub(crate) fn node(&self) -> NodeId {
        self.node
    }

    pub(crate) fn attach(&self, registry: &Arc<Registry>) {
        let _ = self.registry.set(Arc::downgrade(registry));
    }

    fn registry(&self) -> Option<Arc<Registry>> {
        self.registry.get().and_then(Weak::upgrade)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Follows the client's connection state: the events that also say it can be lost (the
    /// client drops them when their queue is full).
    fn set_connected(&self, up: bool) {
        let was = self.connected.swap(up, Ordering::AcqRel);
        if up && !was {
            Self::count(&self.metrics.reconnects);
            info!("cluster: NATS connection up");
            self.check_max_payload();
            self.resync.notify_one();
        } else if !up && was {
            warn!(
                "cluster: NATS connection lost; serving this node's sockets only until it is back"
            );
        }
    }

    /// Called every check tick: the state the client reports wins over the events seen.
    pub(super) fn reconcile_connection(&self) {
        let up = self.client.connection_state() == async_nats::connection::State::Connected;
        if up != self.is_connected() {
            self.set_connected(up);
        }
    }

    fn subject(&self, kind: &str, topic: &TopicKey) -> String {
        format!("{}.{kind}.{}", self.prefix, topic_hash(topic))
    }

    /// Queues a message for the other nodes; never waits. False when it was dropped.
    fn send(&self, subject: String, payload: Bytes) -> bool {
        let size = payload.len() as u64;
        if !self.is_connected()
            || self.queue.bytes.load(Ordering::Relaxed) + size > QUEUE_BYTES as u64
        {
            Self::count(&self.metrics.dropped);
            return false;
        }
        self.queue.bytes.fetch_add(size, Ordering::Relaxed);
        match self.queue.tx.try_send((subject, payload)) {
            Ok(()) => true,
            Err(_) => {
                self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
                Self::count(&self.metrics.dropped);
                false
            }
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The number of this node's last presence diff.
    fn presence_seq(&self) -> u64 {
        *self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues this node's heartbeat after every diff numbered so far.
    fn heartbeat(&self, leaving: bool) {
        let seq = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let hb = Heartbeat {
            name: self.name.as_str().into(),
            presence_seq: *seq,
            leaving,
        };
        // A heartbeat is sent whatever the connection's state: it waits in the client.
        let payload = envelope::heartbeat(self.node, &hb);
        let size = payload.len() as u64;
        self.queue.bytes.fetch_add(size, Ordering::Relaxed);
        if self
            .queue
            .tx
            .try_send((format!("{}.node.hb", self.prefix), payload))
            .is_err()
        {
            self.queue.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        drop(seq);
    }

    /// Follows `key`'s subject: a task reads it into the registry until it is aborted.
    fn follow(self: &Arc<Cluster>, key: &TopicKey) -> Interest {
        let (ready_tx, ready) = watch::channel(false);
        let cluster = self.clone();
        let topic = key.clone();
        let task = tokio::spawn(async move {
            let subject = cluster.subject("t", &topic);
            let mut sub = match cluster.client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(e) => {
                    warn!(error = %e, topic = %topic.topic, "cluster: could not subscribe");
                    let _ = ready_tx.send(true);
                    return;
                }
            };
            Self::count(&cluster.metrics.subscriptions);
            cluster.barrier().await;
            let _ = ready_tx.send(true);
            while let Some(message) = sub.next().await {
                cluster.receive_broadcast(&topic, &message.payload);
            }
        });
        Interest {
            ready,
            wanted: Instant::now(),
            task: task.abort_handle(),
        }
    }

    /// Returns once the server has handled everything this connection sent before: a request
    /// to a subject nobody serves is answered by the server itself ("no responders"), after
    /// the lines before it.
    async fn barrier(&self) {
        if !self.is_connected() {
            return;
        }
        let subject = format!("{}.barrier.{:016x}", self.prefix, self.node.0);
        let _ =
            tokio::time::timeout(INTEREST_WAIT, self.client.request(subject, Bytes::new())).await;
    }

    fn receive_broadcast(&self, topic: &TopicKey, payload: &Bytes) {
        match envelope::decode(payload) {
            Ok(envelope::Envelope {
                origin,
                body: Body::Broadcast(b),
                ..
            }) if origin != self.node && b.topic == *topic => {
                Self::count(&self.metrics.received);
                if let Some(registry) = self.registry() {
                    registry.receive(&b);
                }
            }
            // Our own (no_echo is per connection; a guard), or a hash collision.
            Ok(_) => {}
            Err(e) => {
                Self::count(&self.metrics.malformed);
                debug!(error = %e, "cluster: unreadable broadcast");
            }
        }
    }

    /// The Prometheus text of the cluster's state.
    pub(crate) fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let followed = self
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let mut out = String::with_capacity(2048);
        let mut series = |name: &str, kind: &str, help: &str, v: u64| {
            use std::fmt::Write;
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        series(
            "realtime_cluster_connected",
            "gauge",
            "Whether this node's NATS connection is up.",
            u64::from(self.is_connected()),
        );
        series(
            "realtime_cluster_peers",
            "gauge",
            "Other nodes heard from within NODE_DOWN_AFTER_MS.",
            load(&self.peers_up),
        );
        series(
            "realtime_cluster_topics_followed",
            "gauge",
            "Topics whose broadcasts this node receives from the others.",
            followed as u64,
        );
        for (name, help, c) in [
            (
                "realtime_cluster_published_total",
                "Messages sent to the other nodes.",
                &m.published,
            ),
            (
                "realtime_cluster_received_total",
                "Broadcasts received from the other nodes.",
                &m.received,
            ),
            (
                "realtime_cluster_dropped_total",
                "Messages that could not reach the other nodes (no NATS connection, a full queue): lost across nodes.",
                &m.dropped,
            ),
            (
                "realtime_cluster_malformed_total",
                "Messages from the bus that could not be read.",
                &m.malformed,
            ),
            (
                "realtime_cluster_presence_snapshots_requested_total",
                "Presence snapshots asked of other nodes (new node, gap, reconnect).",
                &m.snapshots_requested,
            ),
            (
                "realtime_cluster_presence_snapshots_applied_total",
                "Presence snapshots applied.",
                &m.snapshots_applied,
            ),
            (
                "realtime_cluster_nodes_down_total",
                "Nodes dropped (silent past NODE_DOWN_AFTER_MS, or leaving); their members left.",
                &m.nodes_down,
            ),
            (
                "realtime_cluster_slow_consumer_total",
                "Messages the NATS client dropped because a subscription was full.",
                &m.slow_consumer,
            ),
            (
                "realtime_cluster_reconnects_total",
                "Times the NATS connection came back.",
                &m.reconnects,
            ),
            (
                "realtime_cluster_subscriptions_total",
                "Topic subscriptions made.",
                &m.subscriptions,
            ),
        ] {
            series(name, "counter", help, load(c));
        }
        out
    }
}

impl Bus for Arc<Cluster> {
    fn forward(&self, message: Message<'_>) {
        match message {
            Message::Broadcast(b) => {
                let subject = self.subject("t", &b.topic);
                self.send(subject, envelope::broadcast(b));
            }
            Message::Presence { topic, diff, .. } => {
                let (leaves, joins) = diff.wire();
                if leaves.is_empty() && joins.is_empty() {
                    return;
                }
                let delta = Delta {
                    topic: topic.clone(),
                    leaves,
                    joins,
                };
                let subject = self.subject("pres", topic);
                // Numbered and queued in one step; a diff that cannot be queued still takes its
                // number, so the other nodes see the gap and ask for a snapshot.
                let mut seq = self.presence.lock().unwrap_or_else(|p| p.into_inner());
                *seq += 1;
                self.send(subject, envelope::delta(self.node, *seq, &delta));
            }
        }
    }

    fn interest(&self, key: &TopicKey) -> Option<Ready> {
        let mut interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.wanted(&mut interest, key);
        if *entry.ready.borrow() {
            return None;
        }
        let mut ready = entry.ready.clone();
        Some(Box::pin(async move {
            let _ = tokio::time::timeout(INTEREST_WAIT, ready.wait_for(|r| *r)).await;
        }))
    }

    fn touch(&self, key: &TopicKey) {
        // A join that outlasted the linger (a slow authorization check), whose subject the
        // sweep let go, follows it again at once.
        let mut interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        self.wanted(&mut interest, key);
    }
}

impl Cluster {
    /// `key`'s entry, wanted now; followed again when there is none or its task finished (a
    /// finished task has no subscription: it failed, or its stream ended).
    fn wanted<'m>(
        self: &Arc<Cluster>,
        interest: &'m mut HashMap<TopicKey, Interest>,
        key: &TopicKey,
    ) -> &'m mut Interest {
        let entry = match interest.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) if !e.get().task.is_finished() => {
                e.into_mut()
            }
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(self.follow(key));
                e.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.follow(key)),
        };
        entry.wanted = Instant::now();
        entry
    }
}

/// Drains the queue into the connection, in order.
async fn write_loop(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    bytes: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    // After shutdown, what is queued (the last leaves, the leaving heartbeat) still goes out,
    // for a moment.
    let mut until: Option<tokio::time::Instant> = None;
    loop {
        let next = match until {
            None => tokio::select! {
                () = shutdown.cancelled() => {
                    until = Some(tokio::time::Instant::now() + Duration::from_millis(700));
                    continue;
                }
                next = rx.recv() => next,
            },
            Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        let Some((subject, payload)) = next else {
            break;
        };
        bytes.fetch_sub(payload.len() as u64, Ordering::Relaxed);
        match cluster.client.publish(subject, payload).await {
            Ok(()) => Cluster::count(&cluster.metrics.published),
            Err(e) => {
                Cluster::count(&cluster.metrics.dropped);
                debug!(error = %e, "cluster: publish failed");
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), cluster.client.flush()).await;
}

/// Follows the connection's state.
async fn events_loop(
    cluster: Arc<Cluster>,
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.recv() => match event { Some(e) => e, None => break },
        };
        match event {
            async_nats::Event::Connected => cluster.set_connected(true),
            async_nats::Event::Disconnected => cluster.set_connected(false),
            async_nats::Event::SlowConsumer(_) => {
                Cluster::count(&cluster.metrics.slow_consumer);
                // Something was dropped: presence is checked against every node again.
                cluster.resync.notify_one();
            }
            other => debug!(event = ?other, "cluster: NATS event"),
        }
    }
}

/// Stops following topics nobody here has joined for the linger time.
async fn sweep_interest(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(registry) = cluster.registry() else {
            continue;
        };
        let linger = cluster.settings.linger;
        let mut interest = cluster.interest.lock().unwrap_or_else(|p| p.into_inner());
        interest.retain(|key, entry| {
            let keep = entry.wanted.elapsed() < linger || registry.get(key).is_some();
            if !keep {
                entry.task.abort();
            }
            keep
        });
    }
    for entry in cluster
        .interest
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
    {
        entry.1.task.abort();
    }
}

/// The subject token of a topic: 128 bits of SHA-256 of (private, topic), base32, 26
/// characters (topics are any text; subjects may not hold `.`, `*`, `>` or spaces).
pub(crate) fn topic_hash(topic: &TopicKey) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[u8::from(topic.private)]);
    ctx.update(topic.topic.as_bytes());
    let digest = ctx.finish();
    base32(&digest.as_ref()[..16])
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_subjects_are_safe_tokens_and_tell_private_from_public() {
        let key = |private, topic: &str| TopicKey {
            private,
            topic: Arc::from(topic),
        };
        let a = topic_hash(&key(false, "realtime:room 1.*>"));
        assert_eq!(a.len(), 26);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(a, topic_hash(&key(true, "realtime:room 1.*>")));
        assert_eq!(a, topic_hash(&key(false, "realtime:room 1.*>")));
        assert_eq!(base32(b"f"), "my");
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    }
}
