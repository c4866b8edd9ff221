//! The listener: slot and publication checks, the replication loop, delivery, acknowledgements, lag.
//!
//! # Delivery and acknowledgement rules
//!
//! - Transactions go to the consumer in commit order, through a channel bounded in count
//!   (`queue_capacity`) and in bytes (`queue_max_bytes`: what the consumer holds until it drops
//!   them). A large transaction goes in parts as it is decoded (`chunk_max_changes`,
//!   `chunk_max_bytes`), so it is streamed through, never held whole. When the channel or the budget
//!   is full the listener stops reading the socket (Postgres keeps the WAL); nothing is dropped.
//!   While blocked it still sends status updates, so the walsender does not time it out.
//! - The consumer calls [`AckHandle::ack`] with a transaction's `commit_lsn` once it has handed the
//!   transaction on (for a transaction in parts: its last part). Acks are cumulative: acking a commit LSN acknowledges every transaction before it.
//! - The flush position reported to Postgres is the `end_lsn` of the newest acknowledged transaction,
//!   never more, and it never goes backwards. (The commit record's *end* is reported because logical
//!   decoding skips a transaction on restart only if its commit LSN is below the confirmed position.)
//! - When every delivered transaction is acknowledged and none is being received, the flush position
//!   may move up to the position of the last keepalive: WAL before it holds nothing for us, and
//!   confirming it lets Postgres recycle WAL on a quiet database.
//! - Status updates go out every [`crate::ListenerConfig::status_interval`], at once when a keepalive asks
//!   for a reply, and once more on shutdown.
//! - After any restart — this process, Postgres, or the connection — streaming starts at the slot's
//!   confirmed position (`START_REPLICATION ... 0/0`). Unacknowledged transactions arrive again with
//!   the same `commit_lsn`; a consumer that remembers the last LSN it handled can drop them.
//! - Non-transactional logical messages are delivered as one-change transactions with `xid` 0 and
//!   `commit_lsn` = `end_lsn` = the message's LSN.
//!
//! # Operational notes
//!
//! - Only changes committed after the slot exists are streamed. [`LagHandle::is_streaming`] turns
//!   true once `START_REPLICATION` has succeeded; use it as the readiness signal.
//! - Postgres persists a slot's confirmed position at checkpoints. After a Postgres crash, or a
//!   restart whose shutdown checkpoint came before the last status update, transactions the consumer
//!   had acknowledged can come again (same LSN). At-least-once, as promised; dedupe by `commit_lsn`.
//! - A fast shutdown of Postgres waits until the walsender's client has confirmed everything sent, so
//!   a consumer that stops acknowledging also holds up a Postgres shutdown.
//! - A consumer after throughput should take transactions with `Receiver::recv_many`: one wake-up
//!   for everything queued rather than one per transaction.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Error;
use crate::catalog::{self, PgType};
use crate::change::{Budget, BudgetPool, Change, Column, Relation, Transaction};
use crate::config::ListenerConfig;
use crate::lsn::Lsn;
use crate::pgoutput::{self, PgOutputMessage, PgTimestamp};
use crate::replication::{self, ReplicationConn};

/// State shared between the listener task, ack handles and lag handles.
#[derive(Debug, Default)]
struct Shared {
    /// Highest commit LSN the consumer acknowledged.
    acked: AtomicU64,
    /// Flush position last reported to Postgres.
    flushed: AtomicU64,
    /// Highest WAL position known on the server (keepalives, periodic `pg_current_wal_lsn()`).
    server_lsn: AtomicU64,
    /// Commit time (µs since 2000) of the oldest delivered, unacknowledged transaction; `i64::MIN` if none.
    oldest_unacked: AtomicI64,
    /// A session is past `START_REPLICATION`.
    streaming: AtomicBool,
    /// Times the slot was lost (invalidated, or dropped after it had been streamed) and
    /// recreated: each is a gap in the stream.
    gaps: AtomicU64,
    /// Why the last gap happened: `slot_invalidated` or `slot_dropped`.
    gap_reason: std::sync::Mutex<&'static str>,
    /// WAL the slot keeps (server position minus `restart_lsn`), and its `wal_status` as the
    /// index of [`WAL_STATUSES`] (or `u64::MAX` when unknown).
    retained_bytes: AtomicU64,
    wal_status: AtomicU64,
    /// The consumer asked to stream again from the slot's confirmed position.
    restream: AtomicBool,
    restream_asked: tokio::sync::Notify,
}

