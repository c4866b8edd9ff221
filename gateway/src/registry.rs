//! The registry: topic → members, the one shared mutable structure of the fan-out.
//!
//! Sharded by topic; every critical section is short and synchronous, and no guard is ever held
//! across an `.await`. Lock order is shard map, then a topic's member list.
//!
//! Fan-out ([`Topic::publish`]) encodes a message at most once per frame kind its members need
//! (V1 text, V2 text, V2 binary) and pushes the shared bytes into each member's outbox without
//! waiting: the cost per recipient is a reference-count increment and a queue push.

use crate::outbox::{Frame, Outbox};
use crate::presence::{Diff, PresenceState};
use realtime_protocol::binary::{self, PayloadEncoding};
use realtime_protocol::{Vsn, payload};
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;

/// A channel's identity in the registry: private and public channels with the same name are
/// different channels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TopicKey {
    pub(crate) private: bool,
    /// The join topic, `realtime:<sub_topic>`.
    pub(crate) topic: Arc<str>,
}

/// Unique per joined channel for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MemberId(pub(crate) u64);

/// One joined channel as the fan-out sees it.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub(crate) id: MemberId,
    pub(crate) outbox: Outbox,
    pub(crate) vsn: Vsn,
    /// What the channel may receive (private channels: from RLS; public: everything).
    pub(crate) read: Arc<ReadAccess>,
}

/// Read permissions of a channel, shared by the channel (which re-checks them on token
/// refresh) and the fan-out (which skips members that may not read).
#[derive(Debug)]
pub(crate) struct ReadAccess {
    broadcast: AtomicBool,
    presence: AtomicBool,
    /// Ids of the messages replayed at join: the same messages arriving live are not delivered
    /// twice.
    replayed: std::sync::OnceLock<Box<[Box<str>]>>,
}

impl ReadAccess {
    pub(crate) fn new(broadcast: bool, presence: bool) -> Arc<ReadAccess> {
        Arc::new(ReadAccess {
            broadcast: AtomicBool::new(broadcast),
            presence: AtomicBool::new(presence),
            replayed: std::sync::OnceLock::new(),
        })
    }

    /// A public channel reads everything.
    pub(crate) fn public() -> Arc<ReadAccess> {
        ReadAccess::new(true, true)
    }

    pub(crate) fn set(&self, broadcast: bool, presence: bool) {
        self.broadcast.store(broadcast, Ordering::Relaxed);
        self.presence.store(presence, Ordering::Relaxed);
    }

    pub(crate) fn broadcast(&self) -> bool {
        self.broadcast.load(Ordering::Relaxed)
    }

    pub(crate) fn presence(&self) -> bool {
        self.presence.load(Ordering::Relaxed)
    }

    /// Remembers the ids replayed at join.
    pub(crate) fn set_replayed(&self, ids: Vec<Box<str>>) {
        let _ = self.replayed.set(ids.into_boxed_slice());
    }

    fn was_replayed(&self, id: &str) -> bool {
        self.replayed
            .get()
            .is_some_and(|ids| ids.iter().any(|r| &**r == id))
    }
}

/// A message to fan out to a topic's members.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outgoing<'a> {
    /// A fastlane push with a JSON payload (`broadcast` relayed from JSON, `presence_diff`,
    /// `postgres_changes`): a text frame with `null` refs in each member's serializer.
    Push { event: &'a str, payload: &'a str },
    /// A user broadcast (binary push, REST single endpoint, database): kind 4 to V2 sockets;
    /// converted to a JSON `broadcast` for V1 sockets, or dropped for them when binary.
    User {
        event: &'a str,
        metadata: Option<&'a str>,
        encoding: PayloadEncoding,
        payload: &'a [u8],
    },
}

/// What a fan-out did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
}

#[derive(Debug)]
pub(crate) struct Topic {
    key: TopicKey,
    inner: Mutex<TopicInner>,
}

/// A topic's members and presence, under one lock so that a joiner's `presence_state` and the
/// diffs it receives afterwards never overlap or miss a change.
#[derive(Debug, Default)]
pub(crate) struct TopicInner {
    members: Vec<Member>,
    pub(crate) presence: PresenceState,
}

