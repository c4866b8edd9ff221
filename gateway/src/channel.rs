//! The channels of one socket and the handlers of every client push.
//!
//! A channel is joined with `phx_join` on a `realtime:<sub_topic>` topic and lives until
//! `phx_leave`, a duplicate join of its topic, a fatal token problem, or the socket's end. Every
//! frame the server pushes to one channel carries its `join_ref`; `phx_close` and `phx_error`
//! carry it as `ref` too, which is how clients tell a stale close from a current one. Fan-out
//! frames (`broadcast`, `presence_diff`, `postgres_changes`) carry `null` refs.
//!
//! Error replies to a join are delayed by `CHANNEL_ERROR_BACKOFF_MS`, as in the reference
//! server, without holding up the socket: the delayed reply is queued by a small timer task.

use crate::auth::{AuthError, Claims, now_seconds};
use crate::authorization;
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox};
use crate::registry::{Member, MemberId, Outgoing, ReadAccess, Topic, TopicKey};
use crate::replay;
use crate::socket::SocketParams;
use crate::state::Shared;
use bytes::Bytes;
use realtime_protocol::binary::{self, BinaryPush};
use realtime_protocol::payload::{self, JoinPayload, PostgresChangesEntry, PresencePush};
use realtime_protocol::{Inbound, Ref, Vsn};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};

const PHOENIX_TOPIC: &str = "phoenix";
const TOPIC_PREFIX: &str = "realtime:";
const EMPTY: &str = "{}";
/// How long a join waits for the WAL stream to be live before it replies anyway.
const POSTGRES_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// One joined channel.
#[derive(Debug)]
struct Channel {
    join_ref: Option<Ref>,
    sub_topic: String,
    topic: Arc<Topic>,
    member: MemberId,
    ack: bool,
    self_broadcast: bool,
    /// The channel token and its claims (refreshed by `access_token`).
    token: String,
    claims: Claims,
    expires_at: Instant,
    /// The key this channel tracks presence under.
    presence_key: Arc<str>,
    /// Whether this channel gets `presence_state` (asked at join, or enabled by a track).
    presence_enabled: bool,
    /// The canonical body of the last tracked meta (a re-track with the same is a no-op).
    tracked: Option<String>,
    /// Track/untrack calls in the current rate window, and when the window ends.
    presence_calls: u32,
    presence_window_ends: Option<Instant>,
    /// `config.postgres_changes` entries with their binding ids (re-resolved on token refresh).
    pg_entries: Vec<(serde_json::Value, u32)>,
    /// A private channel: permissions come from RLS on realtime.messages.
    private: bool,
    /// Read permissions, shared with the registry's fan-out.
    read: Arc<ReadAccess>,
    /// Write permissions, checked at first use and until the next token refresh.
    broadcast_write: Option<bool>,
    presence_write: Option<bool>,
    /// When to try Postgres Changes again (the database was down, or the stream not live yet).
    pg_retry_at: Option<Instant>,
}

/// The channels of one socket.
#[derive(Debug)]
pub(crate) struct Channels {
    shared: Arc<Shared>,
    params: SocketParams,
    outbox: Outbox,
    by_topic: HashMap<String, Channel>,
}

impl Channels {
    pub(crate) fn new(shared: Arc<Shared>, params: SocketParams, outbox: Outbox) -> Channels {
        Channels {
            shared,
            params,
            outbox,
            by_topic: HashMap::new(),
        }
    }

    fn vsn(&self) -> Vsn {
        self.params.vsn
    }

    /// Queues a frame for this socket.
    fn send(
        &self,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        event: &str,
        payload: &str,
    ) {
        let text = self.vsn().encode(join_ref, msg_ref, topic, event, payload);
        self.outbox.push(Frame::text(text));
    }

