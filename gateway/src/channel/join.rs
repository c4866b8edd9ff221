//! `phx_join`: the checks that need no database run at once; the ones that do (private read,
//! replay, Postgres Changes) run off the socket's loop. Then, in one step: the member joins the
//! topic, the reply, replayed messages, the `system` message and `presence_state` are queued
//! under the topic's lock (so they precede any fan-out that follows the join), and only then
//! are the channel's Postgres Changes put in the change index, so no change frame can reach
//! the client before its join reply.

use super::access::AuthzRequest;
use super::postgres::{self, POSTGRES_READY_TIMEOUT, PgOutcome};
use super::work::{Kind, Step};
use super::{Channel, Channels, TOPIC_PREFIX};
use crate::auth::{Claims, now_seconds};
use crate::changes::Resolved;
use crate::db::{authorization, replay};
use crate::metrics::Metrics;
use crate::resume::{Claim, Identity};
use crate::state::Shared;
use crate::topics::{NewMember, ReadAccess, TopicKey};
use realtime_protocol::payload::{self, JoinPayload, PostgresChangesEntry};
use realtime_protocol::{Inbound, Ref, Vsn};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};

/// A join that passed the checks that need no database.
#[derive(Debug)]
struct Plan {
    topic: String,
    sub_topic: String,
    join_ref: Option<Ref>,
    msg_ref: Option<Ref>,
    private: bool,
    ack: bool,
    self_broadcast: bool,
    presence_enabled: bool,
    presence_key: String,
    /// `broadcast.replay` of a private channel: (`since` when valid, `limit`).
    replay: Option<(Option<i64>, i64)>,
    token: String,
    claims: Claims,
    pg_entries: Arc<[(serde_json::Value, u32)]>,
    /// The reply's body: `{"postgres_changes":[…]}`.
    reply: String,
}

/// Why a join is refused: the reason as the client reads it.
#[derive(Debug)]
struct Refusal(String);

/// What the database said about a join.
#[derive(Debug, Default)]
struct Checked {
    /// Read permissions of a private channel `(broadcast, presence)`.
    read: Option<(bool, bool)>,
    replayed: Vec<replay::Row>,
    postgres: Option<(PgOutcome, Option<Resolved>)>,
}

impl Plan {
    fn needs_database(&self) -> bool {
        self.private || self.replay.is_some() || !self.pg_entries.is_empty()
    }
}

