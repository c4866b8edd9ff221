//! Topics: who is joined where on this node, the presence state of each topic, and the seam
//! through which what clients publish reaches the other nodes.
//!
//! - `member`: the membership object ([`Member`]), shared by every delivery path.
//! - `fanout`: encode once per serializer, push to every member's outbox.
//! - `presence`: Phoenix.Presence state per topic and its diffs.
//! - `bus`: [`Bus`], where a publish leaves the node, and [`LocalBus`], the single node's.
//!
//! In a cluster a topic's presence also holds the other nodes' metas; a topic with no member
//! here keeps them aside (`dormant`, in the topic's shard) until someone joins.
//!
//! The registry is sharded by topic; every critical section is short and synchronous, and no
//! guard is ever held across an `.await`. Lock order is shard map, then a topic's member list.
//! A topic's members and presence sit under one lock, so that a joiner's `presence_state` and
//! the diffs it receives afterwards never overlap or miss a change.

pub(crate) mod bus;
pub(crate) mod fanout;
pub(crate) mod member;
pub(crate) mod presence;

pub(crate) use bus::{Broadcast, BroadcastBody, Bus, LocalBus, Message, NodeId, Origin};
pub(crate) use fanout::{Audience, Delivery, Outgoing};
pub(crate) use member::{Member, MemberId, ReadAccess, TopicKey};

use crate::outbox::Outbox;
use presence::{Diff, PresenceState, WireMeta};
use realtime_protocol::Vsn;
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;

#[derive(Debug)]
pub(crate) struct Topic {
    key: TopicKey,
    bus: Arc<dyn Bus>,
    inner: Mutex<TopicInner>,
}

/// A topic's members and presence.
#[derive(Debug, Default)]
pub(crate) struct TopicInner {
    members: Vec<Arc<Member>>,
    pub(crate) presence: PresenceState,
}

/// The topics of one shard, and the other nodes' presence of topics nobody here is joined to.
#[derive(Debug, Default)]
struct ShardInner {
    topics: HashMap<TopicKey, Arc<Topic>>,
    dormant: HashMap<TopicKey, PresenceState>,
}

type Shard = Mutex<ShardInner>;

#[derive(Debug)]
pub(crate) struct Registry {
    shards: Box<[Shard]>,
    next_member: AtomicU64,
    bus: Arc<dyn Bus>,
    node: NodeId,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a new member is made of; the registry gives it its id and the topic's shared name.
#[derive(Debug)]
pub(crate) struct NewMember {
    pub(crate) outbox: Outbox,
    pub(crate) vsn: Vsn,
    pub(crate) read: ReadAccess,
    pub(crate) resume: Option<Arc<crate::resume::Cursor>>,
}

impl Registry {
    pub(crate) fn new(bus: Arc<dyn Bus>, node: NodeId) -> Registry {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_member: AtomicU64::new(1),
            bus,
            node,
        }
    }

    /// This node's identity, the origin of what its clients publish.
    pub(crate) fn node(&self) -> NodeId {
        self.node
    }