type Shard = Mutex<HashMap<TopicKey, Arc<Topic>>>;

#[derive(Debug)]
pub(crate) struct Registry {
    shards: Box<[Shard]>,
    next_member: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_member: AtomicU64::new(1),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Registry {
    pub(crate) fn next_member_id(&self) -> MemberId {
        MemberId(self.next_member.fetch_add(1, Ordering::Relaxed))
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
        member: Member,
        joined: impl FnOnce(&TopicInner),
    ) -> Arc<Topic> {
        let mut shard = lock(self.shard(&key));
        let topic = shard
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Topic {
                    key,
                    inner: Mutex::new(TopicInner::default()),
                })
            })
            .clone();
        let mut inner = lock(&topic.inner);
        inner.members.push(member);
        joined(&inner);
        drop(inner);
        topic
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
                publish_diff(&topic.key, &inner, &diff);
            }
            inner.members.is_empty()
        };
        if now_empty {
            let mut shard = lock(self.shard(&topic.key));
            let still_empty = lock(&topic.inner).members.is_empty();
            if still_empty
                && shard
                    .get(&topic.key)
                    .is_some_and(|current| Arc::ptr_eq(current, topic))
            {
                shard.remove(&topic.key);
            }
        }
    }

    /// The topic, when anyone is joined to it.
    pub(crate) fn get(&self, key: &TopicKey) -> Option<Arc<Topic>> {
        lock(self.shard(key)).get(key).cloned()
    }

    /// Number of topics with members.
    #[cfg(test)]
    pub(crate) fn topic_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl Topic {
    /// Fans a message out to every member but `skip`.
    /// Fans out a broadcast from the database: like [`Topic::publish`], but a member that had
    /// message `id` replayed at join does not get it again.
    pub(crate) fn publish_stored(&self, message: &Outgoing<'_>, id: &str) -> Delivery {
        let inner = lock(&self.inner);
        fan_out(
            &self.key,
            &inner.members,
            message,
            None,
            |read| read.broadcast(),
            Some(id),
        )
    }

    pub(crate) fn publish(&self, message: &Outgoing<'_>, skip: Option<MemberId>) -> Delivery {
        let inner = lock(&self.inner);
        fan_out(
            &self.key,
            &inner.members,
            message,
            skip,
            ReadAccess::broadcast,
            None,
        )
    }

    /// Changes the presence state; a resulting diff goes to every member as `presence_diff`.
    /// Returns what `change` returned about the diff (whether there was one), and runs `after`
    /// under the same lock with the new state.
    pub(crate) fn presence<R>(
        &self,
        change: impl FnOnce(&mut PresenceState) -> Option<Diff>,
        after: impl FnOnce(&PresenceState) -> R,
    ) -> (bool, R) {
        let mut inner = lock(&self.inner);
        let diff = change(&mut inner.presence);
        if let Some(diff) = &diff {
            publish_diff(&self.key, &inner, diff);
        }
        let r = after(&inner.presence);
        (diff.is_some(), r)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).members.len()
    }
}

fn publish_diff(key: &TopicKey, inner: &TopicInner, diff: &Diff) -> Delivery {
    let payload = diff.render();
    fan_out(
        key,
        &inner.members,
        &Outgoing::Push {
            event: "presence_diff",
            payload: &payload,
        },
        None,
        ReadAccess::presence,
        None,
    )
}

fn fan_out(
    key: &TopicKey,
    members: &[Member],
    message: &Outgoing<'_>,
    skip: Option<MemberId>,
    may_read: fn(&ReadAccess) -> bool,
    stored_id: Option<&str>,
) -> Delivery {
    let mut encoded = Encoded::default();
    let mut delivery = Delivery::default();
    for member in members {
        if Some(member.id) == skip || !may_read(&member.read) {
            continue;
        }
        if stored_id.is_some_and(|id| member.read.was_replayed(id)) {
            continue;
        }
        let Some(frame) = encoded.get(&key.topic, member.vsn, message) else {
            continue;
        };
        if member.outbox.push(frame.clone()) {
            delivery.delivered += 1;
        } else {
            delivery.dropped += 1;
        }
    }
    delivery
}