    /// Queues a frame after `delay` without holding up the socket.
    fn send_later(
        &self,
        delay: Duration,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        event: &str,
        payload: &str,
    ) {
        if delay.is_zero() {
            return self.send(join_ref, msg_ref, topic, event, payload);
        }
        let frame = Frame::text(self.vsn().encode(join_ref, msg_ref, topic, event, payload));
        let outbox = self.outbox.clone();
        let shutdown = self.shared.shutdown.clone();
        self.shared.tracker.spawn(async move {
            // Shutdown does not wait for a delayed refusal: the socket is closing anyway.
            tokio::select! {
                () = tokio::time::sleep(delay) => {
                    outbox.push(frame);
                }
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Handles one text frame.
    pub(crate) async fn handle_text(&mut self, text: &str) {
        Metrics::add(&self.shared.metrics.messages_in, 1);
        match self.vsn().decode(text) {
            Ok(message) => self.dispatch(message).await,
            Err(e) => {
                Metrics::add(&self.shared.metrics.malformed_in, 1);
                debug!(error = %e, "malformed text frame dropped");
            }
        }
    }

    /// Handles one binary frame (kind 3 broadcast pushes on V2 sockets).
    pub(crate) async fn handle_binary(&mut self, bytes: Bytes) {
        Metrics::add(&self.shared.metrics.messages_in, 1);
        let decoded = match self.vsn() {
            Vsn::V1 => Err(realtime_protocol::DecodeError::Binary(
                "binary frame on a v1 socket",
            )),
            Vsn::V2 => binary::decode(&bytes),
        };
        match decoded {
            Ok(push) => self.broadcast_binary(push).await,
            Err(e) => {
                Metrics::add(&self.shared.metrics.malformed_in, 1);
                debug!(error = %e, "malformed binary frame dropped");
            }
        }
    }

    async fn dispatch(&mut self, m: Inbound) {
        if m.topic == PHOENIX_TOPIC {
            if m.event == "heartbeat" {
                self.send(
                    None,
                    m.msg_ref.as_ref(),
                    PHOENIX_TOPIC,
                    "phx_reply",
                    &payload::reply_ok(EMPTY),
                );
            } else {
                self.reply_unmatched(&m);
            }
            return;
        }
        if m.event == "phx_join" {
            // Boxed: the join's database work would otherwise enlarge every socket's future.
            return Box::pin(self.join(m)).await;
        }
        let Some(channel) = self.by_topic.get(&m.topic) else {
            if m.event == "phx_leave" {
                self.send(
                    m.join_ref.as_ref(),
                    m.msg_ref.as_ref(),
                    &m.topic,
                    "phx_reply",
                    &payload::reply_ok(EMPTY),
                );
            } else {
                self.reply_unmatched(&m);
            }
            return;
        };
        if m.join_ref.is_some() && m.join_ref != channel.join_ref {
            debug!(topic = %m.topic, "push with a stale join_ref ignored");
            return;
        }
        match m.event.as_str() {
            "phx_leave" => self.leave(&m),
            "broadcast" => self.broadcast_json(&m).await,
            "access_token" => {
                if let Some(token) = payload::parse_access_token(&m.payload) {
                    Box::pin(self.refresh_token(&m.topic, token)).await;
                }
            }
            "presence" => Box::pin(self.presence(&m)).await,
            // Unknown events on a joined channel are ignored without a reply, as the reference does.
            _ => debug!(event = %m.event, "unknown channel event ignored"),
        }
    }

    fn reply_unmatched(&self, m: &Inbound) {
        self.send(
            m.join_ref.as_ref(),
            m.msg_ref.as_ref(),
            &m.topic,
            "phx_reply",
            &payload::reply_error_reason("unmatched topic"),
        );
    }

    /// `phx_join`: checks, registration, reply, then the pushes that follow a join.
    async fn join(&mut self, m: Inbound) {
        let shared = self.shared.clone();
        let backoff = shared.config.channel_error_backoff();
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
            Metrics::add(&this.shared.metrics.join_errors_total, 1);
            this.send_later(
                backoff,
                join_ref.as_ref(),
                m.msg_ref.as_ref(),
                &m.topic,
                "phx_reply",
                &payload::reply_error_reason(reason),
            );
        };
        let join = JoinPayload::parse(&m.payload);
        if join.invalid {
            debug!(topic = %m.topic, "InvalidJoinPayload: continuing with the fields that could be cast");
        }
        if sub_topic.is_empty() {
            return refuse(self, "TopicNameRequired: You must provide a topic name");
        }
        if shared.config.private_only && !join.private {
            return refuse(
                self,
                "PrivateOnly: This project only allows private channels",
            );
        }
        if self.by_topic.len() >= shared.config.max_channels_per_client {
            return refuse(self, "ChannelRateLimitReached: Too many channels");
        }
        let token = match join.access_token.as_deref() {
            Some(t) if !t.starts_with("sb_") => t.to_owned(),
            _ => self.params.connect_token.clone(),
        };
        let claims = match shared.verifier.verify(&token) {
            Ok(claims) => claims,
            Err(e) => return refuse(self, &e.join_reason()),
        };
        let presence_enabled = join.presence.enabled || shared.config.presence_enabled;
        // Private channels: read permissions from RLS on realtime.messages.
        let read = if join.private {
            let Some(pg) = &shared.postgres else {
                return refuse(self, &shared.private_channels_unavailable());
            };
            let claims_json = claims_text(&claims);
            let ctx = self.authz_context(&claims, &claims_json, &sub_topic);
            match authorization::read(&pg.db, &ctx, presence_enabled).await {
                Ok((broadcast, presence)) if broadcast || presence == Some(true) => {
                    ReadAccess::new(broadcast, presence == Some(true))
                }
                Ok(_) => {
                    debug!(topic = %m.topic, role = %claims.role, "private join refused: no read policy grants broadcast or presence");
                    return refuse(self, &authorization::unauthorized(&sub_topic));
                }
                Err(e) => {
                    warn!(topic = %m.topic, error = ?e, "private join refused: read check failed");
                    return refuse(self, &e.join_reason(&sub_topic));
                }
            }
        } else {
            ReadAccess::public()
        };
        let replayed = match &join.broadcast.replay {
            None => Vec::new(),
            Some(_) if !join.private => {
                return refuse(
                    self,
                    "UnableToReplayMessages: Replay is not allowed for public channels",
                );
            }
            Some(replay) => {
                let (Some(since), Some(pg)) = (replay.since.as_i64(), &shared.postgres) else {
                    return refuse(self, "UnableToReplayMessages: Replay params are not valid");
                };
                if !read.broadcast() {
                    return refuse(self, &authorization::unauthorized(&sub_topic));
                }
                let limit = replay.limit.as_i64().unwrap_or(25);
                match replay::load(&pg.db, &sub_topic, since, limit).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        warn!(topic = %m.topic, error = %e, "replay failed");
                        return refuse(
                            self,
                            "UnableToReplayMessages: Realtime was unable to replay messages",
                        );
                    }
                }
            }
        };

        if !replayed.is_empty() {
            read.set_replayed(replayed.iter().map(|r| Box::from(r.id.as_str())).collect());
        }
        let key = TopicKey {
            private: join.private,
            topic: Arc::from(m.topic.as_str()),
        };
        let member = Member {
            id: shared.registry.next_member_id(),
            outbox: self.outbox.clone(),
            vsn: self.vsn(),
            read: read.clone(),
        };
        let member_id = member.id;
        let presence_key: Arc<str> = if join.presence.key.is_empty() {
            Arc::from(generated_presence_key().as_str())
        } else {
            Arc::from(join.presence.key.as_str())
        };
        let pg_entries: Vec<(serde_json::Value, u32)> = join
            .postgres_changes
            .iter()
            .map(|e| (e.value.clone(), binding_id(&e.raw)))
            .collect();
        // Ready means ready: subscriptions are in the router, and the stream is live, before the
        // client hears it is subscribed.
        let mut pg_retry_at = None;
        let system = if pg_entries.is_empty() {
            None
        } else {
            let outcome = self
                .subscribe_postgres(
                    member_id,
                    &m.topic,
                    &claims,
                    &pg_entries,
                    POSTGRES_READY_TIMEOUT,
                )
                .await;
            pg_retry_at = outcome.retry_at();
            let (ok, message) = outcome.system_message();
            Some(payload::system(
                "postgres_changes",
                ok,
                &message,
                Some(&sub_topic),
            ))
        };
        let reply = payload::reply_ok(&join_response(&join.postgres_changes));
        // Reply, system messages and presence_state are queued under the topic's lock, so they
        // reach the client before any fan-out that follows the join (§3.6 order).
        let topic = shared.registry.join(key, member, |inner| {
            self.send(
                join_ref.as_ref(),
                m.msg_ref.as_ref(),
                &m.topic,
                "phx_reply",
                &reply,
            );
            for row in &replayed {
                self.send_replayed(join_ref.as_ref(), &m.topic, row);
            }
            if let Some(system) = &system {
                self.send(join_ref.as_ref(), None, &m.topic, "system", system);
            }
            if presence_enabled && read.presence() {
                self.send(
                    join_ref.as_ref(),
                    None,
                    &m.topic,
                    "presence_state",
                    &inner.presence.render(),
                );
            }
        });
        Metrics::add(&shared.metrics.joins_total, 1);
        Metrics::gauge(&shared.metrics.channels, 1);
        debug!(topic = %m.topic, role = %claims.role, private = join.private, "channel joined");
        let expires_at = expiry_instant(claims.exp);
        let channel = Channel {
            join_ref,
            sub_topic,
            topic,
            member: member_id,
            ack: join.broadcast.ack,
            self_broadcast: join.broadcast.self_broadcast,
            token,
            claims,
            expires_at,
            presence_key,
            presence_enabled,
            tracked: None,
            presence_calls: 0,
            presence_window_ends: None,
            pg_entries,
            private: join.private,
            read,
            broadcast_write: None,
            presence_write: None,
            pg_retry_at,
        };
        self.by_topic.insert(m.topic, channel);
    }

    /// `phx_leave`: reply ok, then `phx_close`.
    fn leave(&mut self, m: &Inbound) {
        let Some(channel) = self.by_topic.remove(&m.topic) else {
            return;
        };
        self.send(
            channel.join_ref.as_ref(),
            m.msg_ref.as_ref(),
            &m.topic,
            "phx_reply",
            &payload::reply_ok(EMPTY),
        );
        self.end_channel(&m.topic, channel, None);
    }

    /// Removes a channel everywhere and tells the client: an optional `system` error first, then
    /// `phx_close` with `ref` = `join_ref`.
    fn end_channel(&self, topic: &str, channel: Channel, system_error: Option<&str>) {
        if let Some(message) = system_error {
            let system = payload::system("system", false, message, Some(&channel.sub_topic));
            self.send(channel.join_ref.as_ref(), None, topic, "system", &system);
        }
        self.send(
            channel.join_ref.as_ref(),
            channel.join_ref.as_ref(),
            topic,
            "phx_close",
            EMPTY,
        );
        self.forget(channel);
    }

    /// Removes a channel from the registry (and its presence) without telling the client.
    fn forget(&self, channel: Channel) {
        if let Some(pg) = &self.shared.postgres {
            pg.router.unsubscribe(channel.member);
        }
        self.shared.registry.leave(&channel.topic, channel.member);
        Metrics::gauge(&self.shared.metrics.channels, -1);
    }

    /// Leaves every channel (the socket is closing).
    pub(crate) fn close_all(&mut self) {
        for (_, channel) in std::mem::take(&mut self.by_topic) {
            self.forget(channel);
        }
    }

    /// A JSON `broadcast` push: relayed verbatim to the topic's members.
    async fn broadcast_json(&mut self, m: &Inbound) {
        if !self.may_write(&m.topic, Extension::Broadcast).await {
            // Write denied: dropped without any reply, even with ack (the reference's behaviour).
            return;
        }
        let Some(channel) = self.by_topic.get(&m.topic) else {
            return;
        };
        let payload = m.payload.get();
        if payload.len() > self.shared.config.max_payload_bytes() {
            return self.reply_too_large(channel, &m.topic, m.msg_ref.as_ref());
        }
        let skip = (!channel.self_broadcast).then_some(channel.member);
        self.fan_out(
            channel,
            &Outgoing::Push {
                event: "broadcast",
                payload,
            },
            skip,
        );
        self.ack(channel, &m.topic, m.msg_ref.as_ref());
    }

    /// A kind-3 binary push: fanned out as a user broadcast. Client metadata is not forwarded.
    async fn broadcast_binary(&mut self, push: BinaryPush) {
        if self.by_topic.contains_key(&push.topic)
            && !self.may_write(&push.topic, Extension::Broadcast).await
        {
            return;
        }
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
        if push.payload.len() > self.shared.config.max_payload_bytes() {
            return self.reply_too_large(channel, &push.topic, push.msg_ref.as_ref());
        }
        let skip = (!channel.self_broadcast).then_some(channel.member);
        let message = Outgoing::User {
            event: &push.event,
            metadata: None,
            encoding: push.encoding,
            payload: &push.payload,
        };
        self.fan_out(channel, &message, skip);
        self.ack(channel, &push.topic, push.msg_ref.as_ref());
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

    fn fan_out(&self, channel: &Channel, message: &Outgoing<'_>, skip: Option<MemberId>) {
        let delivery = channel.topic.publish(message, skip);
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.broadcasts_total, 1);
        Metrics::add(&metrics.dropped_deliveries, delivery.dropped);
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

    /// `access_token`: never answered. A new valid token replaces the channel's claims; an
    /// invalid one ends the channel with the reason.
    async fn refresh_token(&mut self, topic: &str, token: String) {
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
        if channel.private && !self.reauthorize_read(topic).await {
            return;
        }
        let Some(channel) = self.by_topic.get(topic) else {
            return;
        };
        // Postgres Changes follow the new claims: re-subscribe, and say so again.
        if channel.pg_entries.is_empty() {
            return;
        }
        let (join_ref, sub_topic) = (channel.join_ref.clone(), channel.sub_topic.clone());
        let Some(outcome) = self
            .resubscribe_postgres(topic, POSTGRES_READY_TIMEOUT)
            .await
        else {
            return;
        };
        let (ok, message) = outcome.system_message();
        let system = payload::system("postgres_changes", ok, &message, Some(&sub_topic));
        self.send(join_ref.as_ref(), None, topic, "system", &system);
    }

    /// Resolves a channel's postgres_changes entries for its claims and registers them in the
    /// change router, waiting up to `wait` for the stream to be live.
    async fn subscribe_postgres(
        &self,
        member: MemberId,
        topic: &str,
        claims: &Claims,
        entries: &[(serde_json::Value, u32)],
        wait: Duration,
    ) -> PgOutcome {
        let Some(pg) = &self.shared.postgres else {
            return PgOutcome::Failed(self.shared.postgres_changes_unavailable());
        };
        match crate::postgres::subscribe(
            pg,
            member,
            &self.outbox,
            self.vsn(),
            topic,
            claims,
            entries,
        )
        .await
        {
            Ok(()) if pg.wait_streaming(wait).await => PgOutcome::Ready,
            Ok(()) => PgOutcome::NotLive,
            Err(crate::postgres::SubscribeError::Unavailable(message)) => PgOutcome::Retry(message),
            Err(crate::postgres::SubscribeError::Invalid(message)) => PgOutcome::Failed(message),
        }
    }

    /// Subscribes a joined channel again with its current claims and schedules the next try
    /// from the outcome; `None` when the channel is gone.
    async fn resubscribe_postgres(&mut self, topic: &str, wait: Duration) -> Option<PgOutcome> {
        let channel = self.by_topic.get(topic)?;
        let (member, claims, entries) = (
            channel.member,
            channel.claims.clone(),
            channel.pg_entries.clone(),
        );
        let outcome = self
            .subscribe_postgres(member, topic, &claims, &entries, wait)
            .await;
        self.by_topic.get_mut(topic)?.pg_retry_at = outcome.retry_at();
        Some(outcome)
    }

    /// The earliest moment something is due: a token expiry or a Postgres Changes retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_topic
            .values()
            .flat_map(|c| std::iter::once(c.expires_at).chain(c.pg_retry_at))
            .min()
    }

    /// Ends the channels whose token has expired, and retries Postgres Changes that are due.
    pub(crate) async fn on_deadline(&mut self) {
        self.expire_tokens();
        let now = Instant::now();
        let due: Vec<String> = self
            .by_topic
            .iter()
            .filter(|(_, c)| c.pg_retry_at.is_some_and(|at| at <= now))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in due {
            let Some(channel) = self.by_topic.get(&topic) else {
                continue;
            };
            let (join_ref, sub_topic) = (channel.join_ref.clone(), channel.sub_topic.clone());
            let Some(outcome) = self.resubscribe_postgres(&topic, Duration::ZERO).await else {
                continue;
            };
            // Retries are silent until they settle: then the client hears the outcome once.
            let message = match &outcome {
                PgOutcome::Ready => Some((true, "Subscribed to PostgreSQL".to_owned())),
                PgOutcome::Failed(message) => Some((false, message.clone())),
                PgOutcome::NotLive | PgOutcome::Retry(_) => None,
            };
            if let Some((ok, message)) = message {
                let system = payload::system("postgres_changes", ok, &message, Some(&sub_topic));
                self.send(join_ref.as_ref(), None, &topic, "system", &system);
            }
        }
    }

    /// Ends the channels whose token has expired.
    fn expire_tokens(&mut self) {
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

    /// A `presence` push: track or untrack this channel's presence.
    async fn presence(&mut self, m: &Inbound) {
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
        if matches!(push, PresencePush::Track(_)) && !self.may_track(&m.topic).await {
            return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_error(EMPTY));
        }
        let config = &self.shared.config;
        let Some(channel) = self.by_topic.get_mut(&m.topic) else {
            return;
        };
        match push {
            PresencePush::Track(meta) => {
                let meta = meta.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
                let Some(body) = crate::presence::object_body(&meta) else {
                    let reply = payload::reply_error_reason("Presence track payload must be a map");
                    return self.reply(&m.topic, m.msg_ref.as_ref(), &reply);
                };
                if channel.tracked.as_deref() == Some(body.as_str()) {
                    return self.reply(&m.topic, m.msg_ref.as_ref(), &payload::reply_ok(EMPTY));
                }
                if body.len() + 2 > config.max_payload_bytes() {
                    return self.shut_down(&m.topic, "Track message size exceeded");
                }
                let (member, key) = (channel.member, channel.presence_key.clone());
                let sync = !channel.presence_enabled;
                channel.presence_enabled = true;
                channel.tracked = Some(body.clone());
                let topic = channel.topic.clone();
                let join_ref = channel.join_ref.clone();
                let may_read = channel.read.presence();
                // A track that enables presence syncs the full state, or members tracked before
                // stay invisible to this client.
                topic.presence(
                    |state| state.track(member, &key, &body),
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
                let member = channel.member;
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

    /// The RLS context of a channel's checks.
    fn authz_context<'a>(
        &'a self,
        claims: &'a Claims,
        claims_json: &'a str,
        sub_topic: &'a str,
    ) -> authorization::Context<'a> {
        authorization::Context {
            role: &claims.role,
            claims: claims_json,
            sub: claims.all.get("sub").and_then(|v| v.as_str()).unwrap_or(""),
            topic: sub_topic,
            headers: &self.params.headers,
        }
    }

    /// Whether the channel may write `extension` (public channels always may). A private
    /// channel's answer is checked once and kept until the next token refresh; errors deny
    /// without being kept.
    async fn may_write(&mut self, topic: &str, extension: Extension) -> bool {
        let Some(channel) = self.by_topic.get(topic) else {
            return false;
        };
        if !channel.private {
            return true;
        }
        let cached = match extension {
            Extension::Broadcast => channel.broadcast_write,
            Extension::Presence => channel.presence_write,
        };
        if let Some(allowed) = cached {
            return allowed;
        }
        let Some(pg) = self.shared.postgres.clone() else {
            return false;
        };
        let (claims, sub_topic) = (channel.claims.clone(), channel.sub_topic.clone());
        let claims_json = claims_text(&claims);
        let ctx = self.authz_context(&claims, &claims_json, &sub_topic);
        let result = Box::pin(authorization::write(&pg.db, &ctx, extension.name())).await;
        match result {
            Ok(allowed) => {
                if let Some(channel) = self.by_topic.get_mut(topic) {
                    match extension {
                        Extension::Broadcast => channel.broadcast_write = Some(allowed),
                        Extension::Presence => channel.presence_write = Some(allowed),
                    }
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

    /// Whether a private channel may track presence: presence read is checked first when the
    /// join did not (presence was off), then presence write.
    async fn may_track(&mut self, topic: &str) -> bool {
        let Some(channel) = self.by_topic.get(topic) else {
            return false;
        };
        if !channel.private {
            return true;
        }
        if !channel.presence_enabled && channel.presence_write.is_none() {
            let Some(pg) = self.shared.postgres.clone() else {
                return false;
            };
            let (claims, sub_topic) = (channel.claims.clone(), channel.sub_topic.clone());
            let claims_json = claims_text(&claims);
            let ctx = self.authz_context(&claims, &claims_json, &sub_topic);
            if let Ok((broadcast, presence)) = authorization::read(&pg.db, &ctx, true).await
                && let Some(channel) = self.by_topic.get(topic)
            {
                channel.read.set(broadcast, presence == Some(true));
            }
        }
        self.may_write(topic, Extension::Presence).await
    }

    /// Re-runs a private channel's read check after a token refresh. Returns false when the
    /// channel was ended.
    async fn reauthorize_read(&mut self, topic: &str) -> bool {
        let Some(channel) = self.by_topic.get(topic) else {
            return false;
        };
        let Some(pg) = self.shared.postgres.clone() else {
            return true;
        };
        let (claims, sub_topic) = (channel.claims.clone(), channel.sub_topic.clone());
        let (had_broadcast, check_presence) = (channel.read.broadcast(), channel.presence_enabled);
        let claims_json = claims_text(&claims);
        let ctx = self.authz_context(&claims, &claims_json, &sub_topic);
        match authorization::read(&pg.db, &ctx, check_presence).await {
            Ok((broadcast, presence)) if broadcast || presence == Some(true) => {
                if let Some(channel) = self.by_topic.get(topic) {
                    channel.read.set(broadcast, presence == Some(true));
                }
                true
            }
            Ok(_) => {
                let message = if had_broadcast {
                    format!(
                        "You no longer have permission to read from this Channel topic: {sub_topic}"
                    )
                } else {
                    format!(
                        "You do not have permissions to read from this Channel topic: {sub_topic}"
                    )
                };
                self.shut_down(topic, &message);
                false
            }
            Err(e) => {
                warn!(topic, error = ?e, "read check after token refresh failed");
                self.shut_down(
                    topic,
                    "Realtime was unable to connect to the project database",
                );
                false
            }
        }
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
                if let Ok(frame) = binary::encode_user_broadcast(
                    topic,
                    &row.event,
                    meta.as_bytes(),
                    realtime_protocol::binary::PayloadEncoding::Binary,
                    bytes,
                ) {
                    self.outbox.push(Frame::Binary(frame));
                }
            }
            _ => {}
        }
    }

    /// A `phx_reply` on a joined channel.
    fn reply(&self, topic: &str, msg_ref: Option<&Ref>, body: &str) {
        let join_ref = self.by_topic.get(topic).and_then(|c| c.join_ref.as_ref());
        self.send(join_ref, msg_ref, topic, "phx_reply", body);
    }

    /// Ends a channel with a `system` error and `phx_close` (the reference's shutdown response).
    fn shut_down(&mut self, topic: &str, message: &str) {
        if let Some(channel) = self.by_topic.remove(topic) {
            self.end_channel(topic, channel, Some(message));
        }
    }
}

/// A presence key for a join that gave none: a UUID v1, as the reference generates.
fn generated_presence_key() -> String {
    use std::sync::OnceLock;
    static NODE: OnceLock<[u8; 6]> = OnceLock::new();
    let node = NODE.get_or_init(rand::random::<[u8; 6]>);
    uuid::Uuid::now_v1(node).to_string()
}

/// How subscribing a channel to Postgres Changes went.
#[derive(Debug)]
enum PgOutcome {
    /// Registered, and the stream is live.
    Ready,
    /// Registered, but the stream is not live yet: checked again shortly.
    NotLive,
    /// The database could not be reached: tried again in 5–10 s, as the reference does.
    Retry(String),
    /// The subscription is invalid: not retried.
    Failed(String),
}

impl PgOutcome {
    fn retry_at(&self) -> Option<Instant> {
        match self {
            PgOutcome::NotLive => Some(Instant::now() + Duration::from_secs(1)),
            PgOutcome::Retry(_) => {
                Some(Instant::now() + Duration::from_millis(5_000 + rand::random::<u64>() % 5_000))
            }
            PgOutcome::Ready | PgOutcome::Failed(_) => None,
        }
    }

    /// The status and text of the `system` message for this outcome.
    fn system_message(&self) -> (bool, String) {
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

/// What a private channel writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extension {
    Broadcast,
    Presence,
}

impl Extension {
    fn name(self) -> &'static str {
        match self {
            Extension::Broadcast => "broadcast",
            Extension::Presence => "presence",
        }
    }
}

/// The claims as the JSON text RLS reads from `request.jwt.claims`.
fn claims_text(claims: &Claims) -> String {
    serde_json::Value::Object((*claims.all).clone()).to_string()
}

/// The instant a token with expiry `exp` (epoch seconds) expires.
fn expiry_instant(exp: i64) -> Instant {
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