    fn shard(&self, key: &TopicKey) -> &Shard {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % self.shards.len()]
    }

    /// Adds a member to a topic, creating the topic when needed. `joined` runs under the topic's
    /// lock right after the member is added: what it queues reaches the member before any
    /// fan-out that follows the join.
    pub(crate) fn join(
        &self,
        key: TopicKey,
        new: NewMember,
        joined: impl FnOnce(&Member, &TopicInner),
    ) -> (Arc<Topic>, Arc<Member>) {
        self.bus.touch(&key);
        let mut guard = lock(self.shard(&key));
        let shard = &mut *guard;
        let topic = shard
            .topics
            .entry(key.clone())
            .or_insert_with(|| {
                let presence = shard.dormant.remove(&key).unwrap_or_default();
                Arc::new(Topic {
                    key,
                    bus: self.bus.clone(),
                    inner: Mutex::new(TopicInner {
                        members: Vec::new(),
                        presence,
                    }),
                })
            })
            .clone();
        let member = Arc::new(Member {
            id: MemberId(self.next_member.fetch_add(1, Ordering::Relaxed)),
            outbox: new.outbox,
            vsn: new.vsn,
            key: topic.key.clone(),
            read: new.read,
            resume: new.resume,
        });
        let mut inner = lock(&topic.inner);
        inner.members.push(member.clone());
        joined(&member, &inner);
        drop(inner);
        drop(guard);
        (topic, member)
    }

    /// Removes a member and its presence (the other members get the leave); an emptied topic
    /// leaves the map.
    pub(crate) fn leave(&self, topic: &Arc<Topic>, id: MemberId) {
        let now_empty = {
            let mut inner = lock(&topic.inner);
            if let Some(i) = inner.members.iter().position(|m| m.id == id) {
                inner.members.swap_remove(i);
            }
            if let Some(diff) = inner.presence.untrack(id) {
                topic.publish_diff(&inner, &diff);
            }
            inner.members.is_empty()
        };
        if now_empty {
            let mut shard = lock(self.shard(&topic.key));
            let mut inner = lock(&topic.inner);
            if inner.members.is_empty()
                && shard
                    .topics
                    .get(&topic.key)
                    .is_some_and(|current| Arc::ptr_eq(current, topic))
            {
                shard.topics.remove(&topic.key);
                // Other nodes' members stay known for the next joiner.
                let presence = std::mem::take(&mut inner.presence);
                if !presence.is_empty() {
                    shard.dormant.insert(topic.key.clone(), presence);
                }
            }
        }
    }

    /// The topic, when anyone on this node is joined to it.
    pub(crate) fn get(&self, key: &TopicKey) -> Option<Arc<Topic>> {
        lock(self.shard(key)).topics.get(key).cloned()
    }

    /// A future that ends when this node receives the other nodes' broadcasts of `key` (none
    /// when it already does): a join waits for it before it is answered.
    pub(crate) fn interest(&self, key: &TopicKey) -> Option<bus::Ready> {
        self.bus.interest(key)
    }

    /// Applies presence diffs node `node` made to topic `key` and tells this node's members
    /// what changed.
    pub(crate) fn receive_presence(
        &self,
        node: NodeId,
        key: &TopicKey,
        leaves: &[WireMeta],
        joins: &[WireMeta],
    ) -> Delivery {
        if node == self.node {
            return Delivery::default();
        }
        self.with_presence(key, |state| state.apply_remote(node, leaves, joins))
    }

    /// Runs `change` on the presence of `key`, wherever it is kept, and fans out the diff.
    fn with_presence(
        &self,
        key: &TopicKey,
        change: impl FnOnce(&mut PresenceState) -> Option<Diff>,
    ) -> Delivery {
        let mut shard = lock(self.shard(key));
        match shard.topics.get(key) {
            Some(topic) => {
                let mut inner = lock(&topic.inner);
                match change(&mut inner.presence) {
                    Some(diff) => topic.fan_out_diff(&inner, &diff),
                    None => Delivery::default(),
                }
            }
            None => {
                let state = shard.dormant.entry(key.clone()).or_default();
                change(state);
                if state.is_empty() {
                    shard.dormant.remove(key);
                }
                Delivery::default()
            }
        }
    }

    /// Makes node `node`'s presence here exactly `snapshot` (every topic it has members in),
    /// removing what it no longer holds: after a gap in its diffs, or when it comes (back).
    /// An empty snapshot removes the node (it is down or left).
    pub(crate) fn replace_node(&self, node: NodeId, snapshot: Vec<(TopicKey, Vec<WireMeta>)>) {
        if node == self.node {
            return;
        }
        let mut wanted: HashMap<TopicKey, Vec<WireMeta>> = snapshot.into_iter().collect();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let shard = &mut *shard;
            for (key, topic) in &shard.topics {
                let metas = wanted.remove(key).unwrap_or_default();
                let mut inner = lock(&topic.inner);
                if let Some(diff) = inner.presence.replace_remote(node, &metas) {
                    topic.fan_out_diff(&inner, &diff);
                }
            }
            shard.dormant.retain(|key, state| {
                let metas = wanted.remove(key).unwrap_or_default();
                state.replace_remote(node, &metas);
                !state.is_empty()
            });
        }
        // Topics nobody here knew of (or joined meanwhile).
        for (key, metas) in wanted {
            self.with_presence(&key, |state| state.replace_remote(node, &metas));
        }
    }

    /// The presence this node's own channels hold, by topic: what another node asks for.
    pub(crate) fn owned_presence(&self) -> Vec<(TopicKey, Vec<WireMeta>)> {
        let mut owned = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (key, topic) in &shard.topics {
                let metas = lock(&topic.inner).presence.local_metas();
                if !metas.is_empty() {
                    owned.push((key.clone(), metas));
                }
            }
        }
        owned
    }

    /// Publishes a broadcast that did not come from a channel of this node's (REST): this node's
    /// members of the topic get it, and so does every other node, whoever is joined here.
    pub(crate) fn publish(&self, broadcast: &Broadcast) -> Delivery {
        match self.get(&broadcast.topic) {
            Some(topic) => topic.publish(broadcast),
            None => {
                self.bus.forward(Message::Broadcast(broadcast));
                Delivery::default()
            }
        }
    }

    /// Delivers a broadcast another node published to this node's members of its topic: the
    /// entry point of a bus that reaches other nodes.
    pub(crate) fn receive(&self, broadcast: &Broadcast) -> Delivery {
        if broadcast.origin.node == self.node {
            return Delivery::default();
        }
        let Some(topic) = self.get(&broadcast.topic) else {
            return Delivery::default();
        };
        let inner = lock(&topic.inner);
        fanout::fan_out(
            &topic.key.topic,
            &inner.members,
            &Outgoing::of(broadcast),
            Audience::broadcast(None),
        )
    }

    /// Delivers a message that every node reads from the change log itself (a broadcast from
    /// the database) to this node's members only.
    pub(crate) fn deliver_stored(
        &self,
        key: &TopicKey,
        message: &Outgoing<'_>,
        id: &str,
    ) -> Delivery {
        let Some(topic) = self.get(key) else {
            return Delivery::default();
        };
        let inner = lock(&topic.inner);
        fanout::fan_out(
            &topic.key.topic,
            &inner.members,
            message,
            Audience {
                stored_id: Some(id),
                ..Audience::broadcast(None)
            },
        )
    }

    /// Number of topics with members.
    #[cfg(test)]
    pub(crate) fn topic_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).topics.len()).sum()
    }
}

