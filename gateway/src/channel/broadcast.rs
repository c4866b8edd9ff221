//! Broadcast: a client's JSON `broadcast` push or kind-3 binary push, published to the topic
//! through the bus (every member on every node, but the sender unless `self`), with the `ack`
//! reply when the channel asked for one.

use super::access::{Extension, Known};
use super::work::Queued;
use super::{Channel, Channels, EMPTY};
use crate::metrics::Metrics;
use crate::topics::{Broadcast, BroadcastBody, Origin};
use realtime_protocol::binary::BinaryPush;
use realtime_protocol::{Inbound, Ref, payload};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::debug;

impl Channels {
    /// A JSON `broadcast` push: relayed verbatim to the topic's members.
    pub(super) fn broadcast_json(&mut self, m: Inbound) {
        self.broadcast_checked(Queued::Text(m));
    }

    /// A kind-3 binary push: fanned out as a user broadcast. Client metadata is not forwarded.
    pub(super) fn broadcast_binary(&mut self, push: BinaryPush) {
        let Some(channel) = self.by_topic.get(&push.topic) else {
            let reply = payload::reply_error_reason("unmatched topic");
            return self.send(
                push.join_ref.as_ref(),
                push.msg_ref.as_ref(),
                &push.topic,
                "phx_reply",
                &reply,
            );
        };
        if push.join_ref.is_some() && push.join_ref != channel.join_ref {
            return;
        }
        self.broadcast_checked(Queued::Binary(push));
    }

    /// A broadcast push: published when the channel may write, after the check when that is not
    /// known yet.
    fn broadcast_checked(&mut self, push: Queued) {
        let topic = push.topic().to_owned();
        match self.write_permission(&topic, Extension::Broadcast) {
            Known::Allowed => self.publish_queued(push),
            Known::Unknown => self.check_write(&topic, Extension::Broadcast, push),
            // Write denied: dropped without any reply, even with ack (the reference's behaviour).
            Known::Denied => {}
        }
    }

    pub(super) fn publish_queued(&mut self, push: Queued) {
        match push {
            Queued::Text(m) => self.publish_json(m),
            Queued::Binary(p) => self.publish_binary(p),
        }
    }

    pub(super) fn publish_json(&mut self, m: Inbound) {
        let Some(channel) = self.by_topic.get(&m.topic) else {
            return;
        };
        if m.payload.get().len() > self.shared.config.max_payload_bytes() {
            return self.reply_too_large(channel, &m.topic, m.msg_ref.as_ref());
        }
        let payload: Box<str> = m.payload.into();
        let body = BroadcastBody::Push {
            payload: Utf8Bytes::from(String::from(payload)),
        };
        self.publish(channel, body);
        self.ack(channel, &m.topic, m.msg_ref.as_ref());
    }

    pub(super) fn publish_binary(&mut self, push: BinaryPush) {
        let Some(channel) = self.by_topic.get(&push.topic) else {
            return;
        };
        if push.payload.len() > self.shared.config.max_payload_bytes() {
            return self.reply_too_large(channel, &push.topic, push.msg_ref.as_ref());
        }
        let body = BroadcastBody::User {
            event: push.event.into(),
            metadata: None,
            encoding: push.encoding,
            payload: push.payload,
        };
        self.publish(channel, body);
        self.ack(channel, &push.topic, push.msg_ref.as_ref());
    }

    fn publish(&self, channel: &Channel, body: BroadcastBody) {
        let broadcast = Broadcast {
            topic: channel.member.key.clone(),
            origin: Origin {
                node: self.shared.registry.node(),
                member: Some(channel.member.id),
            },
            skip_origin: !channel.self_broadcast,
            body,
        };
        let delivery = channel.topic.publish(&broadcast);
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.broadcasts_total, 1);
        Metrics::add(&metrics.dropped_deliveries, delivery.dropped);
    }

    /// The ok reply to a broadcast on a channel joined with `ack: true`.
    fn ack(&self, channel: &Channel, topic: &str, msg_ref: Option<&Ref>) {
        if channel.ack {
            let reply = payload::reply_ok(EMPTY);
            self.send(
                channel.join_ref.as_ref(),
                msg_ref,
                topic,
                "phx_reply",
                &reply,
            );
        }
    }

    fn reply_too_large(&self, channel: &Channel, topic: &str, msg_ref: Option<&Ref>) {
        debug!(topic, "broadcast over the payload size limit dropped");
        if channel.ack {
            let reply = payload::reply_error(r#"{"error":"payload_size_exceeded"}"#);
            self.send(
                channel.join_ref.as_ref(),
                msg_ref,
                topic,
                "phx_reply",
                &reply,
            );
        }
    }
}
