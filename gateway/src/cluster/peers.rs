//! The other nodes: heartbeats, presence diffs in number order, snapshots, nodes going down.
//!
//! One task owns every peer's record, so the order of what happens to a peer is the order its
//! messages are read in. A peer's copy is *synced* while its diffs arrive without a gap; else
//! (a new node, a gap, a node seen again after it was down, a reconnect) its snapshot is asked
//! for, the diffs that arrive meanwhile wait, and those numbered after the snapshot are applied
//! on top of it.

use super::envelope::{self, Body, Delta};
use super::{Cluster, SNAPSHOT_WAIT};
use crate::topics::presence::WireMeta;
use crate::topics::{NodeId, TopicKey};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Diffs kept while a snapshot is awaited, at most (past it they are dropped: the next
/// snapshot covers them).
const MAX_WAITING: usize = 10_000;
/// How long a node that left or was replaced is ignored.
const TOMBSTONE: Duration = Duration::from_secs(600);

type Snapshot = Vec<(TopicKey, Vec<WireMeta>)>;

struct Peer {
    name: Box<str>,
    heard: Instant,
    up: bool,
    synced: bool,
    /// The number of its last diff applied here.
    applied: u64,
    asking: bool,
    waiting: Vec<(u64, Delta)>,
    behind_since: Option<Instant>,
}

impl Peer {
    fn new(now: Instant) -> Peer {
        Peer {
            name: "".into(),
            heard: now,
            up: true,
            synced: false,
            applied: 0,
            asking: false,
            waiting: Vec::new(),
            behind_since: None,
        }
    }
}

struct Peers {
    cluster: Arc<Cluster>,
    peers: HashMap<NodeId, Peer>,
    gone: HashMap<NodeId, Instant>,
    answers: mpsc::UnboundedSender<(NodeId, Option<(u64, Snapshot)>)>,
}

pub(super) async fn run(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let prefix = cluster.prefix.clone();
    let client = cluster.client.clone();
    let subscribe = |subject: String| {
        let client = client.clone();
        async move { client.subscribe(subject).await }
    };
    let (Ok(mut diffs), Ok(mut beats), Ok(mut asks)) = (
        subscribe(format!("{prefix}.pres.*")).await,
        subscribe(format!("{prefix}.node.hb")).await,
        subscribe(format!("{prefix}.node.{:016x}", cluster.node.0)).await,
    ) else {
        warn!("cluster: could not subscribe to presence and heartbeats; presence stays local");
        return;
    };
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut state = Peers {
        cluster: cluster.clone(),
        peers: HashMap::new(),
        gone: HashMap::new(),
        answers,
    };
    let heartbeat = cluster.settings.heartbeat;
    // Down after four heartbeats of silence, checked four times a heartbeat: within
    // NODE_DOWN_AFTER_MS of a node's death whenever the heartbeat is a quarter of it or less.
    let silence = cluster
        .settings
        .down_after
        .saturating_sub(heartbeat)
        .max(heartbeat * 2);
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(heartbeat / 4);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            // Ticks first: a flood of diffs never holds up this node's heartbeat or the check.
            _ = beat.tick() => cluster.heartbeat(false),
            _ = check.tick() => {
                let now = Instant::now();
                let frozen = now.duration_since(last_check) > silence / 2;
                last_check = now;
                cluster.reconcile_connection();
                state.check(now, silence, frozen);
            }
            Some(m) = diffs.next() => state.on_diff(&m.payload),
            Some(m) = beats.next() => state.on_heartbeat(&m.payload),
            Some(m) = asks.next() => {
                if let Some(reply) = m.reply {
                    state.answer(reply.to_string());
                }
            }
            Some((node, answer)) = answered.recv() => state.on_snapshot(node, answer),
            () = cluster.resync.notified() => {
                info!("cluster: asking every node for its presence again");
                cluster.heartbeat(false);
                for peer in state.peers.values_mut() {
                    peer.synced = false;
                }
                let ids: Vec<NodeId> = state.peers.keys().copied().collect();
                for id in ids {
                    state.ask(id);
                }
            }
        }
    }
    // Leaving: the others drop this node's members at once.
    cluster.heartbeat(true);
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        // The writer sends it; wait until the queue is empty, then for the socket.
        while cluster
            .queue
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = cluster.client.flush().await;
    })
    .await;
}

