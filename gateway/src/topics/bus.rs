//! The bus: the seam through which everything clients publish leaves this node.
//!
//! What clients publish (client and REST broadcasts, presence diffs) is delivered to this node's
//! members straight from memory, then handed to the [`Bus`] inside the same per-topic critical
//! section, so every node sees one node's messages of a topic in the order its own members saw
//! them (per-origin FIFO). A bus never waits: an implementation that talks to a network queues
//! and drops (counted) rather than block a publisher.
//!
//! [`LocalBus`] is the single-node bus: there is no other node to reach, so forwarding is
//! nothing. The clustered bus (`crate::cluster`) delivers what it receives from other nodes
//! with [`super::Registry::receive`] and [`super::Registry::receive_presence`], which reach
//! this node's members only.
//!
//! Postgres Changes and broadcasts from the database never pass here: every node reads them
//! from the change log itself (`crate::changes::source`) and delivers them to its own sockets.

use super::member::{MemberId, TopicKey};
use super::presence::Diff;
use bytes::Bytes;
use realtime_protocol::binary::PayloadEncoding;
use std::fmt;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One boot of one gateway process, random per start, so a restarted node is never taken for
/// its former self.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NodeId(pub(crate) u64);

impl NodeId {
    pub(crate) fn random() -> NodeId {
        NodeId(rand::random())
    }
}

/// Where a message was published: the node, and the channel when a client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) node: NodeId,
    pub(crate) member: Option<MemberId>,
}

/// A broadcast as published: owned, with the payload as received, so another node can take it
/// as it is and encode it for its own sockets.
#[derive(Clone, Debug)]
pub(crate) struct Broadcast {
    pub(crate) topic: TopicKey,
    pub(crate) origin: Origin,
    /// `self: false`: the origin channel does not get its own message. Only the origin node
    /// holds that channel, so only it applies this.
    pub(crate) skip_origin: bool,
    pub(crate) body: BroadcastBody,
}

#[derive(Clone, Debug)]
pub(crate) enum BroadcastBody {
    /// A `broadcast` push whose payload (`{"type":"broadcast","event":…,"payload":…}`) is
    /// relayed verbatim: a JSON client broadcast, a REST batch message.
    Push { payload: Utf8Bytes },
    /// A user broadcast: a binary client push, the REST per-event endpoint, the database.
    User {
        event: Box<str>,
        metadata: Option<Box<str>>,
        encoding: PayloadEncoding,
        payload: Bytes,
    },
}

/// What a bus carries. [`LocalBus`] reads none of it: there is no other node.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Message<'a> {
    Broadcast(&'a Broadcast),
    /// A change of the origin's presence state for a topic, already applied there.
    Presence {
        topic: &'a TopicKey,
        diff: &'a Diff,
    },
}

/// Ends when this node receives the other nodes' messages of a topic.
pub(crate) type Ready = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Hands what this node published to the other nodes.
pub(crate) trait Bus: Send + Sync + fmt::Debug {
    /// Called inside the topic's critical section, after this node's members were served.
    /// Never waits.
    fn forward(&self, message: Message<'_>);

    /// A member is about to join `key` here: make sure the other nodes' messages of it reach
    /// this node. `None` when they already do; else the join waits for the future.
    fn interest(&self, _key: &TopicKey) -> Option<Ready> {
        None
    }

    /// A member joins `key` now (outside any registry lock): what `interest` set up must
    /// still be there, however long the join took since.
    fn touch(&self, _key: &TopicKey) {}
}

/// The bus of a single node: nothing to forward to.
#[derive(Debug, Default)]
pub(crate) struct LocalBus;

impl Bus for LocalBus {
    fn forward(&self, _message: Message<'_>) {}
}
