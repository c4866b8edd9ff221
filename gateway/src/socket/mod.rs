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
//! registry and its presence is removed; a channel with Postgres Changes is parked for resume
//! (`crate::resume`).
//!
//! Positions: after writing `postgres_changes` frames the socket sends a WebSocket ping (one in
//! flight at a time); the client's pong confirms every frame written before it. What was
//! written and what was confirmed go to each channel's resume slot. A socket the client closed
//! or that went silent parks its channels at what was confirmed, one the server closed at what
//! was written (a client that never answers pings is taken at what was written).

use crate::channel::{Channels, SocketParams};
use crate::metrics::{CloseKind, Metrics};
use crate::outbox::{CloseReason, Frame, OutboxReceiver};
use crate::resume::{ParkAt, Position, Store};
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
    let mut confirms = Confirms::default();
    let kind = run(&shared, ws, rx, &kill, &mut channels, &mut confirms).await;
    let park = match kind {
        CloseKind::SlowConsumer | CloseKind::Shutdown => ParkAt::Written,
        _ if confirms.pinged && !confirms.ponged => ParkAt::Written,
        _ => ParkAt::Confirmed,
    };
    channels.close_all(park);
    metrics.closed(kind);
    Metrics::gauge(&metrics.connections, -1);
    debug!(reason = ?kind, "socket closed");
}

/// Pings go out at most this often: a socket that receives change frames all the time sends one
/// ping per interval (in the same flush as frames), not one per flush; every pong costs the
/// server a wake-up and a read. So a frame is confirmed within this time plus a round trip.
const PING_EVERY: Duration = Duration::from_millis(100);

/// Change frames written and what the client confirmed. Kept per socket, reused: nothing here
/// allocates per flush.
#[derive(Debug, Default)]
struct Confirms {
    /// (slot, position) written in the current batch.
    batch: Vec<(u32, Position)>,
    /// Written and not covered by a ping yet.
    dirty: Vec<(u32, Position)>,
    /// The number of the ping in flight, and what its pong confirms.
    in_flight: Option<u64>,
    covered: Vec<(u32, Position)>,
    /// Whether the channels `covered` names know a ping waits for its pong.
    marked: bool,
    next_ping: u64,
    last_ping: Option<Instant>,
    pinged: bool,
    ponged: bool,
    last_advance: Option<Instant>,
}

impl Confirms {
    fn note(list: &mut Vec<(u32, Position)>, slot: u32, at: Position) {
        match list.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, p)) => *p = (*p).max(at),
            None => list.push((slot, at)),
        }
    }

    /// When the next ping is due: frames are not covered, none is in flight, and the last one
    /// went out at least `PING_EVERY` ago (now if none did).
    fn ping_at(&self) -> Option<Instant> {
        if self.dirty.is_empty() || self.in_flight.is_some() {
            return None;
        }
        Some(
            self.last_ping
                .map_or_else(Instant::now, |at| at + PING_EVERY),
        )
    }

    /// Takes the batch's positions in, and gives the ping that covers what was written if one
    /// is due now.
    fn ping(&mut self) -> Option<Message> {
        for &(slot, at) in &self.batch {
            Confirms::note(&mut self.dirty, slot, at);
        }
        if self.dirty.is_empty() || self.in_flight.is_some() {
            return None;
        }
        let now = Instant::now();
        if self.last_ping.is_some_and(|at| now < at + PING_EVERY) {
            return None;
        }
        self.next_ping += 1;
        self.pinged = true;
        self.marked = false;
        self.last_ping = Some(now);
        self.in_flight = Some(self.next_ping);
        std::mem::swap(&mut self.covered, &mut self.dirty);
        self.dirty.clear();
        Some(Message::Ping(bytes::Bytes::copy_from_slice(
            &self.next_ping.to_be_bytes(),
        )))
    }

    /// A pong: what its ping covered is confirmed.
    fn pong(&mut self, data: &[u8], channels: &Channels) {
        if self.in_flight.is_none_or(|n| data != n.to_be_bytes()) {
            return;
        }
        self.in_flight = None;
        self.ponged = true;
        for (slot, at) in self.covered.drain(..) {
            if let Some(cursor) = channels.cursor(slot) {
                cursor.confirm(at);
            }
        }
    }
}

/// Records what a batch wrote, and marks the channels its ping covers.
fn record_written(store: &Store, channels: &Channels, confirms: &mut Confirms) {
    for (slot, at) in &confirms.batch {
        if let Some(cursor) = channels.cursor(*slot) {
            store.written(cursor, *at);
        }
    }
    mark_pinged(channels, confirms);
}

