//! Postgres Changes on a channel: its `config.postgres_changes` entries resolved for its claims
//! (off the socket's loop) and put in the change index, at join, on token refresh and on
//! retries.
//!
//! A subscription that works is only replaced by one that works: when a refresh or a retry
//! cannot reach the database, the channel keeps what it had and tries again in 5–10 s. A channel
//! registered while the stream was not live runs no query again: it waits, with every other such
//! channel, for the one signal that the stream is live, and is then told it is subscribed.

use super::Channels;
use super::work::{Kind, Step};
use crate::auth::Claims;
use crate::changes::Resolved;
use crate::changes::subscription::SubscribeError;
use crate::state::Shared;
use crate::topics::MemberId;
use realtime_protocol::payload;
use std::time::Duration;
use tokio::time::Instant;

/// How long a join waits for the change stream to be live before it replies anyway.
pub(super) const POSTGRES_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a channel waits for the stream in one go before it tries again.
const LIVE_WAIT: Duration = Duration::from_secs(30);

/// A retry that is due at `at`: resolving the entries again (the database was unreachable), or
/// only waiting for the stream (already registered).
#[derive(Clone, Copy, Debug)]
pub(super) struct PgRetry {
    pub(super) at: Instant,
    resolve: bool,
}

/// How resolving a channel's Postgres Changes went.
#[derive(Debug)]
pub(super) enum PgOutcome {
    /// Resolved, and the stream is live.
    Ready,
    /// Resolved, but the stream is not live yet: registered, and checked again shortly.
    NotLive,
    /// The database could not be reached: tried again in 5–10 s, as the reference does.
    Retry(String),
    /// The subscription is invalid: not retried.
    Failed(String),
}

impl PgOutcome {
    pub(super) fn retry(&self) -> Option<PgRetry> {
        match self {
            PgOutcome::NotLive => Some(PgRetry {
                at: Instant::now(),
                resolve: false,
            }),
            PgOutcome::Retry(_) => Some(PgRetry {
                at: Instant::now() + Duration::from_millis(5_000 + rand::random::<u64>() % 5_000),
                resolve: true,
            }),
            PgOutcome::Ready | PgOutcome::Failed(_) => None,
        }
    }

    /// The status and text of the `system` message for this outcome.
    pub(super) fn system_message(&self) -> (bool, String) {
        match self {
            PgOutcome::Ready => (true, "Subscribed to PostgreSQL".to_owned()),
            PgOutcome::NotLive => (
                false,
                "Subscribed to PostgreSQL, but the replication stream is not live yet: changes are \
                 delivered once it is, and this channel is told \"Subscribed to PostgreSQL\" then"
                    .to_owned(),
            ),
            PgOutcome::Retry(message) => (false, format!("{message} (retrying)")),
            PgOutcome::Failed(message) => (false, message.clone()),
        }
    }
}

/// Resolves `entries` for `claims` and waits up to `wait` for the stream to be live.
pub(super) async fn resolve(
    shared: &Shared,
    claims: &Claims,
    entries: &[(serde_json::Value, u32)],
    wait: Duration,
) -> (PgOutcome, Option<Resolved>) {
    let Some(pg) = &shared.postgres else {
        return (
            PgOutcome::Failed(shared.postgres_changes_unavailable()),
            None,
        );
    };
    match pg.resolve(claims, entries).await {
        Ok(resolved) if pg.wait_streaming(wait).await => (PgOutcome::Ready, Some(resolved)),
        Ok(resolved) => (PgOutcome::NotLive, Some(resolved)),
        Err(SubscribeError::Unavailable(message)) => (PgOutcome::Retry(message), None),
        Err(SubscribeError::Invalid(message)) => (PgOutcome::Failed(message), None),
    }
}

impl Channels {
    /// Applies a resolution to a joined channel: a working subscription is replaced only by a
    /// resolved one; an invalid one is removed. Schedules the next try.
    pub(super) fn apply_postgres(
        &mut self,
        topic: &str,
        member: MemberId,
        outcome: &PgOutcome,
        resolved: Option<Resolved>,
    ) {
        let Some(pg) = self.shared.postgres.clone() else {
            return;
        };
        let Some(channel) = self.current(topic, member) else {
            return;
        };
        channel.pg_retry = outcome.retry();
        let member = channel.member.clone();
        match (outcome, resolved) {
            (PgOutcome::Failed(_), _) => pg.index.remove(member.id),
            (_, Some(resolved)) => pg.register(&member, resolved),
            // Unreachable: the subscription that works stays.
            (_, None) => {}
        }
    }

    /// Starts the Postgres Changes retries that are due (one job per channel).
    pub(super) fn retry_postgres(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .by_topic
            .iter()
            .filter(|(t, c)| c.pg_retry.is_some_and(|r| r.at <= now) && !self.work.in_background(t))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in due {
            let Some(channel) = self.by_topic.get_mut(&topic) else {
                continue;
            };
            let Some(retry) = channel.pg_retry.take() else {
                continue;
            };
            let (member, claims, entries) = (
                channel.member.id,
                channel.claims.clone(),
                channel.pg_entries.clone(),
            );
            let (join_ref, sub_topic) = (channel.join_ref.clone(), channel.sub_topic.clone());
            let token = channel.token.clone();
            let shared = self.shared.clone();
            let topic_owned = topic.clone();
            self.start_job(&topic, Kind::Background, async move {
                let (outcome, resolved) = if retry.resolve {
                    resolve(&shared, &claims, &entries, Duration::ZERO).await
                } else {
                    match &shared.postgres {
                        Some(pg) if pg.wait_streaming(LIVE_WAIT).await => (PgOutcome::Ready, None),
                        _ => (PgOutcome::NotLive, None),
                    }
                };
                Box::new(move |ch: &mut Channels| {
                    // A refresh since the retry started has resolved for newer claims.
                    if ch
                        .current(&topic_owned, member)
                        .is_none_or(|c| c.token != token)
                    {
                        return;
                    }
                    ch.apply_postgres(&topic_owned, member, &outcome, resolved);
                    // Retries are silent until they settle: then the client hears the outcome
                    // once.
                    let message = match &outcome {
                        PgOutcome::Ready => Some((true, "Subscribed to PostgreSQL".to_owned())),
                        PgOutcome::Failed(message) => Some((false, message.clone())),
                        PgOutcome::NotLive | PgOutcome::Retry(_) => None,
                    };
                    if let Some((ok, message)) = message
                        && ch.current(&topic_owned, member).is_some()
                    {
                        let system =
                            payload::system("postgres_changes", ok, &message, Some(&sub_topic));
                        ch.send(join_ref.as_ref(), None, &topic_owned, "system", &system);
                    }
                }) as Step
            });
        }
    }
}
