//! A socket's bounded outbox of already-encoded frames.
//!
//! Everything a socket sends goes through its outbox: replies, pushes and fan-out alike, so the
//! order a client sees is the order frames were queued. A frame is encoded once and shared: a
//! text frame is a [`Utf8Bytes`] and a binary frame a [`Bytes`], both reference counted, so
//! queueing one costs a reference-count increment and a queue push.
//!
//! The slow-consumer rule: what clients publish never waits. The outbox is bounded by frames and
//! by bytes; when a push finds it full, the socket is marked for closing with
//! [`CloseReason::SlowConsumer`] and the frame is dropped for that socket only. The publisher and
//! every other socket carry on.
//!
//! The change stream is the one publisher that may wait, and only for a bounded time
//! ([`Outbox::push_within`]): a full outbox pauses the stream (a large transaction fills healthy
//! sockets faster than they drain), and a socket still full at the deadline is the slow one. The
//! stream counts an outbox as full at half its bounds, so a burst from the stream never leaves a
//! healthy socket without room for a broadcast.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// One frame ready for the wire.
#[derive(Clone, Debug)]
pub(crate) enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A `postgres_changes` frame: text, and the position it carries for its channel's resume
    /// slot (`crate::resume`).
    Change(Utf8Bytes, Mark),
}

/// Where a change frame is in the log, for the channel it is queued for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) slot: u32,
    pub(crate) lsn: u64,
    pub(crate) index: u32,
}

impl Frame {
    pub(crate) fn text(text: String) -> Frame {
        Frame::Text(Utf8Bytes::from(text))
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Frame::Text(t) | Frame::Change(t, _) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }
}

/// Why the server closes a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CloseReason {
    None = 0,
    SlowConsumer = 1,
    Shutdown = 2,
    /// A new join of the same client took its channel over (the socket had gone silent).
    Replaced = 3,
}

impl CloseReason {
    fn from_u8(v: u8) -> CloseReason {
        match v {
            1 => CloseReason::SlowConsumer,
            2 => CloseReason::Shutdown,
            3 => CloseReason::Replaced,
            _ => CloseReason::None,
        }
    }
}

/// The sending side of a socket's outbox; cheap to clone, held by the registry for every channel
/// the socket joined.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    inner: Arc<Shared>,
    tx: mpsc::Sender<Frame>,
}

#[derive(Debug)]
struct Shared {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    close_reason: AtomicU8,
    kill: CancellationToken,
    /// A publisher waits for room ([`Outbox::push_within`]): the receiver wakes it per frame.
    waiting: AtomicBool,
    drained: Notify,
}

/// The receiving side, owned by the socket task.
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    inner: Arc<Shared>,
    rx: mpsc::Receiver<Frame>,
}

/// Creates an outbox bounded by `max_frames` frames and `max_bytes` queued bytes. `kill` is
/// cancelled when the socket must close.
pub(crate) fn outbox(
    max_frames: usize,
    max_bytes: usize,
    kill: CancellationToken,
) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(max_frames.max(1));
    let inner = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        close_reason: AtomicU8::new(CloseReason::None as u8),
        kill,
        waiting: AtomicBool::new(false),
        drained: Notify::new(),
    });
    (
        Outbox {
            inner: inner.clone(),
            tx,
        },
        OutboxReceiver { inner, rx },
    )
}

impl Outbox {
    /// Queues a frame without waiting. Returns false when the socket is gone or was just marked
    /// for closing because it does not drain.
    pub(crate) fn push(&self, frame: Frame) -> bool {
        match self.try_push(frame) {
            Ok(queued) => queued,
            Err(_) => {
                self.close(CloseReason::SlowConsumer);
                false
            }
        }
    }

    /// Queues a frame, waiting for room until `deadline`; a socket still full then is marked as
    /// a slow consumer. Returns false when the frame was not queued.
    ///
    /// # Cancel safety
    /// Cancel safe: the frame is queued or not, never half.
    pub(crate) async fn push_within(&self, frame: Frame, deadline: Instant) -> bool {
        let mut frame = frame;
        loop {
            if self.inner.close_reason.load(Ordering::Acquire) != CloseReason::None as u8 {
                return false;
            }
            let notified = self.inner.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.inner.waiting.store(true, Ordering::Release);
            match self.try_push_stream(frame) {
                Ok(queued) => {
                    self.inner.waiting.store(false, Ordering::Release);
                    return queued;
                }
                Err(full) => frame = full,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.inner.waiting.store(false, Ordering::Release);
                self.close(CloseReason::SlowConsumer);
                return false;
            }
        }
    }