/// The values of `pg_replication_slots.wal_status`.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Acknowledges transactions; cheap to clone and safe to call from any task.
#[derive(Debug, Clone)]
pub struct AckHandle(Arc<Shared>);

impl AckHandle {
    /// Acknowledges every delivered transaction with `commit_lsn` at or below this one. Going
    /// backwards is ignored.
    pub fn ack(&self, commit_lsn: Lsn) {
        self.0.acked.fetch_max(commit_lsn.0, Ordering::AcqRel);
    }

    /// The highest acknowledged commit LSN.
    pub fn acked(&self) -> Lsn {
        Lsn(self.0.acked.load(Ordering::Acquire))
    }

    /// Ends the current session and streams again from the slot's confirmed position: every
    /// transaction after the last acknowledged one comes again, in order, with the same
    /// `commit_lsn` and cut into the same parts. Transactions already queued stay queued, so
    /// the consumer sees the positions go back where the new session starts.
    pub fn restream(&self) {
        self.0.restream.store(true, Ordering::Release);
        self.0.restream_asked.notify_one();
    }
}

/// How far behind the consumer is, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Server WAL position minus the flush position confirmed to Postgres.
    pub bytes: u64,
    /// Age of the oldest delivered but unacknowledged transaction's commit; 0 when none.
    pub seconds: f64,
    /// Flush position confirmed to Postgres.
    pub flushed: Lsn,
    /// Newest server WAL position seen.
    pub server: Lsn,
}

/// Reads [`Lag`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct LagHandle(Arc<Shared>);

impl LagHandle {
    /// Whether the listener is streaming now (past `START_REPLICATION`, connection up). Changes
    /// committed after this turned true are certain to be delivered; use it for readiness checks.
    pub fn is_streaming(&self) -> bool {
        self.0.streaming.load(Ordering::Acquire)
    }

    /// Gaps in the stream so far: the slot was lost and recreated, so changes committed before
    /// were never streamed. With the reason of the last one.
    pub fn gaps(&self) -> (u64, &'static str) {
        let reason = *self.0.gap_reason.lock().unwrap_or_else(|p| p.into_inner());
        (self.0.gaps.load(Ordering::Acquire), reason)
    }

    /// WAL the slot retains in bytes, and its `wal_status`, as last read (every 5 s while
    /// streaming).
    pub fn retained(&self) -> (u64, Option<&'static str>) {
        let status = self.0.wal_status.load(Ordering::Acquire);
        (
            self.0.retained_bytes.load(Ordering::Acquire),
            WAL_STATUSES.get(status as usize).copied(),
        )
    }

    pub fn lag(&self) -> Lag {
        let flushed = self.0.flushed.load(Ordering::Acquire);
        let server = self.0.server_lsn.load(Ordering::Acquire);
        let oldest = self.0.oldest_unacked.load(Ordering::Acquire);
        let seconds = if oldest == i64::MIN {
            0.0
        } else {
            (PgTimestamp::now().0 - oldest).max(0) as f64 / 1e6
        };
        Lag {
            bytes: server.saturating_sub(flushed),
            seconds,
            flushed: Lsn(flushed),
            server: Lsn(server),
        }
    }
}

/// A durable logical-replication listener. See the module docs for the delivery contract.
pub struct Listener {
    config: ListenerConfig,
    out: mpsc::Sender<Transaction>,
    shared: Arc<Shared>,
    /// Bytes held by transactions handed to the consumer.
    budget: Arc<BudgetPool>,
    types: HashMap<u32, Arc<PgType>>,
    /// This listener has streamed from the slot: a missing slot now means it was dropped.
    streamed_before: bool,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("slot", &self.config.slot)
            .field("publication", &self.config.publication)
            .finish_non_exhaustive()
    }
}

