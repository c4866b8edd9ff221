//! A socket's bounded outbox of already-encoded frames.
//!
//! Everything a socket sends goes through its outbox: replies, pushes and fan-out alike, so the
//! order a client sees is the order frames were queued. A frame is encoded once and shared: a
//! text frame is a [`Utf8Bytes`] and a binary frame a [`Bytes`], both reference counted, so
//! queueing one costs a reference-count increment and a queue push.
//!
//! The slow-consumer rule: pushing never waits. The outbox is bounded by frames and by bytes;
//! when a push finds it full, the socket is marked for closing with [`CloseReason::SlowConsumer`]
//! and the frame is dropped for that socket only. The publisher and every other socket carry on.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// One frame ready for the wire.
#[derive(Clone, Debug)]
pub(crate) enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    pub(crate) fn text(text: String) -> Frame {
        Frame::Text(Utf8Bytes::from(text))
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
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
}

impl CloseReason {
    fn from_u8(v: u8) -> CloseReason {
        match v {
            1 => CloseReason::SlowConsumer,
            2 => CloseReason::Shutdown,
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
        let len = frame.len();
        let queued = self.inner.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.inner.max_bytes && queued != len {
            self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.inner.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                false
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
        self.inner
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// Takes a frame that is already queued, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.inner
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
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
