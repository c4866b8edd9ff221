//! Encode once, push to many: a message is encoded at most once per frame kind its members need
//! (V1 text, V2 text, V2 binary) and the shared bytes are pushed into each member's outbox
//! without waiting; per recipient that is a reference-count increment and a queue push.

use super::bus::{Broadcast, BroadcastBody};
use super::member::{Member, MemberId, ReadAccess};
use crate::outbox::Frame;
use realtime_protocol::binary::{self, PayloadEncoding};
use realtime_protocol::{Vsn, payload};
use std::sync::Arc;

/// A message to fan out to a topic's members, borrowed for the encode.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outgoing<'a> {
    /// A fastlane push with a JSON payload (`broadcast` relayed from JSON, `presence_diff`):
    /// a text frame with `null` refs in each member's serializer.
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

impl<'a> Outgoing<'a> {
    pub(crate) fn of(broadcast: &'a Broadcast) -> Outgoing<'a> {
        match &broadcast.body {
            BroadcastBody::Push { payload } => Outgoing::Push {
                event: "broadcast",
                payload: payload.as_str(),
            },
            BroadcastBody::User {
                event,
                metadata,
                encoding,
                payload,
            } => Outgoing::User {
                event,
                metadata: metadata.as_deref(),
                encoding: *encoding,
                payload,
            },
        }
    }
}

/// What a fan-out did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
}

/// Who of a topic's members gets a message.
#[derive(Clone, Copy)]
pub(crate) struct Audience<'a> {
    /// The sender of a `self: false` broadcast.
    pub(crate) skip: Option<MemberId>,
    pub(crate) may_read: fn(&ReadAccess) -> bool,
    /// A stored message (broadcast from the database): members that had it replayed at join
    /// do not get it again.
    pub(crate) stored_id: Option<&'a str>,
}

impl Audience<'_> {
    pub(crate) fn broadcast(skip: Option<MemberId>) -> Audience<'static> {
        Audience {
            skip,
            may_read: ReadAccess::broadcast,
            stored_id: None,
        }
    }

    pub(crate) fn presence() -> Audience<'static> {
        Audience {
            skip: None,
            may_read: ReadAccess::presence,
            stored_id: None,
        }
    }
}

pub(crate) fn fan_out(
    topic: &str,
    members: &[Arc<Member>],
    message: &Outgoing<'_>,
    audience: Audience<'_>,
) -> Delivery {
    let mut encoded = Encoded::default();
    let mut delivery = Delivery::default();
    for member in members {
        if Some(member.id) == audience.skip || !(audience.may_read)(&member.read) {
            continue;
        }
        if audience
            .stored_id
            .is_some_and(|id| member.read.was_replayed(id))
        {
            continue;
        }
        let Some(frame) = encoded.get(topic, member.vsn, message) else {
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
