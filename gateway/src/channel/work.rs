//! Work a socket does off its loop: anything that waits on the database (join checks, write
//! checks, token refresh, Postgres Changes retries) runs as a job polled next to the socket's
//! reads and writes, so heartbeats are answered and the outbox drains while it waits.
//!
//! At most one job runs per topic; pushes for a topic that arrive meanwhile wait behind it, in
//! order, and run when it is done, so replies per topic keep the protocol's order. A job ends
//! with a [`Step`]: a synchronous change to the socket's channels. A `phx_join` or `phx_leave`
//! on a topic whose join is still running cancels that join. An idle socket has no job and
//! holds nothing extra: no task, no allocation.

use super::Channels;
use realtime_protocol::Inbound;
use realtime_protocol::binary::BinaryPush;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a finished job does to the channels.
pub(crate) type Step = Box<dyn FnOnce(&mut Channels) + Send>;

pub(crate) type Job = Pin<Box<dyn Future<Output = Step> + Send>>;

/// Pushes waiting behind a job, at most, before the socket stops reading.
const MAX_QUEUED: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Join,
    Other,
    /// Holds up nothing: pushes of its topic do not wait for it (Postgres Changes retries and
    /// waits for the stream). Its step checks that the channel is still the one it was for.
    Background,
}

/// A push that waits for its topic's job.
#[derive(Debug)]
pub(crate) enum Queued {
    Text(Inbound),
    Binary(BinaryPush),
}

impl Queued {
    pub(crate) fn topic(&self) -> &str {
        match self {
            Queued::Text(m) => &m.topic,
            Queued::Binary(p) => &p.topic,
        }
    }
}

struct Running {
    topic: String,
    kind: Kind,
    job: Job,
}

/// The socket's running jobs and the pushes waiting for them.
#[derive(Default)]
pub(crate) struct Work {
    running: Vec<Running>,
    queued: Vec<Queued>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("running", &self.running.len())
            .field("queued", &self.queued.len())
            .finish()
    }
}

impl Work {
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether so many pushes wait that the socket should stop reading until jobs finish.
    pub(crate) fn backlogged(&self) -> bool {
        self.queued.len() >= MAX_QUEUED
    }

    /// The kind of job running for `topic` that its pushes wait for, if one is.
    pub(crate) fn running(&self, topic: &str) -> Option<Kind> {
        self.running
            .iter()
            .find(|r| r.topic == topic && r.kind != Kind::Background)
            .map(|r| r.kind)
    }

    /// Whether a background job runs for `topic`.
    pub(crate) fn in_background(&self, topic: &str) -> bool {
        self.running
            .iter()
            .any(|r| r.topic == topic && r.kind == Kind::Background)
    }

    /// Joins in progress (they count against the channel limit).
    pub(crate) fn joins(&self) -> usize {
        self.running.iter().filter(|r| r.kind == Kind::Join).count()
    }

    /// Starts a job for `topic`; the caller checked that none of this kind's blocking runs for it.
    pub(crate) fn start(&mut self, topic: &str, kind: Kind, job: Job) {
        debug_assert!(kind == Kind::Background || self.running(topic).is_none());
        self.running.push(Running {
            topic: topic.to_owned(),
            kind,
            job,
        });
    }

    /// Puts a push behind its topic's job.
    pub(crate) fn enqueue(&mut self, push: Queued) {
        self.queued.push(push);
    }

    /// Drops the job of `topic` (its outcome is never applied) and the pushes that waited
    /// behind it.
    pub(crate) fn cancel(&mut self, topic: &str) {
        self.running
            .retain(|r| r.topic != topic || r.kind == Kind::Background);
        self.queued.retain(|q| q.topic() != topic);
    }

    /// The pushes of `topic` that waited, in arrival order; the caller dispatches each again (one
    /// that starts a new job puts the rest back in the queue behind it).
    pub(crate) fn take_queued(&mut self, topic: &str) -> Vec<Queued> {
        let (mine, rest) = std::mem::take(&mut self.queued)
            .into_iter()
            .partition(|q| q.topic() == topic);
        self.queued = rest;
        mine
    }

    /// Polls the running jobs; the first that finished is removed and returned with its topic.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(String, Step)> {
        for i in 0..self.running.len() {
            if let Poll::Ready(step) = self.running[i].job.as_mut().poll(cx) {
                let done = self.running.swap_remove(i);
                return Poll::Ready((done.topic, step));
            }
        }
        Poll::Pending
    }
}