impl Channels {
    pub(super) fn join(&mut self, m: Inbound) {
        let join_ref = m.join_ref.clone().or_else(|| m.msg_ref.clone());
        let Some(sub_topic) = m.topic.strip_prefix(TOPIC_PREFIX) else {
            return self.reply_unmatched(&m);
        };
        let sub_topic = sub_topic.to_owned();
        if let Some(old) = self.by_topic.remove(&m.topic) {
            // A duplicate join ends the old channel: its phx_close carries the old join_ref.
            self.end_channel(&m.topic, old, None);
        }
        let refuse = |this: &Self, reason: &str| {
            this.refuse(&m.topic, join_ref.as_ref(), m.msg_ref.as_ref(), reason);
        };
        let join = JoinPayload::parse(&m.payload);
        if join.invalid {
            debug!(topic = %m.topic, "InvalidJoinPayload: continuing with the fields that could be cast");
        }
        let config = &self.shared.config;
        if sub_topic.is_empty() {
            return refuse(self, "TopicNameRequired: You must provide a topic name");
        }
        if config.private_only && !join.private {
            return refuse(
                self,
                "PrivateOnly: This project only allows private channels",
            );
        }
        if self.by_topic.len() + self.work.joins() >= config.max_channels_per_client {
            return refuse(self, "ChannelRateLimitReached: Too many channels");
        }
        let token = match join.access_token.as_deref() {
            Some(t) if !t.starts_with("sb_") => t.to_owned(),
            _ => self.params.connect_token.clone(),
        };
        let claims = match self.shared.verifier.verify(&token) {
            Ok(claims) => claims,
            Err(e) => return refuse(self, &e.join_reason()),
        };
        if join.private && self.shared.postgres.is_none() {
            return refuse(self, &self.shared.private_channels_unavailable());
        }
        let replay = match &join.broadcast.replay {
            None => None,
            Some(_) if !join.private => {
                return refuse(
                    self,
                    "UnableToReplayMessages: Replay is not allowed for public channels",
                );
            }
            Some(replay) => Some((replay.since.as_i64(), replay.limit.as_i64().unwrap_or(25))),
        };
        let plan = Plan {
            sub_topic,
            join_ref: join_ref.clone(),
            msg_ref: m.msg_ref.clone(),
            private: join.private,
            ack: join.broadcast.ack,
            self_broadcast: join.broadcast.self_broadcast,
            presence_enabled: join.presence.enabled || config.presence_enabled,
            presence_key: join.presence.key,
            replay,
            token,
            claims,
            pg_entries: join
                .postgres_changes
                .iter()
                .map(|e| (e.value.clone(), binding_id(&e.raw)))
                .collect(),
            reply: payload::reply_ok(&join_response(&join.postgres_changes)),
            topic: m.topic,
        };
        // In a cluster, the first member of a topic here waits until the other nodes'
        // broadcasts of it reach this node.
        let interest = self.shared.registry.interest(&TopicKey {
            private: plan.private,
            topic: Arc::from(plan.topic.as_str()),
        });
        if !plan.needs_database() && interest.is_none() {
            return self.finish_join(plan, Ok(Checked::default()));
        }
        let shared = self.shared.clone();
        let request = AuthzRequest::new(&plan.claims, &plan.sub_topic, &self.params.headers);
        let topic = plan.topic.clone();
        self.start_job(&topic, Kind::Join, async move {
            if let Some(interest) = interest {
                interest.await;
            }
            let checked = if plan.needs_database() {
                check(&shared, &request, &plan).await
            } else {
                Ok(Checked::default())
            };
            Box::new(move |ch: &mut Channels| ch.finish_join(plan, checked)) as Step
        });
    }

    /// Refuses a join, after the reference's backoff.
    fn refuse(&self, topic: &str, join_ref: Option<&Ref>, msg_ref: Option<&Ref>, reason: &str) {
        Metrics::add(&self.shared.metrics.join_errors_total, 1);
        self.send_later(
            self.shared.config.channel_error_backoff(),
            join_ref,
            msg_ref,
            topic,
            "phx_reply",
            &payload::reply_error_reason(reason),
        );
    }