impl Topic {
    /// Publishes a broadcast: this node's members get it (but the origin channel when it asked
    /// not to), then the bus takes it to the other nodes, in the same critical section.
    pub(crate) fn publish(&self, broadcast: &Broadcast) -> Delivery {
        let inner = lock(&self.inner);
        let skip = broadcast
            .skip_origin
            .then_some(broadcast.origin.member)
            .flatten();
        let delivery = fanout::fan_out(
            &self.key.topic,
            &inner.members,
            &Outgoing::of(broadcast),
            Audience::broadcast(skip),
        );
        self.bus.forward(Message::Broadcast(broadcast));
        delivery
    }

    /// Changes the presence state; a resulting diff goes to every member as `presence_diff`
    /// and to the bus. Runs `after` under the same lock with the new state.
    pub(crate) fn presence<R>(
        &self,
        change: impl FnOnce(&mut PresenceState) -> Option<Diff>,
        after: impl FnOnce(&PresenceState) -> R,
    ) -> R {
        let mut inner = lock(&self.inner);
        if let Some(diff) = change(&mut inner.presence) {
            self.publish_diff(&inner, &diff);
        }
        after(&inner.presence)
    }

    fn publish_diff(&self, inner: &TopicInner, diff: &Diff) -> Delivery {
        let delivery = self.fan_out_diff(inner, diff);
        self.bus.forward(Message::Presence {
            topic: &self.key,
            diff,
        });
        delivery
    }