/// The channels the ping in flight covers wait for its pong since now (once per ping).
fn mark_pinged(channels: &Channels, confirms: &mut Confirms) {
    if confirms.in_flight.is_none() || confirms.marked {
        return;
    }
    confirms.marked = true;
    let now = crate::resume::now_ms();
    for (slot, _) in &confirms.covered {
        if let Some(cursor) = channels.cursor(*slot) {
            cursor.pinged(now);
        }
    }
}

/// An idle socket: nothing queued, every change frame written confirmed. Its live channels
/// have handled everything the router finished, so their positions move up to it (at most once
/// a second), and a parked one would not hold WAL it does not need.
fn advance_idle(store: &Store, rx: &OutboxReceiver, channels: &Channels, confirms: &mut Confirms) {
    if confirms.in_flight.is_some()
        || !confirms.dirty.is_empty()
        || channels.cursors().next().is_none()
    {
        return;
    }
    if confirms
        .last_advance
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return;
    }
    // Read before looking at the queue: every frame of what was routed up to here was queued
    // before it was published.
    let routed = store.routed();
    if !rx.is_empty() {
        return;
    }
    confirms.last_advance = Some(Instant::now());
    for cursor in channels.cursors() {
        store.advance(cursor, Position::whole(routed));
    }
}

async fn run<S>(
    shared: &Shared,
    mut ws: S,
    mut rx: OutboxReceiver,
    kill: &CancellationToken,
    channels: &mut Channels,
    confirms: &mut Confirms,
) -> CloseKind
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let store = shared.postgres.as_ref().and_then(|pg| pg.resume.clone());
    let idle = shared.config.idle_timeout();
    let mut idle_deadline = pin!(tokio::time::sleep(idle));
    // One timer for the next ping, reset only when its deadline changes.
    let mut ping_timer = pin!(tokio::time::sleep_until(far_future()));
    let mut ping_armed: Option<Instant> = None;
    let kind = loop {
        let expiry = channels.next_deadline();
        let ping_at = confirms.ping_at();
        if let Some(at) = ping_at
            && ping_armed != Some(at)
        {
            ping_timer.as_mut().reset(at);
            ping_armed = Some(at);
        }
        tokio::select! {
            biased;
            () = kill.cancelled() => break match rx.close_reason() {
                CloseReason::SlowConsumer => CloseKind::SlowConsumer,
                CloseReason::Replaced => CloseKind::Replaced,
                CloseReason::Shutdown | CloseReason::None => CloseKind::Shutdown,
            },
            frame = rx.recv() => {
                let Some(frame) = frame else { break CloseKind::Error };
                let written = tokio::select! {
                    r = write_batch(&mut ws, &mut rx, frame, &shared.metrics, confirms) => r,
                    () = kill.cancelled() => continue,
                };
                if written.is_err() {
                    break CloseKind::Error;
                }
                if let Some(store) = &store {
                    record_written(store, channels, confirms);
                    advance_idle(store, &rx, channels, confirms);
                }
                confirms.batch.clear();
            }
            (topic, step) = std::future::poll_fn(|cx| channels.poll_work(cx)), if channels.has_work() => {
                channels.finish_job(topic, step);
            }
            message = ws.next(), if !channels.backlogged() => {
                if let Some(Ok(Message::Pong(data))) = &message {
                    // A pong is not a heartbeat: it does not keep an idle socket open.
                    confirms.pong(data, channels);
                    continue;
                }
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
            // Frames written while a ping was in flight, and no frame to carry the next ping.
            () = &mut ping_timer, if ping_at.is_some() => {
                ping_armed = None;
                if let Some(ping) = confirms.ping() {
                    if ws.send(ping).await.is_err() {
                        break CloseKind::Error;
                    }
                    mark_pinged(channels, confirms);
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
        CloseKind::Replaced => Some((
            CloseCode::Normal,
            "replaced by a new connection of the client",
        )),
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
    confirms: &mut Confirms,
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
            Frame::Change(t, mark) => {
                let at = Position {
                    lsn: mark.lsn,
                    index: mark.index,
                };
                Confirms::note(&mut confirms.batch, mark.slot, at);
                Message::Text(t)
            }
        })
        .await?;
        next = if frames < WRITE_BATCH {
            rx.try_recv()
        } else {
            None
        };
    }
    // The ping goes in the same flush as the frames it covers.
    if !confirms.batch.is_empty()
        && let Some(ping) = confirms.ping()
    {
        ws.feed(ping).await?;
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
