//! Presence: `track` / `untrack` pushes on a channel, with the reference's per-channel rate
//! window and size limit; the state and its diffs live in the topic (`crate::topics`).

use super::access::{Extension, Known};
use super::work::Queued;
use super::{Channels, EMPTY};
use realtime_protocol::Inbound;
use realtime_protocol::payload::{self, PresencePush};
use std::time::Duration;
use tokio::time::Instant;

impl Channels {
    /// A `presence` push: track or untrack this channel's presence.
    pub(super) fn presence(&mut self, m: Inbound) {
        let config = &self.shared.config;
        let push = PresencePush::parse(&m.payload);
        if push == PresencePush::NoEvent {
            return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_ok(EMPTY));
        }
        let Some(channel) = self.by_topic.get_mut(&m.topic) else {
            return;
        };
        // The reference's fixed window: the first call opens it, calls past the maximum within it
        // end the channel.
        let now = Instant::now();
        match channel.presence_window_ends {
            Some(ends) if now <= ends => {
                if channel.presence_calls >= config.client_presence_max_calls {
                    return self.shut_down(&m.topic, "Client presence rate limit exceeded");
                }
                channel.presence_calls += 1;
            }
            _ => {
                channel.presence_calls = 1;
                channel.presence_window_ends =
                    Some(now + Duration::from_millis(config.client_presence_window_ms));
            }
        }
        if !matches!(push, PresencePush::Track(_)) {
            return self.presence_checked(m, true);
        }
        match self.write_permission(&m.topic, Extension::Presence) {
            Known::Allowed => self.presence_checked(m, true),
            Known::Denied => self.presence_checked(m, false),
            Known::Unknown => {
                let topic = m.topic.clone();
                self.check_write(&topic, Extension::Presence, Queued::Text(m));
            }
        }
    }

    /// A `presence` push whose permission is known (`allowed` matters only for a track).
    pub(super) fn presence_checked(&mut self, m: Inbound, allowed: bool) {
        let push = PresencePush::parse(&m.payload);
        if matches!(push, PresencePush::Track(_)) && !allowed {
            return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_error(EMPTY));
        }
        let max_payload = self.shared.config.max_payload_bytes();
        let Some(channel) = self.by_topic.get_mut(&m.topic) else {
            return;
        };
        match push {
            PresencePush::Track(meta) => {
                let meta = meta.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
                let Some(body) = crate::topics::presence::object_body(&meta) else {
                    let reply = payload::reply_error_reason("Presence track payload must be a map");
                    return self.reply(&m.topic, m.msg_ref.as_ref(), &reply);
                };
                if channel.tracked.as_deref() == Some(body.as_str()) {
                    return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_ok(EMPTY));
                }
                if body.len() + 2 > max_payload {
                    return self.shut_down(&m.topic, "Track message size exceeded");
                }
                let (member, key) = (channel.member.clone(), channel.presence_key.clone());
                let sync = !channel.presence_enabled;
                channel.presence_enabled = true;
                channel.tracked = Some(body.clone());
                let topic = channel.topic.clone();
                let join_ref = channel.join_ref.clone();
                let may_read = member.read.presence();
                // A track that enables presence syncs the full state, or members tracked before
                // stay invisible to this client.
                topic.presence(
                    |state| state.track(member.id, &key, &body),
                    |state| {
                        if sync && may_read {
                            self.send(
                                join_ref.as_ref(),
                                None,
                                &m.topic,
                                "presence_state",
                                &state.render(),
                            );
                        }
                    },
                );
            }
            PresencePush::Untrack => {
                channel.tracked = None;
                let member = channel.member.id;
                channel
                    .topic
                    .clone()
                    .presence(|state| state.untrack(member), |_| ());
            }
            PresencePush::Unknown | PresencePush::NoEvent => {
                return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_error(EMPTY));
            }
        }
        self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_ok(EMPTY));
    }
}
