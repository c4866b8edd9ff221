//! Private channels' permissions: read is checked at join and on every token refresh, write at
//! first use and kept until the next refresh. The checks run off the socket's loop; the push
//! that needed one waits for it and is handled with its answer.

use super::work::{Kind, Queued, Step};
use super::{Channels, claims_text};
use crate::auth::Claims;
use crate::db::authorization::{self, AuthzError};
use crate::state::Shared;
use crate::topics::MemberId;
use std::sync::Arc;
use tracing::{debug, warn};

/// What a private channel writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Extension {
    Broadcast,
    Presence,
}

impl Extension {
    pub(super) fn name(self) -> &'static str {
        match self {
            Extension::Broadcast => "broadcast",
            Extension::Presence => "presence",
        }
    }
}

/// What is known of a channel's write permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Known {
    Allowed,
    Denied,
    /// A private channel that has not asked yet: the database decides.
    Unknown,
}

/// Everything an RLS check needs, owned, so it can run off the socket's loop.
#[derive(Debug, Clone)]
pub(super) struct AuthzRequest {
    role: String,
    claims: String,
    sub: String,
    topic: String,
    headers: Arc<str>,
}

impl AuthzRequest {
    pub(super) fn new(claims: &Claims, sub_topic: &str, headers: &Arc<str>) -> AuthzRequest {
        AuthzRequest {
            role: claims.role.clone(),
            claims: claims_text(claims),
            sub: claims
                .all
                .get("sub")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned(),
            topic: sub_topic.to_owned(),
            headers: headers.clone(),
        }
    }

    fn context(&self) -> authorization::Context<'_> {
        authorization::Context {
            role: &self.role,
            claims: &self.claims,
            sub: &self.sub,
            topic: &self.topic,
            headers: &self.headers,
        }
    }

    /// Read permissions `(broadcast, presence)`.
    pub(super) async fn read(
        &self,
        shared: &Shared,
        check_presence: bool,
    ) -> Result<(bool, Option<bool>), AuthzError> {
        let Some(pg) = &shared.postgres else {
            return Err(AuthzError::Unavailable("no database configured".into()));
        };
        authorization::read(&pg.db, &self.context(), check_presence).await
    }

    pub(super) async fn write(
        &self,
        shared: &Shared,
        extension: Extension,
    ) -> Result<bool, AuthzError> {
        let Some(pg) = &shared.postgres else {
            return Err(AuthzError::Unavailable("no database configured".into()));
        };
        authorization::write(&pg.db, &self.context(), extension.name()).await
    }
}

impl Channels {
    /// What is known of the channel's permission to write `extension` (public channels always
    /// may; without a database a private one may not).
    pub(super) fn write_permission(&self, topic: &str, extension: Extension) -> Known {
        let Some(channel) = self.by_topic.get(topic) else {
            return Known::Denied;
        };
        if !channel.private {
            return Known::Allowed;
        }
        let cached = match extension {
            Extension::Broadcast => channel.broadcast_write,
            Extension::Presence => channel.presence_write,
        };
        match cached {
            Some(true) => Known::Allowed,
            Some(false) => Known::Denied,
            None if self.shared.postgres.is_none() => Known::Denied,
            None => Known::Unknown,
        }
    }

    /// Checks the write permission off the loop, then handles `push` with the answer. For
    /// presence, a channel that did not check presence read at join checks it first.
    pub(super) fn check_write(&mut self, topic: &str, extension: Extension, push: Queued) {
        let Some(channel) = self.by_topic.get(topic) else {
            return;
        };
        let request = AuthzRequest::new(&channel.claims, &channel.sub_topic, &self.params.headers);
        let member = channel.member.id;
        let read_first = extension == Extension::Presence && !channel.presence_enabled;
        let shared = self.shared.clone();
        let topic_owned = topic.to_owned();
        self.start_job(topic, Kind::Other, async move {
            let read = if read_first {
                request.read(&shared, true).await.ok()
            } else {
                None
            };
            let write = request.write(&shared, extension).await;
            Box::new(move |ch: &mut Channels| {
                let allowed = ch.record_write(&topic_owned, member, extension, read, write);
                ch.after_write_check(extension, push, allowed);
            }) as Step
        });
    }

    /// Keeps a write check's answer (errors deny without being kept); returns it.
    fn record_write(
        &mut self,
        topic: &str,
        member: MemberId,
        extension: Extension,
        read: Option<(bool, Option<bool>)>,
        write: Result<bool, AuthzError>,
    ) -> bool {
        let Some(channel) = self.current(topic, member) else {
            return false;
        };
        if let Some((broadcast, presence)) = read {
            channel.member.read.set(broadcast, presence == Some(true));
        }
        match write {
            Ok(allowed) => {
                match extension {
                    Extension::Broadcast => channel.broadcast_write = Some(allowed),
                    Extension::Presence => channel.presence_write = Some(allowed),
                }
                if !allowed {
                    debug!(topic, extension = extension.name(), "write denied by RLS");
                }
                allowed
            }
            Err(e) => {
                warn!(topic, extension = extension.name(), error = ?e, "write check failed");
                false
            }
        }
    }

    fn after_write_check(&mut self, extension: Extension, push: Queued, allowed: bool) {
        match (extension, push) {
            (Extension::Broadcast, push) if allowed => self.publish_queued(push),
            // A denied broadcast is dropped without any reply, even with ack (the reference's
            // behaviour).
            (Extension::Broadcast, _) => {}
            (Extension::Presence, Queued::Text(m)) => self.presence_checked(m, allowed),
            (Extension::Presence, Queued::Binary(_)) => {}
        }
    }
}