    fn finish_join(&mut self, plan: Plan, checked: Result<Checked, Refusal>) {
        let checked = match checked {
            Ok(checked) => checked,
            Err(Refusal(reason)) => {
                return self.refuse(
                    &plan.topic,
                    plan.join_ref.as_ref(),
                    plan.msg_ref.as_ref(),
                    &reason,
                );
            }
        };
        let read = match checked.read {
            Some((broadcast, presence)) => ReadAccess::new(broadcast, presence),
            None => ReadAccess::public(),
        };
        if !checked.replayed.is_empty() {
            read.set_replayed(
                checked
                    .replayed
                    .iter()
                    .map(|r| Box::from(r.id.as_str()))
                    .collect(),
            );
        }
        let presence_key: Arc<str> = if plan.presence_key.is_empty() {
            Arc::from(generated_presence_key().as_str())
        } else {
            Arc::from(plan.presence_key.as_str())
        };
        let (mut outcome, resolved) = match checked.postgres {
            Some((outcome, resolved)) => (Some(outcome), resolved),
            None => (None, None),
        };
        // Its place in the change log: a parked channel of the same client taken over, or a
        // new one (told of a gap when it could not resume).
        let claim = match (&self.shared.postgres, &resolved) {
            (Some(pg), Some(_)) => pg.claim(
                Identity::of(
                    &plan.claims.all,
                    &plan.claims.role,
                    &plan.token,
                    &plan.topic,
                    plan.private,
                    &plan.pg_entries,
                ),
                &self.outbox,
            ),
            _ => None,
        };
        let (cursor, resumed, gap) = match claim {
            Some(Claim::Resumed(cursor)) => (Some(cursor.clone()), Some(cursor), None),
            Some(Claim::Fresh { cursor, gap }) => (cursor, None, gap),
            None => (None, None, None),
        };
        // Status ok: the channel is subscribed and stays so (realtime-py takes a system error
        // for a failed channel and rejoins); the message says what was missed and why.
        let gap_system = gap.map(|reason| {
            Metrics::add(&self.shared.metrics.resume_gaps, 1);
            payload::system(
                "postgres_changes",
                true,
                &reason.message(),
                Some(&plan.sub_topic),
            )
        });
        let system = outcome.as_ref().map(|outcome| {
            let (ok, message) = outcome.system_message();
            payload::system("postgres_changes", ok, &message, Some(&plan.sub_topic))
        });
        let key = TopicKey {
            private: plan.private,
            topic: Arc::from(plan.topic.as_str()),
        };
        let new = NewMember {
            outbox: self.outbox.clone(),
            vsn: self.vsn(),
            read,
            resume: cursor,
        };
        let join_ref = plan.join_ref.as_ref();
        let (topic, member) = self.shared.registry.join(key, new, |member, inner| {
            self.send(
                join_ref,
                plan.msg_ref.as_ref(),
                &plan.topic,
                "phx_reply",
                &plan.reply,
            );
            for row in &checked.replayed {
                self.send_replayed(join_ref, &plan.topic, row);
            }
            if let Some(system) = &system {
                self.send(join_ref, None, &plan.topic, "system", system);
            }
            if let Some(gap) = &gap_system {
                self.send(join_ref, None, &plan.topic, "system", gap);
            }
            if plan.presence_enabled && member.read.presence() {
                let state = inner.presence.render();
                self.send(join_ref, None, &plan.topic, "presence_state", &state);
            }
        });
        // After the reply: the first change frame of this channel follows it.
        if let (Some(pg), Some(resolved)) = (&self.shared.postgres, resolved) {
            pg.register(&member, resolved);
            // In the index, waiting: the router starts its replay.
            if let Some(cursor) = resumed {
                debug!(topic = %plan.topic, from = ?cursor.from(), "channel resumes");
                pg.admit(cursor);
            }
        }
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.joins_total, 1);
        Metrics::gauge(&metrics.channels, 1);
        debug!(topic = %plan.topic, role = %plan.claims.role, private = plan.private, "channel joined");
        let channel = Channel {
            join_ref: plan.join_ref,
            sub_topic: plan.sub_topic,
            topic,
            member,
            ack: plan.ack,
            self_broadcast: plan.self_broadcast,
            token: plan.token,
            expires_at: expiry_instant(plan.claims.exp),
            claims: plan.claims,
            presence_key,
            presence_enabled: plan.presence_enabled,
            tracked: None,
            presence_calls: 0,
            presence_window_ends: None,
            pg_entries: plan.pg_entries,
            private: plan.private,
            broadcast_write: None,
            presence_write: None,
            pg_retry: outcome.as_mut().and_then(|o| o.retry()),
        };
        self.by_topic.insert(plan.topic, channel);
    }

    /// A replayed broadcast, pushed after the join reply with `meta.replayed`.
    fn send_replayed(&self, join_ref: Option<&Ref>, topic: &str, row: &replay::Row) {
        let meta = format!(
            "{{\"replayed\":true,\"id\":{}}}",
            realtime_protocol::frame::json_str(&row.id)
        );
        match (&row.payload, &row.binary) {
            (Some(json), _) => {
                let mut body = String::from("{\"type\":\"broadcast\",\"event\":");
                body.push_str(&realtime_protocol::frame::json_str(&row.event));
                body.push_str(",\"payload\":");
                body.push_str(json);
                body.push_str(",\"meta\":");
                body.push_str(&meta);
                body.push('}');
                self.send(join_ref, None, topic, "broadcast", &body);
            }
            (None, Some(bytes)) if self.vsn() == Vsn::V2 => {
                if let Ok(frame) = realtime_protocol::binary::encode_user_broadcast(
                    topic,
                    &row.event,
                    meta.as_bytes(),
                    realtime_protocol::binary::PayloadEncoding::Binary,
                    bytes,
                ) {
                    self.outbox.push(crate::outbox::Frame::Binary(frame));
                }
            }
            _ => {}
        }
    }
}