/// Frames of one message, encoded on first need per serializer.
#[derive(Default)]
struct Encoded {
    v1: Option<Option<Frame>>,
    v2: Option<Option<Frame>>,
}

impl Encoded {
    fn get(&mut self, topic: &str, vsn: Vsn, message: &Outgoing<'_>) -> Option<&Frame> {
        let slot = match vsn {
            Vsn::V1 => &mut self.v1,
            Vsn::V2 => &mut self.v2,
        };
        slot.get_or_insert_with(|| encode(topic, vsn, message))
            .as_ref()
    }
}

/// Encodes a fan-out message for one serializer; `None` when it must not reach such sockets.
pub(crate) fn encode(topic: &str, vsn: Vsn, message: &Outgoing<'_>) -> Option<Frame> {
    match *message {
        Outgoing::Push { event, payload } => {
            Some(Frame::text(vsn.encode(None, None, topic, event, payload)))
        }
        Outgoing::User {
            event,
            metadata,
            encoding,
            payload,
        } => {
            if vsn == Vsn::V2
                && let Ok(frame) = binary::encode_user_broadcast(
                    topic,
                    event,
                    metadata.unwrap_or("").as_bytes(),
                    encoding,
                    payload,
                )
            {
                return Some(Frame::Binary(frame));
            }
            if encoding == PayloadEncoding::Binary {
                return None;
            }
            let json = std::str::from_utf8(payload).ok()?;
            let body = payload::user_broadcast_json(event, json, metadata);
            Some(Frame::text(vsn.encode(
                None,
                None,
                topic,
                "broadcast",
                &body,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::outbox;
    use tokio_util::sync::CancellationToken;

    fn key(name: &str) -> TopicKey {
        TopicKey {
            private: false,
            topic: Arc::from(format!("realtime:{name}")),
        }
    }

    #[tokio::test]
    async fn publish_encodes_per_serializer_and_skips_sender() {
        let registry = Registry::default();
        let (o1, mut r1) = outbox(8, 1 << 20, CancellationToken::new());
        let (o2, mut r2) = outbox(8, 1 << 20, CancellationToken::new());
        let a = Member {
            id: registry.next_member_id(),
            outbox: o1,
            vsn: Vsn::V1,
            read: ReadAccess::public(),
        };
        let b = Member {
            id: registry.next_member_id(),
            outbox: o2,
            vsn: Vsn::V2,
            read: ReadAccess::public(),
        };
        let topic = registry.join(key("room1"), a.clone(), |_| {});
        registry.join(key("room1"), b.clone(), |_| {});
        let d = topic.publish(
            &Outgoing::Push {
                event: "broadcast",
                payload: "{\"x\":1}",
            },
            Some(a.id),
        );
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
        let d = topic.publish(
            &Outgoing::User {
                event: "cursor",
                metadata: None,
                encoding: PayloadEncoding::Binary,
                payload: b"\x01",
            },
            None,
        );
        assert_eq!(d.delivered, 1, "binary payloads never reach V1 sockets");
        assert!(matches!(r2.recv().await, Some(Frame::Binary(_))));
        let d = topic.publish(
            &Outgoing::User {
                event: "cursor",
                metadata: Some("{\"id\":\"x\"}"),
                encoding: PayloadEncoding::Json,
                payload: b"{\"x\":1}",
            },
            None,
        );
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
        let registry = Registry::default();
        let (o, _r) = outbox(8, 1 << 20, CancellationToken::new());
        let m = Member {
            id: registry.next_member_id(),
            outbox: o,
            vsn: Vsn::V2,
            read: ReadAccess::public(),
        };
        let t = registry.join(key("a"), m.clone(), |_| {});
        assert_eq!(registry.topic_count(), 1);
        assert_eq!(t.len(), 1);
        registry.leave(&t, m.id);
        assert_eq!(registry.topic_count(), 0);
        assert!(registry.get(&key("a")).is_none());
    }
}