    /// Sends `diff` to this node's members of the topic as `presence_diff`.
    fn fan_out_diff(&self, inner: &TopicInner, diff: &Diff) -> Delivery {
        let payload = diff.render();
        fanout::fan_out(
            &self.key.topic,
            &inner.members,
            &Outgoing::Push {
                event: "presence_diff",
                payload: &payload,
            },
            Audience::presence(),
        )
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).members.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Frame, OutboxReceiver, outbox};
    use bytes::Bytes;
    use realtime_protocol::binary::PayloadEncoding;
    use tokio_util::sync::CancellationToken;

    fn key(name: &str) -> TopicKey {
        TopicKey {
            private: false,
            topic: Arc::from(format!("realtime:{name}")),
        }
    }

    fn local() -> Registry {
        Registry::new(Arc::new(LocalBus), NodeId::random())
    }

    fn member(vsn: Vsn) -> (NewMember, OutboxReceiver) {
        let (outbox, rx) = outbox(8, 1 << 20, CancellationToken::new());
        let new = NewMember {
            outbox,
            vsn,
            read: ReadAccess::public(),
            resume: None,
        };
        (new, rx)
    }

    fn push(registry: &Registry, topic: &str, origin: Option<MemberId>, skip: bool) -> Broadcast {
        Broadcast {
            topic: key(topic),
            origin: Origin {
                node: registry.node(),
                member: origin,
            },
            skip_origin: skip,
            body: BroadcastBody::Push {
                payload: "{\"x\":1}".into(),
            },
        }
    }

    #[tokio::test]
    async fn publish_encodes_per_serializer_and_skips_sender() {
        let registry = local();
        let (a, mut r1) = member(Vsn::V1);
        let (b, mut r2) = member(Vsn::V2);
        let (topic, a) = registry.join(key("room1"), a, |_, _| {});
        registry.join(key("room1"), b, |_, _| {});
        let d = topic.publish(&push(&registry, "room1", Some(a.id), true));
        assert_eq!(
            d,
            Delivery {
                delivered: 1,
                dropped: 0
            }
        );
        assert!(r1.try_recv().is_none());
        match r2.recv().await {
            Some(Frame::Text(t)) => {
                assert_eq!(
                    t.as_str(),
                    r#"[null,null,"realtime:room1","broadcast",{"x":1}]"#
                )
            }
            other => panic!("{other:?}"),
        }
        let user = |metadata: Option<&str>, encoding, payload: &'static [u8]| Broadcast {
            body: BroadcastBody::User {
                event: "cursor".into(),
                metadata: metadata.map(Box::from),
                encoding,
                payload: Bytes::from_static(payload),
            },
            ..push(&registry, "room1", None, false)
        };
        let d = topic.publish(&user(None, PayloadEncoding::Binary, b"\x01"));
        assert_eq!(d.delivered, 1, "binary payloads never reach V1 sockets");
        assert!(matches!(r2.recv().await, Some(Frame::Binary(_))));
        let d = topic.publish(&user(
            Some("{\"id\":\"x\"}"),
            PayloadEncoding::Json,
            b"{\"x\":1}",
        ));
        assert_eq!(d.delivered, 2);
        match r1.recv().await {
            Some(Frame::Text(t)) => assert_eq!(
                t.as_str(),
                r#"{"topic":"realtime:room1","event":"broadcast","payload":{"event":"cursor","payload":{"x":1},"type":"broadcast","meta":{"id":"x"}},"ref":null}"#
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn empty_topics_leave_the_map() {
        let registry = local();
        let (m, _r) = member(Vsn::V2);
        let (t, m) = registry.join(key("a"), m, |_, _| {});
        assert_eq!(registry.topic_count(), 1);
        assert_eq!(t.len(), 1);
        assert!(
            Arc::ptr_eq(m.topic(), &t.key.topic),
            "members share the topic's name"
        );
        registry.leave(&t, m.id);
        assert_eq!(registry.topic_count(), 0);
        assert!(registry.get(&key("a")).is_none());
    }

    /// A bus that hands every broadcast to another registry, as a network bus would.
    #[derive(Debug, Default)]
    struct PairBus {
        peer: std::sync::OnceLock<Arc<Registry>>,
        /// The sending node's id, when presence is to cross too.
        node: std::sync::OnceLock<NodeId>,
        presence: std::sync::Mutex<Vec<String>>,
    }

    impl Bus for PairBus {
        fn forward(&self, message: Message<'_>) {
            match message {
                Message::Broadcast(b) => {
                    if let Some(peer) = self.peer.get() {
                        peer.receive(b);
                    }
                }
                Message::Presence { topic, diff } => {
                    lock(&self.presence).push(diff.render());
                    if let (Some(peer), Some(node)) = (self.peer.get(), self.node.get()) {
                        let (leaves, joins) = diff.wire();
                        peer.receive_presence(*node, topic, &leaves, &joins);
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn publishers_reach_other_nodes_whoever_is_joined_here() {
        let bus_a = Arc::new(PairBus::default());
        let a = Arc::new(Registry::new(bus_a.clone(), NodeId(1)));
        let b = Arc::new(Registry::new(Arc::new(LocalBus), NodeId(2)));
        bus_a.peer.set(b.clone()).unwrap();
        let (on_b, mut rx_b) = member(Vsn::V2);
        b.join(key("room"), on_b, |_, _| {});
        // Nobody is joined on node A: the publish still reaches node B, once.
        let d = a.publish(&push(&a, "room", None, false));
        assert_eq!(d.delivered, 0);
        assert!(matches!(rx_b.try_recv(), Some(Frame::Text(_))));
        assert!(rx_b.try_recv().is_none());
        // A sender on A with self: false: skipped on A, delivered on B.
        let (on_a, mut rx_a) = member(Vsn::V2);
        let (topic_a, sender) = a.join(key("room"), on_a, |_, _| {});
        topic_a.publish(&push(&a, "room", Some(sender.id), true));
        assert!(rx_a.try_recv().is_none());
        assert!(matches!(rx_b.try_recv(), Some(Frame::Text(_))));
        // A node never takes its own message back.
        assert_eq!(a.receive(&push(&a, "room", None, false)).delivered, 0);
        // Presence diffs go to the bus too, from the same critical section.
        topic_a.presence(|s| s.track(sender.id, &Arc::from("k"), "\"a\":1"), |_| ());
        a.leave(&topic_a, sender.id);
        let seen = lock(&bus_a.presence).clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].contains("\"joins\":{\"k\""), "{seen:?}");
        assert!(seen[1].contains("\"leaves\":{\"k\""), "{seen:?}");
    }

    fn texts(rx: &mut OutboxReceiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(frame) = rx.try_recv() {
            if let Frame::Text(t) = frame {
                out.push(t.as_str().to_owned());
            }
        }
        out
    }

    /// Another node's presence: a joiner here gets it in `presence_state` (kept while nobody
    /// here was joined), its diffs reach members here, and it goes when its node does.
    #[tokio::test]
    async fn other_nodes_presence_is_part_of_the_state() {
        let bus_a = Arc::new(PairBus::default());
        let a = Arc::new(Registry::new(bus_a.clone(), NodeId(1)));
        let b = Arc::new(Registry::new(Arc::new(LocalBus), NodeId(2)));
        bus_a.peer.set(b.clone()).unwrap();
        bus_a.node.set(NodeId(1)).unwrap();
        let (on_a, _rx_a) = member(Vsn::V2);
        let (topic_a, tracker) = a.join(key("room"), on_a, |_, _| {});
        topic_a.presence(
            |s| s.track(tracker.id, &Arc::from("u-a"), "\"n\":1"),
            |_| (),
        );
        // Nobody on B yet: kept aside, then in the first joiner's state.
        assert_eq!(b.topic_count(), 0);
        let (on_b, mut rx_b) = member(Vsn::V2);
        let (topic_b, watcher) = b.join(key("room"), on_b, |_, inner| {
            assert!(
                inner.presence.render().contains("\"u-a\""),
                "{}",
                inner.presence.render()
            );
        });
        assert!(texts(&mut rx_b).is_empty());
        // A re-track on A is a diff on B.
        topic_a.presence(
            |s| s.track(tracker.id, &Arc::from("u-a"), "\"n\":2"),
            |_| (),
        );
        let got = texts(&mut rx_b);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("presence_diff") && got[0].contains("\"n\":2"),
            "{got:?}"
        );
        assert_eq!(a.owned_presence().len(), 1);
        assert!(b.owned_presence().is_empty(), "B owns nothing of it");
        // The last member on B leaves and comes back: A's member is still known.
        b.leave(&topic_b, watcher.id);
        let (again, _rx) = member(Vsn::V2);
        b.join(key("room"), again, |_, inner| {
            assert!(inner.presence.render().contains("\"n\":2"));
        });
        // A snapshot of A replaces B's copy; an empty one (A is down) removes it.
        b.replace_node(NodeId(1), a.owned_presence());
        assert!(
            b.get(&key("room"))
                .unwrap()
                .inner
                .lock()
                .unwrap()
                .presence
                .render()
                .contains("\"n\":2")
        );
        b.replace_node(NodeId(1), Vec::new());
        assert_eq!(
            b.get(&key("room"))
                .unwrap()
                .inner
                .lock()
                .unwrap()
                .presence
                .render(),
            "{}"
        );
        // A node's own diffs coming back are ignored.
        assert_eq!(
            a.receive_presence(NodeId(1), &key("room"), &[], &[])
                .delivered,
            0
        );
    }
}
