//! One WebSocket connection: a single task that reads client frames, runs the channel handlers,
//! polls the channels' database work, and drains the socket's outbox onto the wire. The loop
//! itself never waits on the database: a join that waits for it is a job polled next to the
//! reads and writes (`crate::channel`), so heartbeats are answered meanwhile.
//!
//! Heartbeats: a client heartbeats on topic `phoenix` every 25 s; any frame resets the idle
//! deadline, and a socket that sent nothing for the idle timeout (60 s) is closed. The server
//! never heartbeats on its own.
//!
//! Closing: the socket closes when the client closes, when it idles out, when its outbox
//! overflows (it does not drain), or on shutdown. Whatever the cause, every channel leaves the
//! registry and its presence is removed.

use crate::channel::{Channels, SocketParams};
use crate::metrics::{CloseKind, Metrics};
use crate::outbox::{CloseReason, Frame, OutboxReceiver};
use crate::state::Shared;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Frames written before a flush.
const WRITE_BATCH: usize = 64;

/// Serves one upgraded connection until it closes.
pub(crate) async fn serve<S>(shared: Arc<Shared>, ws: S, params: SocketParams)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let metrics = &shared.metrics;
    Metrics::gauge(&metrics.connections, 1);
    Metrics::add(&metrics.connections_total, 1);
    let kill = shared.shutdown.child_token();
    let (outbox, rx) = crate::outbox::outbox(
        shared.config.outbox_max_frames,
        shared.config.outbox_max_bytes,
        kill.clone(),
    );
    let mut channels = Channels::new(shared.clone(), params, outbox);
    let kind = run(&shared, ws, rx, &kill, &mut channels).await;
    channels.close_all();
    metrics.closed(kind);
    Metrics::gauge(&metrics.connections, -1);
    debug!(reason = ?kind, "socket closed");
}

async fn run<S>(
    shared: &Shared,
    mut ws: S,
    mut rx: OutboxReceiver,
    kill: &CancellationToken,
    channels: &mut Channels,
) -> CloseKind
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let idle = shared.config.idle_timeout();
    let mut idle_deadline = pin!(tokio::time::sleep(idle));
    let kind = loop {
        let expiry = channels.next_deadline();
        tokio::select! {
            biased;
            () = kill.cancelled() => break match rx.close_reason() {
                CloseReason::SlowConsumer => CloseKind::SlowConsumer,
                CloseReason::Shutdown | CloseReason::None => CloseKind::Shutdown,
            },
            frame = rx.recv() => {
                let Some(frame) = frame else { break CloseKind::Error };
                let written = tokio::select! {
                    r = write_batch(&mut ws, &mut rx, frame, &shared.metrics) => r,
                    () = kill.cancelled() => continue,
                };
                if written.is_err() {
                    break CloseKind::Error;
                }
            }
            (topic, step) = std::future::poll_fn(|cx| channels.poll_work(cx)), if channels.has_work() => {
                channels.finish_job(topic, step);
            }
            message = ws.next(), if !channels.backlogged() => {
                idle_deadline.as_mut().reset(Instant::now() + idle);
                match message {
                    Some(Ok(Message::Text(text))) => channels.handle_text(text.as_str()),
                    Some(Ok(Message::Binary(bytes))) => channels.handle_binary(bytes),
                    Some(Ok(Message::Close(_))) | None => break CloseKind::Client,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "websocket read failed");
                        break CloseKind::Error;
                    }
                }
            }
            () = &mut idle_deadline => break CloseKind::IdleTimeout,
            () = sleep_until(expiry.unwrap_or_else(far_future)), if expiry.is_some() => {
                channels.on_deadline();
            }
        }
    };
    let close = match kind {
        CloseKind::SlowConsumer => {
            info!("closing a socket that does not drain its outbox");
            Some((CloseCode::Policy, "slow consumer: outbox full"))
        }
        CloseKind::Shutdown => Some((CloseCode::Away, "server shutting down")),
        CloseKind::IdleTimeout => Some((CloseCode::Normal, "idle timeout")),
        CloseKind::Client | CloseKind::Error => None,
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.send(Message::Close(Some(frame))))
            .await;
    }
    kind
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes.
///
/// # Cancel safety
/// Not cancel safe: frames taken from the outbox may be lost if cancelled, which only happens
/// when the socket is being closed anyway.
async fn write_batch<S>(
    ws: &mut S,
    rx: &mut OutboxReceiver,
    first: Frame,
    metrics: &Metrics,
) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut frames = 0;
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(frame) = next {
        bytes += frame.len() as u64;
        frames += 1;
        ws.feed(match frame {
            Frame::Text(t) => Message::Text(t),
            Frame::Binary(b) => Message::Binary(b),
        })
        .await?;
        next = if frames < WRITE_BATCH {
            rx.try_recv()
        } else {
            None
        };
    }
    ws.flush().await?;
    Metrics::add(&metrics.messages_out, frames as u64);
    Metrics::add(&metrics.bytes_out, bytes);
    Ok(())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests;
