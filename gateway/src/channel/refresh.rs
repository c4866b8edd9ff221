//! Token refresh (`access_token`) and expiry. A refresh is never answered: a new valid token
//! replaces the channel's claims, private channels check read again, and Postgres Changes are
//! resolved again for the new claims; an invalid token ends the channel with the reason. A
//! channel whose token expires is ended.

use super::Channels;
use super::access::AuthzRequest;
use super::join::expiry_instant;
use super::postgres::{self, POSTGRES_READY_TIMEOUT, PgOutcome};
use super::work::{Kind, Step};
use crate::auth::{AuthError, now_seconds};
use crate::changes::Resolved;
use crate::db::authorization::AuthzError;
use crate::topics::MemberId;
use realtime_protocol::payload;
use tokio::time::Instant;
use tracing::warn;

/// What a refresh learned from the database.
struct Rechecked {
    read: Option<Result<(bool, Option<bool>), AuthzError>>,
    postgres: Option<(PgOutcome, Option<Resolved>)>,
}

impl Channels {
    /// `access_token` on a joined channel.
    pub(super) fn refresh_token(&mut self, topic: &str, token: String) {
        let Some(channel) = self.by_topic.get_mut(topic) else {
            return;
        };
        if token.starts_with("sb_") || token == channel.token {
            return;
        }
        let claims = match self.shared.verifier.verify(&token) {
            Ok(claims) => claims,
            Err(e) => return self.shut_down(topic, &e.to_string()),
        };
        channel.expires_at = expiry_instant(claims.exp);
        channel.claims = claims;
        channel.token = token;
        channel.broadcast_write = None;
        channel.presence_write = None;
        if !channel.private && channel.pg_entries.is_empty() {
            return;
        }
        let private = channel.private;
        let check_presence = channel.presence_enabled;
        let request = AuthzRequest::new(&channel.claims, &channel.sub_topic, &self.params.headers);
        let (member, claims, entries) = (
            channel.member.id,
            channel.claims.clone(),
            channel.pg_entries.clone(),
        );
        let shared = self.shared.clone();
        let topic_owned = topic.to_owned();
        self.start_job(topic, Kind::Other, async move {
            let read = if private {
                Some(request.read(&shared, check_presence).await)
            } else {
                None
            };
            let revoked = matches!(read, Some(Ok((false, p))) if p != Some(true))
                || matches!(read, Some(Err(_)));
            let postgres = if entries.is_empty() || revoked {
                None
            } else {
                Some(postgres::resolve(&shared, &claims, &entries, POSTGRES_READY_TIMEOUT).await)
            };
            Box::new(move |ch: &mut Channels| {
                ch.finish_refresh(&topic_owned, member, Rechecked { read, postgres });
            }) as Step
        });
    }

    fn finish_refresh(&mut self, topic: &str, member: MemberId, rechecked: Rechecked) {
        let Some(channel) = self.current(topic, member) else {
            return;
        };
        let (had_broadcast, sub_topic) =
            (channel.member.read.broadcast(), channel.sub_topic.clone());
        match rechecked.read {
            None => {}
            Some(Ok((broadcast, presence))) if broadcast || presence == Some(true) => {
                channel.member.read.set(broadcast, presence == Some(true));
            }
            Some(Ok(_)) => {
                let message = if had_broadcast {
                    format!(
                        "You no longer have permission to read from this Channel topic: {sub_topic}"
                    )
                } else {
                    format!(
                        "You do not have permissions to read from this Channel topic: {sub_topic}"
                    )
                };
                return self.shut_down(topic, &message);
            }
            Some(Err(e)) => {
                warn!(topic, error = ?e, "read check after token refresh failed");
                return self.shut_down(
                    topic,
                    "Realtime was unable to connect to the project database",
                );
            }
        }
        // Postgres Changes follow the new claims: say how the new subscription went.
        let Some((outcome, resolved)) = rechecked.postgres else {
            return;
        };
        let join_ref = channel.join_ref.clone();
        self.apply_postgres(topic, member, &outcome, resolved);
        let (ok, message) = outcome.system_message();
        let system = payload::system("postgres_changes", ok, &message, Some(&sub_topic));
        self.send(join_ref.as_ref(), None, topic, "system", &system);
    }

    /// Ends the channels whose token has expired.
    pub(super) fn expire_tokens(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .by_topic
            .iter()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for topic in expired {
            let Some(channel) = self.by_topic.remove(&topic) else {
                continue;
            };
            let seconds_ago = (now_seconds() - channel.claims.exp as f64).max(0.0).floor() as i64;
            let reason = AuthError::Expired { seconds_ago }.to_string();
            self.end_channel(&topic, channel, Some(&reason));
        }
    }
}
