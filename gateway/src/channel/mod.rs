//! The channels of one socket and the handlers of every client push.
//!
//! A channel is joined with `phx_join` on a `realtime:<sub_topic>` topic and lives until
//! `phx_leave`, a duplicate join of its topic, a fatal token problem, or the socket's end. Every
//! frame the server pushes to one channel carries its `join_ref`; `phx_close` and `phx_error`
//! carry it as `ref` too, which is how clients tell a stale close from a current one. Fan-out
//! frames (`broadcast`, `presence_diff`, `postgres_changes`) carry `null` refs.
//!
//! One file per feature: `join`, `broadcast`, `presence`, `postgres` (Postgres Changes
//! subscriptions and their retries), `access` (private-channel checks), `refresh` (token
//! refresh and expiry). Whatever waits on the database runs off the socket's loop (`work`).
//!
//! Error replies to a join are delayed by `CHANNEL_ERROR_BACKOFF_MS`, as in the reference
//! server, without holding up the socket: the delayed reply is queued by a small timer task.

mod access;
mod broadcast;
mod join;
mod postgres;
mod presence;
mod refresh;
mod work;

use crate::auth::Claims;
use crate::metrics::Metrics;
use crate::outbox::{Frame, Outbox};
use crate::resume::{Cursor, ParkAt};
use crate::state::Shared;
use crate::topics::{Member, Topic};
use bytes::Bytes;
use realtime_protocol::binary;
use realtime_protocol::payload;
use realtime_protocol::{Inbound, Ref, Vsn};
use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;
use work::{Kind, Queued, Step, Work};

const PHOENIX_TOPIC: &str = "phoenix";
const TOPIC_PREFIX: &str = "realtime:";
const EMPTY: &str = "{}";

/// What the connect step learned about the client.
#[derive(Debug)]
pub(crate) struct SocketParams {
    pub(crate) vsn: Vsn,
    /// The connect token (`x-api-key` or `apikey`): the channel token when a join has none.
    pub(crate) connect_token: String,
    /// The client's `x-*` headers as a JSON object, as RLS sees them in `request.headers`.
    pub(crate) headers: Arc<str>,
}

/// One joined channel.
#[derive(Debug)]
struct Channel {
    join_ref: Option<Ref>,
    sub_topic: String,
    topic: Arc<Topic>,
    /// The membership shared with the topic and the change index.
    member: Arc<Member>,
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
    pg_entries: Arc<[(serde_json::Value, u32)]>,
    /// A private channel: permissions come from RLS on realtime.messages.
    private: bool,
    /// Write permissions, checked at first use and until the next token refresh.
    broadcast_write: Option<bool>,
    presence_write: Option<bool>,
    /// When to try Postgres Changes again (the database was down, or the stream not live yet).
    pg_retry: Option<postgres::PgRetry>,
}

/// The channels of one socket.
#[derive(Debug)]
pub(crate) struct Channels {
    shared: Arc<Shared>,
    params: SocketParams,
    outbox: Outbox,
    by_topic: HashMap<String, Channel>,
    work: Work,
}