/// Why a streaming session ended without an error.
enum SessionEnd {
    Shutdown,
    /// The consumer asked for the stream again ([`AckHandle::restream`]).
    Restream,
}

impl Listener {
    /// Creates a listener and the receiving end of its transaction queue. Nothing connects until
    /// [`Listener::run`].
    pub fn new(config: ListenerConfig) -> (Listener, mpsc::Receiver<Transaction>) {
        let (out, rx) = mpsc::channel(config.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            oldest_unacked: AtomicI64::new(i64::MIN),
            wal_status: AtomicU64::new(u64::MAX),
            ..Shared::default()
        });
        (
            Listener {
                config,
                out,
                shared,
                budget: Arc::default(),
                types: HashMap::new(),
                streamed_before: false,
            },
            rx,
        )
    }

    pub fn ack_handle(&self) -> AckHandle {
        AckHandle(self.shared.clone())
    }

    pub fn lag_handle(&self) -> LagHandle {
        LagHandle(self.shared.clone())
    }

    /// Streams until `shutdown` is cancelled (returns `Ok`) or a non-retryable error occurs.
    /// Retryable errors (connection lost, server restart, slot busy) reconnect with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut backoff = self.config.backoff_initial;
        let mut busy_since: Option<Instant> = None;
        loop {
            let mut streamed = false;
            let result = self.session(&shutdown, &mut streamed).await;
            match result {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Restream) => {
                    info!(slot = %self.config.slot, "streaming again from the slot's confirmed position");
                    backoff = self.config.backoff_initial;
                }
                Err(Error::ConsumerGone) if shutdown.is_cancelled() => return Ok(()),
                Err(e) if e.is_retryable() => {
                    if streamed {
                        backoff = self.config.backoff_initial;
                    }
                    if let Error::SlotActive { .. } = e {
                        let since = *busy_since.get_or_insert_with(Instant::now);
                        if let Some(limit) = self.config.slot_busy_timeout
                            && since.elapsed() >= limit
                        {
                            return Err(e);
                        }
                        info!(slot = %self.config.slot, error = %e, retry_in = ?backoff, "slot busy, waiting");
                    } else {
                        busy_since = None;
                        warn!(slot = %self.config.slot, error = %e, retry_in = ?backoff, "replication interrupted, reconnecting");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn session(
        &mut self,
        shutdown: &CancellationToken,
        streamed: &mut bool,
    ) -> Result<SessionEnd, Error> {
        let cfg = self.config.clone();
        let (slot, publication, user) = (&cfg.slot, &cfg.publication, &cfg.connect.user);
        let map_err = |e: Error| match e {
            Error::Server(s) => Error::from_server(s, slot, publication, user),
            Error::Admin(e) => match e.as_db_error() {
                Some(db) => Error::from_server(db.into(), slot, publication, user),
                None => Error::Admin(e),
            },
            other => other,
        };
        let admin = catalog::connect(&cfg.connect).await.map_err(map_err)?;
        let mut gap = None;
        let state = match catalog::preflight(&admin, user, slot, publication).await {
            Err(Error::SlotInvalidated { .. }) if cfg.recreate_lost_slot => {
                warn!(slot = %slot, "replication slot invalidated by Postgres: recreating it; changes since it was lost are gone");
                admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                    .await
                    .map_err(|e| map_err(Error::Admin(e)))?;
                gap = Some("slot_invalidated");
                None
            }
            other => other.map_err(map_err)?,
        };
        if state.is_none() && gap.is_none() && self.streamed_before {
            warn!(slot = %slot, "replication slot disappeared: recreating it; changes since it was dropped are gone");
            gap = Some("slot_dropped");
        }
        for extra in &cfg.additional_publications {
            catalog::check_publication(&admin, extra).await?;
        }
        let mut conn = ReplicationConn::connect(&cfg.connect)
            .await
            .map_err(map_err)?;
        if state.is_none() {
            let sql = format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                replication::quote_ident(slot)
            );
            match conn.simple_query(&sql).await {
                Ok(_) => info!(slot = %slot, "created replication slot"),
                // Created concurrently by someone else: use it.
                Err(Error::Server(e)) if e.code == "42710" => {}
                Err(e) => return Err(map_err(e)),
            }
            if let Some(reason) = gap {
                *self
                    .shared
                    .gap_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = reason;
                self.shared.gaps.fetch_add(1, Ordering::AcqRel);
            }
        }
        let mut options = format!(
            "proto_version '1', publication_names {}",
            replication::quote_literal(
                &std::iter::once(publication)
                    .chain(&cfg.additional_publications)
                    .map(|p| replication::quote_ident(p))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        );
        if cfg.messages {
            options.push_str(", messages 'true'");
        }
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 ({options})",
            replication::quote_ident(slot)
        );
        // This session starts from the slot's confirmed position: a restream asked for until
        // now is this one.
        self.shared.restream.store(false, Ordering::Release);
        conn.start_replication(&sql).await.map_err(map_err)?;
        *streamed = true;
        self.streamed_before = true;
        info!(slot = %slot, publication = %publication, "streaming");

        // Keep the server's WAL position fresh for the lag metric.
        let admin = Arc::new(admin);
        let poller = tokio::spawn(poll_server_lsn(
            admin.clone(),
            self.shared.clone(),
            slot.clone(),
        ));
        self.shared.streaming.store(true, Ordering::Release);
        let result = self
            .stream(&mut conn, &admin, shutdown)
            .await
            .map_err(map_err);
        self.shared.streaming.store(false, Ordering::Release);
        poller.abort();
        if matches!(result, Ok(SessionEnd::Shutdown | SessionEnd::Restream)) {
            conn.close().await;
        }
        if matches!(result, Ok(SessionEnd::Restream)) {
            // The walsender holds the slot until it exits: wait for that, briefly, so the next
            // session does not start with "slot active".
            wait_slot_released(&admin, slot).await;
        }
        result
    }

    async fn stream(
        &mut self,
        conn: &mut ReplicationConn,
        admin: &tokio_postgres::Client,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, Error> {
        let mut st = StreamState {
            relations: HashMap::new(),
            current: None,
            current_bytes: 0,
            current_chunk: 0,
            inflight: VecDeque::new(),
            received: Lsn(self.shared.flushed.load(Ordering::Acquire)),
            keepalive_pos: Lsn::ZERO,
            next_status: Instant::now() + self.config.status_interval,
        };
        // One cancellation future and one timer for the whole session, not one per read.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let status_timer = tokio::time::sleep_until(st.next_status);
        tokio::pin!(status_timer);
        loop {
            if self.shared.restream.swap(false, Ordering::AcqRel) {
                self.send_status(conn, &mut st, false).await?;
                return Ok(SessionEnd::Restream);
            }
            // Messages already buffered are handled without going through `select!`: a read brings
            // many of them, and the per-message cost is what limits small transactions.
            let frame = match conn.try_frame()? {
                Some(frame) => {
                    if Instant::now() >= st.next_status {
                        self.send_status(conn, &mut st, false).await?;
                    }
                    frame
                }
                None => {
                    if status_timer.deadline() != st.next_status {
                        status_timer.as_mut().reset(st.next_status);
                    }
                    tokio::select! {
                        biased;
                        _ = &mut cancelled => {
                            self.send_status(conn, &mut st, false).await?;
                            return Ok(SessionEnd::Shutdown);
                        }
                        _ = &mut status_timer => {
                            self.send_status(conn, &mut st, false).await?;
                            continue;
                        }
                        () = self.shared.restream_asked.notified() => continue,
                        frame = conn.read_frame() => frame?,
                    }
                }
            };
            match frame.tag {
                b'd' => {
                    let mut body = frame.body;
                    match body.first() {
                        Some(b'w') if body.len() >= 25 => {
                            body.advance(1);
                            let start = Lsn(body.get_u64());
                            let _wal_end = body.get_u64();
                            let _send_time = body.get_i64();
                            st.received = st.received.max(start);
                            // Only changes count towards a part's size, so that a transaction is cut
                            // at the same places whenever it is streamed (relation messages come
                            // again in a new session).
                            if matches!(body.first(), Some(b'I' | b'U' | b'D' | b'T' | b'M')) {
                                st.current_bytes += body.len();
                            }
                            let msg = pgoutput::decode(body)?;
                            let ready = match self.apply(&mut st, admin, msg).await? {
                                Some(tx) => Some(tx),
                                None => self.take_part(&mut st),
                            };
                            if let Some(tx) = ready
                                && let Some(end) = self.deliver(conn, &mut st, tx, shutdown).await?
                            {
                                return Ok(end);
                            }
                        }
                        Some(b'k') if body.len() >= 18 => {
                            body.advance(1);
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            let reply = body.get_u8() != 0;
                            st.received = st.received.max(wal_end);
                            st.keepalive_pos = st.keepalive_pos.max(wal_end);
                            self.shared
                                .server_lsn
                                .fetch_max(wal_end.0, Ordering::AcqRel);
                            if reply {
                                self.send_status(conn, &mut st, false).await?;
                            }
                        }
                        _ => {
                            return Err(Error::Protocol(format!(
                                "malformed CopyData of {} bytes",
                                body.len()
                            )));
                        }
                    }
                }
                b'E' => return Err(Error::Server(replication::parse_error(&frame.body))),
                // CopyDone, or CommandComplete which a walsender sends alone when the server
                // shuts down after streaming everything: reconnect.
                b'c' | b'C' | b'Z' => return Err(Error::StreamEnded),
                b'N' => {
                    let n = replication::parse_error(&frame.body);
                    debug!(code = %n.code, message = %n.message, "server notice");
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected message {:?} while streaming",
                        other as char
                    )));
                }
            }
        }
    }

    /// Folds one pgoutput message into the current transaction; returns a finished transaction.
    async fn apply(
        &mut self,
        st: &mut StreamState,
        admin: &tokio_postgres::Client,
        msg: PgOutputMessage,
    ) -> Result<Option<Transaction>, Error> {
        let relation = |st: &StreamState, id: u32| {
            st.relations
                .get(&id)
                .cloned()
                .ok_or_else(|| Error::Protocol(format!("change for unknown relation {id}")))
        };
        fn current(st: &mut StreamState) -> Result<&mut Vec<Change>, Error> {
            st.current
                .as_mut()
                .map(|t| &mut t.changes)
                .ok_or_else(|| Error::Protocol("change outside a transaction".into()))
        }
        match msg {
            PgOutputMessage::Begin(b) => {
                if st.current.is_some() {
                    return Err(Error::Protocol("BEGIN inside a transaction".into()));
                }
                st.current = Some(Transaction {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    end_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                    origin: None,
                    changes: Vec::new(),
                    chunk: 0,
                    last: false,
                    budget: Budget::default(),
                });
                st.current_chunk = 0;
                st.current_bytes = 0;
            }
            PgOutputMessage::Commit(c) => {
                let mut tx = st
                    .current
                    .take()
                    .ok_or_else(|| Error::Protocol("COMMIT outside a transaction".into()))?;
                tx.commit_lsn = c.commit_lsn;
                tx.end_lsn = c.end_lsn;
                tx.commit_time = c.commit_time;
                tx.chunk = st.current_chunk;
                tx.last = true;
                return Ok(Some(tx));
            }
            PgOutputMessage::Origin(o) => {
                if let Some(tx) = st.current.as_mut() {
                    tx.origin = Some(o.name);
                }
            }
            PgOutputMessage::Relation(r) => {
                let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
                catalog::resolve_types(admin, &mut self.types, &oids).await?;
                let columns = r
                    .columns
                    .into_iter()
                    .map(|c| Column {
                        pg_type: self.types.get(&c.type_oid).cloned().unwrap_or_else(|| {
                            Arc::new(PgType {
                                oid: c.type_oid,
                                name: c.type_oid.to_string(),
                                kind: crate::value::ValueKind::Text,
                                delimiter: b',',
                            })
                        }),
                        name: c.name,
                        is_key: c.is_key,
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                    })
                    .collect();
                st.relations.insert(
                    r.id,
                    Arc::new(Relation {
                        id: r.id,
                        schema: r.namespace,
                        table: r.name,
                        replica_identity: r.replica_identity,
                        columns,
                    }),
                );
            }
            // Types are resolved from the catalog when a relation uses them.
            PgOutputMessage::Type(_) => {}
            PgOutputMessage::Insert(i) => {
                let relation = relation(st, i.relation_id)?;
                current(st)?.push(Change::Insert {
                    relation,
                    new: i.new,
                });
            }
            PgOutputMessage::Update(u) => {
                let relation = relation(st, u.relation_id)?;
                current(st)?.push(Change::Update {
                    relation,
                    old: u.old,
                    new: u.new,
                });
            }
            PgOutputMessage::Delete(d) => {
                let relation = relation(st, d.relation_id)?;
                current(st)?.push(Change::Delete {
                    relation,
                    old: d.old,
                });
            }
            PgOutputMessage::Truncate(t) => {
                let relations = t
                    .relation_ids
                    .iter()
                    .map(|id| relation(st, *id))
                    .collect::<Result<Vec<_>, _>>()?;
                current(st)?.push(Change::Truncate {
                    relations,
                    cascade: t.cascade,
                    restart_identity: t.restart_identity,
                });
            }
            PgOutputMessage::Message(m) => {
                let change = Change::Message {
                    transactional: m.transactional,
                    prefix: m.prefix,
                    content: m.content,
                };
                match st.current.as_mut() {
                    Some(tx) if m.transactional => tx.changes.push(change),
                    _ => {
                        return Ok(Some(Transaction {
                            xid: 0,
                            commit_lsn: m.lsn,
                            end_lsn: m.lsn,
                            commit_time: PgTimestamp::now(),
                            origin: None,
                            changes: vec![change],
                            chunk: 0,
                            last: true,
                            budget: Budget::default(),
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// A part of the transaction being received, when it has grown past the chunk limits: its
    /// changes so far, handed on before the commit arrives.
    fn take_part(&self, st: &mut StreamState) -> Option<Transaction> {
        let tx = st.current.as_mut()?;
        if tx.changes.len() < self.config.chunk_max_changes.max(1)
            && st.current_bytes < self.config.chunk_max_bytes
        {
            return None;
        }
        let part = Transaction {
            xid: tx.xid,
            commit_lsn: tx.commit_lsn,
            end_lsn: tx.commit_lsn,
            commit_time: tx.commit_time,
            origin: tx.origin.clone(),
            changes: std::mem::take(&mut tx.changes),
            chunk: st.current_chunk,
            last: false,
            budget: Budget::default(),
        };
        st.current_chunk += 1;
        Some(part)
    }

    /// Hands a transaction (or a part) to the consumer, waiting for room in the queue and in the
    /// byte budget; keeps status updates flowing meanwhile.
    async fn deliver(
        &mut self,
        conn: &mut ReplicationConn,
        st: &mut StreamState,
        tx: Transaction,
        shutdown: &CancellationToken,
    ) -> Result<Option<SessionEnd>, Error> {
        let mut tx = tx;
        let bytes = std::mem::take(&mut st.current_bytes);
        // The byte budget: wait until the consumer dropped enough of what it holds (a part
        // larger than the whole budget goes on alone).
        loop {
            let used = self.budget.used.load(Ordering::Acquire);
            if used == 0 || used + bytes <= self.config.queue_max_bytes {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.send_status(conn, st, false).await?;
                    return Ok(Some(SessionEnd::Shutdown));
                }
                () = self.budget.released.notified() => {}
                _ = tokio::time::sleep_until(st.next_status) => {
                    self.send_status(conn, st, false).await?;
                }
            }
        }
        tx.budget = Budget::take(&self.budget, bytes);
        // Fast path: room in the queue, no waiting, no timer or cancellation future to set up.
        let permit = match self.out.try_reserve() {
            Ok(permit) => Some(permit),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(Error::ConsumerGone),
            Err(mpsc::error::TrySendError::Full(())) => None,
        };
        let permit = if let Some(permit) = permit {
            permit
        } else {
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        self.send_status(conn, st, false).await?;
                        return Ok(Some(SessionEnd::Shutdown));
                    }
                    permit = self.out.reserve() => break permit.map_err(|_| Error::ConsumerGone)?,
                    _ = tokio::time::sleep_until(st.next_status) => {
                        self.send_status(conn, st, false).await?;
                    }
                }
            }
        };
        if st.inflight.is_empty() && tx.chunk == 0 {
            self.shared
                .oldest_unacked
                .store(tx.commit_time.0, Ordering::Release);
        }
        // Parts before the last are not acknowledged on their own: the commit is.
        if tx.last {
            st.inflight
                .push_back((tx.commit_lsn, tx.end_lsn, tx.commit_time));
            st.received = st.received.max(tx.end_lsn);
        }
        permit.send(tx);
        Ok(None)
    }

    /// Moves the flush position as far as the acknowledgements allow and sends a status update.
    async fn send_status(
        &self,
        conn: &mut ReplicationConn,
        st: &mut StreamState,
        reply: bool,
    ) -> Result<(), Error> {
        let acked = Lsn(self.shared.acked.load(Ordering::Acquire));
        let mut flush = Lsn(self.shared.flushed.load(Ordering::Acquire));
        while let Some(&(commit, end, _)) = st.inflight.front() {
            if commit > acked {
                break;
            }
            flush = flush.max(end);
            st.inflight.pop_front();
        }
        match st.inflight.front() {
            Some(&(_, _, time)) => self.shared.oldest_unacked.store(time.0, Ordering::Release),
            None => {
                self.shared
                    .oldest_unacked
                    .store(i64::MIN, Ordering::Release);
                if st.current.is_none() {
                    flush = flush.max(st.keepalive_pos);
                }
            }
        }
        self.shared.flushed.fetch_max(flush.0, Ordering::AcqRel);
        let flush = Lsn(self.shared.flushed.load(Ordering::Acquire));
        let write = st.received.max(flush);
        let mut buf = BytesMut::with_capacity(34);
        buf.put_u8(b'r');
        buf.put_u64(write.0);
        buf.put_u64(flush.0);
        buf.put_u64(flush.0);
        buf.put_i64(PgTimestamp::now().0);
        buf.put_u8(u8::from(reply));
        conn.queue_copy_data(&buf);
        conn.flush().await?;
        st.next_status = Instant::now() + self.config.status_interval;
        debug!(slot = %self.config.slot, %write, %flush, "status update");
        Ok(())
    }
}

struct StreamState {
    relations: HashMap<u32, Arc<Relation>>,
    current: Option<Transaction>,
    /// Bytes of pgoutput messages received since the last part was handed on.
    current_bytes: usize,
    /// The number of the next part of the current transaction.
    current_chunk: u32,
    /// Delivered, unacknowledged transactions: (commit LSN, end LSN, commit time), in commit order.
    inflight: VecDeque<(Lsn, Lsn, PgTimestamp)>,
    /// Highest WAL position received.
    received: Lsn,
    /// Position of the last keepalive.
    keepalive_pos: Lsn,
    /// When the next status update is due.
    next_status: Instant,
}

/// Waits, at most 2 s, until no walsender holds `slot`.
async fn wait_slot_released(admin: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match admin
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(Some(row)) if row.get::<_, bool>(0) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return,
        }
    }
}

async fn poll_server_lsn(admin: Arc<tokio_postgres::Client>, shared: Arc<Shared>, slot: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        match admin
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                        (SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1), \
                        (SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await
        {
            Ok(row) => {
                if let Ok(lsn) = row.get::<_, String>(0).parse::<Lsn>() {
                    shared.server_lsn.fetch_max(lsn.0, Ordering::AcqRel);
                }
                let retained: Option<i64> = row.get(1);
                shared
                    .retained_bytes
                    .store(retained.unwrap_or(0).max(0) as u64, Ordering::Release);
                let status: Option<String> = row.get(2);
                let index = status
                    .and_then(|s| WAL_STATUSES.iter().position(|w| *w == s))
                    .map_or(u64::MAX, |i| i as u64);
                shared.wal_status.store(index, Ordering::Release);
            }
            Err(_) => return,
        }
    }
}