impl Peers {
    /// The record of a node heard from now, unless it left.
    fn peer(&mut self, node: NodeId, now: Instant) -> Option<&mut Peer> {
        if node == self.cluster.node || self.gone.contains_key(&node) {
            return None;
        }
        Some(self.peers.entry(node).or_insert_with(|| Peer::new(now)))
    }

    fn on_diff(&mut self, payload: &Bytes) {
        let (origin, seq, delta) = match envelope::decode(payload) {
            Ok(envelope::Envelope {
                origin,
                seq,
                body: Body::Presence(delta),
            }) => (origin, seq, delta),
            Ok(_) => return,
            Err(_) => {
                Cluster::count(&self.cluster.metrics.malformed);
                return;
            }
        };
        let Some(peer) = self.peer(origin, Instant::now()) else {
            return;
        };
        if peer.synced && Some(seq) == peer.applied.checked_add(1) {
            peer.applied = seq;
            if let Some(registry) = self.cluster.registry() {
                registry.receive_presence(origin, &delta.topic, &delta.leaves, &delta.joins);
            }
            return;
        }
        if peer.synced && seq <= peer.applied {
            return;
        }
        // A gap, or no copy yet: wait for a snapshot.
        peer.synced = false;
        if peer.waiting.len() < MAX_WAITING {
            peer.waiting.push((seq, delta));
        }
        self.ask(origin);
    }