impl Channels {
    pub(crate) fn new(shared: Arc<Shared>, params: SocketParams, outbox: Outbox) -> Channels {
        Channels {
            shared,
            params,
            outbox,
            by_topic: HashMap::new(),
            work: Work::default(),
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
    pub(crate) fn handle_text(&mut self, text: &str) {
        Metrics::add(&self.shared.metrics.messages_in, 1);
        match self.vsn().decode(text) {
            Ok(message) => self.dispatch(message),
            Err(e) => {
                Metrics::add(&self.shared.metrics.malformed_in, 1);
                debug!(error = %e, "malformed text frame dropped");
            }
        }
    }

    /// Handles one binary frame (kind 3 broadcast pushes on V2 sockets).
    pub(crate) fn handle_binary(&mut self, bytes: Bytes) {
        Metrics::add(&self.shared.metrics.messages_in, 1);
        let decoded = match self.vsn() {
            Vsn::V1 => Err(realtime_protocol::DecodeError::Binary(
                "binary frame on a v1 socket",
            )),
            Vsn::V2 => binary::decode(&bytes),
        };
        match decoded {
            Ok(push) => self.dispatch_binary(push),
            Err(e) => {
                Metrics::add(&self.shared.metrics.malformed_in, 1);
                debug!(error = %e, "malformed binary frame dropped");
            }
        }
    }

    fn dispatch(&mut self, m: Inbound) {
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
        match self.work.running(&m.topic) {
            // A new join or a leave ends a join that has not finished.
            Some(Kind::Join) if m.event == "phx_join" || m.event == "phx_leave" => {
                debug!(topic = %m.topic, "pending join cancelled");
                self.work.cancel(&m.topic);
            }
            Some(_) => return self.work.enqueue(Queued::Text(m)),
            None => {}
        }
        if m.event == "phx_join" {
            return self.join(m);
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
            "broadcast" => self.broadcast_json(m),
            "access_token" => {
                if let Some(token) = payload::parse_access_token(&m.payload) {
                    self.refresh_token(&m.topic, token);
                }
            }
            "presence" => self.presence(m),
            // Unknown events on a joined channel are ignored without a reply, as the reference does.
            _ => debug!(event = %m.event, "unknown channel event ignored"),
        }
    }

    fn dispatch_binary(&mut self, push: binary::BinaryPush) {
        if self.work.running(&push.topic).is_some() {
            return self.work.enqueue(Queued::Binary(push));
        }
        self.broadcast_binary(push);
    }

    /// Runs `job` for `topic` off the socket's loop; its step is applied when it finishes.
    fn start_job(
        &mut self,
        topic: &str,
        kind: Kind,
        job: impl Future<Output = Step> + Send + 'static,
    ) {
        self.work.start(topic, kind, Box::pin(job));
    }

    /// Whether jobs are running (the socket then polls [`Channels::poll_work`]).
    pub(crate) fn has_work(&self) -> bool {
        !self.work.is_idle()
    }

    /// Whether the socket should stop reading until jobs finish.
    pub(crate) fn backlogged(&self) -> bool {
        self.work.backlogged()
    }

    /// Polls the running jobs.
    pub(crate) fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<(String, Step)> {
        self.work.poll_next(cx)
    }

    /// Applies a finished job, then the pushes that waited behind it.
    pub(crate) fn finish_job(&mut self, topic: String, step: Step) {
        step(self);
        if self.work.running(&topic).is_some() {
            // A background job finished while a blocking one still runs: its pushes wait on.
            return;
        }
        for queued in self.work.take_queued(&topic) {
            match queued {
                Queued::Text(m) => self.dispatch(m),
                Queued::Binary(p) => self.dispatch_binary(p),
            }
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

    /// Removes a channel from the topic, the change index and presence without telling the
    /// client; it will not resume.
    fn forget(&self, channel: Channel) {
        self.remove(channel, None);
    }

    /// Removes a channel; `park`: its Postgres Changes are kept for a resume, at that position.
    fn remove(&self, channel: Channel, park: Option<ParkAt>) {
        if let Some(pg) = &self.shared.postgres {
            pg.index.remove(channel.member.id);
            if let (Some(store), Some(cursor)) = (&pg.resume, &channel.member.resume) {
                match park {
                    Some(at) => store.park(cursor, at),
                    None => store.release(cursor),
                }
            }
        }
        self.shared
            .registry
            .leave(&channel.topic, channel.member.id);
        Metrics::gauge(&self.shared.metrics.channels, -1);
    }

    /// Leaves every channel (the socket is closing) and parks their Postgres Changes at `park`;
    /// running jobs are dropped.
    pub(crate) fn close_all(&mut self, park: ParkAt) {
        self.work = Work::default();
        for (_, channel) in std::mem::take(&mut self.by_topic) {
            self.remove(channel, Some(park));
        }
    }

    /// The resume cursor of the channel in `slot`.
    pub(crate) fn cursor(&self, slot: u32) -> Option<&Arc<Cursor>> {
        self.cursors().find(|c| c.slot == slot)
    }

    /// The resume cursors of this socket's channels.
    pub(crate) fn cursors(&self) -> impl Iterator<Item = &Arc<Cursor>> {
        self.by_topic
            .values()
            .filter_map(|c| c.member.resume.as_ref())
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

    /// The channel of `topic` when it is still the one with `member`'s id (a job's step applies
    /// only to the channel it was started for).
    fn current(&mut self, topic: &str, member: crate::topics::MemberId) -> Option<&mut Channel> {
        self.by_topic
            .get_mut(topic)
            .filter(|c| c.member.id == member)
    }

    /// The earliest moment something is due: a token expiry or a Postgres Changes retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_topic
            .values()
            .flat_map(|c| std::iter::once(c.expires_at).chain(c.pg_retry.map(|r| r.at)))
            .min()
    }

    /// Ends the channels whose token has expired, and starts Postgres Changes retries that are
    /// due.
    pub(crate) fn on_deadline(&mut self) {
        self.expire_tokens();
        self.retry_postgres();
    }
}

/// The claims as the JSON text RLS reads from `request.jwt.claims`.
fn claims_text(claims: &Claims) -> String {
    serde_json::Value::Object((*claims.all).clone()).to_string()
}