/// The database's part of a join: private read, replay, Postgres Changes. `Err` is the refusal.
async fn check(shared: &Shared, request: &AuthzRequest, plan: &Plan) -> Result<Checked, Refusal> {
    let mut checked = Checked::default();
    if plan.private {
        checked.read = Some(match request.read(shared, plan.presence_enabled).await {
            Ok((broadcast, presence)) if broadcast || presence == Some(true) => {
                (broadcast, presence == Some(true))
            }
            Ok(_) => {
                debug!(topic = %plan.topic, role = %plan.claims.role, "private join refused: no read policy grants broadcast or presence");
                return Err(Refusal(authorization::unauthorized(&plan.sub_topic)));
            }
            Err(e) => {
                warn!(topic = %plan.topic, error = ?e, "private join refused: read check failed");
                return Err(Refusal(e.join_reason(&plan.sub_topic)));
            }
        });
    }
    if let Some((since, limit)) = plan.replay {
        let (Some(since), Some(pg)) = (since, &shared.postgres) else {
            return Err(Refusal(
                "UnableToReplayMessages: Replay params are not valid".to_owned(),
            ));
        };
        if checked.read.is_some_and(|(broadcast, _)| !broadcast) {
            return Err(Refusal(authorization::unauthorized(&plan.sub_topic)));
        }
        checked.replayed = match replay::load(&pg.db, &plan.sub_topic, since, limit).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(topic = %plan.topic, error = %e, "replay failed");
                return Err(Refusal(
                    "UnableToReplayMessages: Realtime was unable to replay messages".to_owned(),
                ));
            }
        };
    }
    // Ready means ready: the stream is live before the client hears it is subscribed.
    if !plan.pg_entries.is_empty() {
        checked.postgres = Some(
            postgres::resolve(
                shared,
                &plan.claims,
                &plan.pg_entries,
                POSTGRES_READY_TIMEOUT,
            )
            .await,
        );
    }
    Ok(checked)
}

/// A presence key for a join that gave none: a UUID v1, as the reference generates.
fn generated_presence_key() -> String {
    use std::sync::OnceLock;
    static NODE: OnceLock<[u8; 6]> = OnceLock::new();
    let node = NODE.get_or_init(rand::random::<[u8; 6]>);
    uuid::Uuid::now_v1(node).to_string()
}

/// The instant a token with expiry `exp` (epoch seconds) expires.
pub(super) fn expiry_instant(exp: i64) -> Instant {
    let left = (exp as f64 - now_seconds()).max(0.0);
    Instant::now() + Duration::from_secs_f64(left.min(10.0 * 365.0 * 86_400.0))
}

/// `{"postgres_changes":[…]}`: each entry echoed verbatim with an integer `id` that is equal for
/// equal entries.
fn join_response(entries: &[PostgresChangesEntry]) -> String {
    let mut out = String::from("{\"postgres_changes\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&entry.echo_with_id(binding_id(&entry.raw)));
    }
    out.push_str("]}");
    out
}

/// A stable id for a binding: FNV-1a over the entry's canonical JSON, in 27 bits like the
/// reference's `phash2`.
pub(crate) fn binding_id(raw: &RawValue) -> u32 {
    let canonical = serde_json::from_str::<serde_json::Value>(raw.get())
        .map(|v| v.to_string())
        .unwrap_or_else(|_| raw.get().to_owned());
    let mut hash: u32 = 0x811c_9dc5;
    for b in canonical.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash & 0x07ff_ffff
}