    fn on_heartbeat(&mut self, payload: &Bytes) {
        let Ok(envelope::Envelope {
            origin,
            body: Body::Heartbeat(hb),
            ..
        }) = envelope::decode(payload)
        else {
            return;
        };
        let now = Instant::now();
        if origin == self.cluster.node || self.gone.contains_key(&origin) {
            // Ourselves, or an incarnation that left or was replaced: it replaces nobody.
            return;
        }
        if hb.leaving {
            if self.peers.contains_key(&origin) {
                info!(node = %hb.name, "cluster: node left");
                self.drop_node(origin);
            }
            self.gone.insert(origin, now);
            return;
        }
        // A node with the name of another incarnation restarted: the old one is gone.
        let replaced: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| **id != origin && *p.name == *hb.name)
            .map(|(id, _)| *id)
            .collect();
        for old in replaced {
            info!(node = %hb.name, "cluster: node restarted; its former members left");
            self.drop_node(old);
            self.gone.insert(old, now);
        }
        let heartbeat = self.cluster.settings.heartbeat;
        let Some(peer) = self.peer(origin, now) else {
            return;
        };
        peer.heard = now;
        if *peer.name != *hb.name {
            peer.name = hb.name.clone();
        }
        if !peer.up {
            info!(node = %hb.name, "cluster: node is back");
            peer.up = true;
            peer.synced = false;
        }
        if peer.synced {
            // Behind for more than a heartbeat: a diff was lost on the way.
            if hb.presence_seq > peer.applied {
                let since = *peer.behind_since.get_or_insert(now);
                if now.duration_since(since) > heartbeat {
                    peer.synced = false;
                }
            } else {
                peer.behind_since = None;
            }
        }
        if !peer.synced {
            self.ask(origin);
        }
    }

    /// Asks `node` for its presence, unless that is already under way.
    fn ask(&mut self, node: NodeId) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if peer.asking {
            return;
        }
        peer.asking = true;
        Cluster::count(&self.cluster.metrics.snapshots_requested);
        let client = self.cluster.client.clone();
        let subject = format!("{}.node.{:016x}", self.cluster.prefix, node.0);
        let answers = self.answers.clone();
        tokio::spawn(async move {
            let answer =
                match tokio::time::timeout(SNAPSHOT_WAIT, client.request(subject, Bytes::new()))
                    .await
                {
                    Ok(Ok(message)) => match envelope::decode(&message.payload) {
                        Ok(envelope::Envelope {
                            seq,
                            body: Body::Snapshot(topics),
                            ..
                        }) => Some((seq, topics)),
                        _ => None,
                    },
                    _ => None,
                };
            let _ = answers.send((node, answer));
        });
    }

    fn on_snapshot(&mut self, node: NodeId, answer: Option<(u64, Snapshot)>) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        peer.asking = false;
        let Some((seq, topics)) = answer else {
            // Asked again at its next heartbeat.
            return;
        };
        if !peer.up {
            return;
        }
        let Some(registry) = self.cluster.registry() else {
            return;
        };
        registry.replace_node(node, topics);
        Cluster::count(&self.cluster.metrics.snapshots_applied);
        peer.applied = seq;
        peer.synced = true;
        peer.behind_since = None;
        let mut waiting = std::mem::take(&mut peer.waiting);
        waiting.sort_by_key(|(seq, _)| *seq);
        let mut rest = Vec::new();
        for (seq, delta) in waiting {
            if !peer.synced || seq > peer.applied.saturating_add(1) {
                peer.synced = false;
                rest.push((seq, delta));
            } else if Some(seq) == peer.applied.checked_add(1) {
                peer.applied = seq;
                registry.receive_presence(node, &delta.topic, &delta.leaves, &delta.joins);
            }
        }
        if !peer.synced {
            peer.waiting = rest;
            self.ask(node);
        }
    }

    /// Answers a snapshot request with what this node's channels hold (sent by a task of its
    /// own, so a full connection never holds up this loop).
    fn answer(&self, reply: String) {
        let Some(registry) = self.cluster.registry() else {
            return;
        };
        // The number first: every diff up to it is in the state read after it.
        let seq = self.cluster.presence_seq();
        let owned = registry.owned_presence();
        let payload = envelope::snapshot(self.cluster.node, seq, &owned);
        let client = self.cluster.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.publish(reply, payload).await {
                warn!(error = %e, "cluster: could not answer a presence snapshot request");
            }
        });
    }

    /// Drops nodes silent for `silence`; after this node itself was frozen (`frozen`), the
    /// others get a fresh start instead, and their presence is asked for again.
    fn check(&mut self, now: Instant, silence: Duration, frozen: bool) {
        if frozen {
            warn!("cluster: this node was stalled; asking the others for their presence again");
            for peer in self.peers.values_mut() {
                peer.heard = now;
                peer.synced = false;
            }
        }
        let down: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up && now.duration_since(p.heard) > silence)
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            if let Some(peer) = self.peers.get_mut(&id) {
                warn!(node = %peer.name, silent_ms = now.duration_since(peer.heard).as_millis() as u64, "cluster: node down; its members left");
                peer.up = false;
                peer.synced = false;
                peer.waiting.clear();
            }
            if let Some(registry) = self.cluster.registry() {
                registry.replace_node(id, Vec::new());
            }
            Cluster::count(&self.cluster.metrics.nodes_down);
        }
        // Nodes down for long are forgotten (a new incarnation is a new node anyway).
        self.peers
            .retain(|_, p| p.up || now.duration_since(p.heard) < TOMBSTONE);
        self.gone
            .retain(|_, at| now.duration_since(*at) < TOMBSTONE);
        let up = self.peers.values().filter(|p| p.up).count() as u64;
        self.cluster
            .peers_up
            .store(up, std::sync::atomic::Ordering::Relaxed);
    }

    fn drop_node(&mut self, node: NodeId) {
        if self.peers.remove(&node).is_some() {
            Cluster::count(&self.cluster.metrics.nodes_down);
        }
        if let Some(registry) = self.cluster.registry() {
            registry.replace_node(node, Vec::new());
        }
    }
}
