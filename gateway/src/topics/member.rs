//! The membership object: one joined channel of one socket, held once and shared by the topic's
//! member list, the change index (`crate::changes`) and the channel itself.

use crate::outbox::Outbox;
use realtime_protocol::Vsn;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// A channel's identity: private and public channels with the same name are different channels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TopicKey {
    pub(crate) private: bool,
    /// The join topic, `realtime:<sub_topic>`.
    pub(crate) topic: Arc<str>,
}

/// Unique per joined channel for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MemberId(pub(crate) u64);

/// One joined channel as every delivery path sees it: where its frames go (the socket's outbox),
/// how they are serialized, the topic they carry, and what the channel may read.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) id: MemberId,
    pub(crate) outbox: Outbox,
    pub(crate) vsn: Vsn,
    /// The topic's key; its `topic` is the one allocation every member of the topic shares, so
    /// frames can be keyed by its address.
    pub(crate) key: TopicKey,
    pub(crate) read: ReadAccess,
    /// The channel's place in the change log, when it has Postgres Changes (`crate::resume`).
    pub(crate) resume: Option<Arc<crate::resume::Cursor>>,
}

impl Member {
    /// The join topic frames to this member carry.
    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.key.topic
    }
}

/// Read permissions of a channel, set by the channel (at join and on token refresh) and read by
/// the fan-out, which skips members that may not read.
#[derive(Debug)]
pub(crate) struct ReadAccess {
    broadcast: AtomicBool,
    presence: AtomicBool,
    /// Ids of the messages replayed at join: the same messages arriving live are not delivered
    /// twice.
    replayed: OnceLock<Box<[Box<str>]>>,
}

impl ReadAccess {
    pub(crate) fn new(broadcast: bool, presence: bool) -> ReadAccess {
        ReadAccess {
            broadcast: AtomicBool::new(broadcast),
            presence: AtomicBool::new(presence),
            replayed: OnceLock::new(),
        }
    }

    /// A public channel reads everything.
    pub(crate) fn public() -> ReadAccess {
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

    pub(crate) fn was_replayed(&self, id: &str) -> bool {
        self.replayed
            .get()
            .is_some_and(|ids| ids.iter().any(|r| &**r == id))
    }
}