    /// Queues a frame of the change stream when the outbox is under half its bounds; gives it
    /// back otherwise (without marking the socket). `Ok(false)`: the socket is gone.
    pub(crate) fn try_push_stream(&self, frame: Frame) -> Result<bool, Frame> {
        let max = self.tx.max_capacity();
        if max - self.tx.capacity() >= max.div_ceil(2) {
            return Err(frame);
        }
        self.try_push_within_bytes(frame, self.inner.max_bytes / 2)
    }

    /// Queues a frame when there is room; gives it back when the outbox is full (without
    /// marking the socket). `Ok(false)`: the socket is gone.
    fn try_push(&self, frame: Frame) -> Result<bool, Frame> {
        self.try_push_within_bytes(frame, self.inner.max_bytes)
    }

    fn try_push_within_bytes(&self, frame: Frame, max_bytes: usize) -> Result<bool, Frame> {
        let len = frame.len();
        let queued = self.inner.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > max_bytes && queued != len {
            self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(frame);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                Err(frame)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// Marks the socket for closing; the first reason wins.
    pub(crate) fn close(&self, reason: CloseReason) {
        let _ = self.inner.close_reason.compare_exchange(
            CloseReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.inner.kill.cancel();
    }
}

impl OutboxReceiver {
    /// Waits for the next frame.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is only taken out when this returns it.
    pub(crate) async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.taken(&frame);
        Some(frame)
    }

    /// Takes a frame that is already queued, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.taken(&frame);
        Some(frame)
    }

    fn taken(&self, frame: &Frame) {
        self.inner
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::Relaxed);
        if self.inner.waiting.load(Ordering::Acquire) {
            self.inner.drained.notify_waiters();
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Why the socket was marked for closing, if it was.
    pub(crate) fn close_reason(&self) -> CloseReason {
        CloseReason::from_u8(self.inner.close_reason.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_outbox_marks_slow_consumer_and_never_blocks() {
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(2, 1 << 20, kill.clone());
        assert!(tx.push(Frame::text("a".into())));
        assert!(tx.push(Frame::text("b".into())));
        assert!(!tx.push(Frame::text("c".into())));
        assert!(kill.is_cancelled());
        assert_eq!(rx.close_reason(), CloseReason::SlowConsumer);
        assert!(matches!(rx.recv().await, Some(Frame::Text(t)) if t.as_str() == "a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_waits_for_room_until_the_deadline() {
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(2, 1 << 20, kill.clone());
        assert!(tx.push(Frame::text("a".into())));
        // Half full: the stream waits, a broadcast still fits.
        assert!(tx.try_push_stream(Frame::text("x".into())).is_err());
        // A reader that drains after 100 ms: the waiting push gets in.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert!(rx.recv().await.is_some());
            rx
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        assert!(tx.push_within(Frame::text("b".into()), deadline).await);
        assert!(!kill.is_cancelled());
        let _rx = reader.await.unwrap();
        // Nobody reads now: the push gives up at the deadline and marks the socket slow.
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_secs(1);
        assert!(!tx.push_within(Frame::text("c".into()), deadline).await);
        assert!(started.elapsed() >= std::time::Duration::from_secs(1));
        assert!(kill.is_cancelled());
        // A marked socket is not waited on again.
        let again = Instant::now();
        assert!(
            !tx.push_within(
                Frame::text("d".into()),
                again + std::time::Duration::from_secs(5)
            )
            .await
        );
        assert_eq!(again.elapsed(), std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn byte_bound_closes_but_admits_one_large_frame() {
        let kill = CancellationToken::new();
        let (tx, mut rx) = outbox(100, 10, kill.clone());
        assert!(tx.push(Frame::text("x".repeat(50))));
        assert!(!kill.is_cancelled());
        assert!(!tx.push(Frame::text("y".into())));
        assert!(kill.is_cancelled());
        assert_eq!(rx.recv().await.map(|f| f.len()), Some(50));
    }
}
