//! Postgres Changes and broadcasts from the database: committed transactions from the change
//! source, matched against the channels' subscriptions, checked for visibility, and delivered
//! to this node's sockets.
//!
//! - `source`: [`source::ChangeSource`], the seam transactions come in through, and the local
//!   WAL listener's [`source::WalSource`].
//! - `subscription`: join-time parsing and catalog checks of `postgres_changes` entries.
//! - `index`: table → subscriptions.
//! - `filter`: the filter syntax and its evaluation.
//! - `route`: the batch path from transactions to outboxes.
//! - `payload`: the `postgres_changes` message.
//! - `visibility`: batched RLS checks; `policy`: row policies evaluated in process, the fast
//!   path of those checks.
//! - `database_broadcast`: inserts into `realtime.messages` as broadcasts.
//! - `replay`: which changes are live and which a replay for resuming channels
//!   (`crate::resume` keeps the positions).
//!
//! Delivery: the router task takes what is queued (a batch), routes it, and reports the batch's
//! last commit LSN as delivered once every frame is in the sockets' outboxes. Outbox pushes never
//! wait (slow sockets are closed, see `outbox`), so a slow client never stalls the stream.

pub(crate) mod database_broadcast;
pub mod deletes;
pub(crate) mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod index;
pub(crate) mod payload;
pub mod policy;
pub(crate) mod replay;
pub(crate) mod route;
pub(crate) mod source;
pub(crate) mod subscription;
pub(crate) mod visibility;

use crate::auth::Claims;
use crate::db::{Database, DbError, janitor, migrations};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::resume::{self, Claim, Cursor, Identity, Store};
use crate::topics::{Member, Registry};
use index::{Index, Subscription};
use realtime_wal_listener::{ConnectConfig, LagHandle, Listener, ListenerConfig};
use source::{ChangeSource, WalSource};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use subscription::SubscribeError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use visibility::Viewer;

/// Transactions routed together at most.
const MAX_BATCH: usize = 256;

/// How long the router gathers resuming channels before it asks for the stream again.
const RESTREAM_GATHER: Duration = Duration::from_millis(50);

/// The Postgres side of the gateway.
#[derive(Debug)]
pub(crate) struct PostgresChanges {
    pub(crate) db: Arc<Database>,
    pub(crate) index: Index,
    pub(crate) lag: LagHandle,
    /// Whether the stream is live: one signal every waiting join shares.
    live: tokio::sync::watch::Receiver<bool>,
    /// Why the stream stopped for good, once it has.
    halted: std::sync::Mutex<Option<String>>,
    /// Since when the stream has not been live (`None` while it is).
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
    pub(crate) publication: String,
    pub(crate) max_record_bytes: usize,
    pub(crate) slow_consumer: Duration,
    /// Rows of RLS tables as last seen, for DELETEs with the key only.
    pub(crate) deletes: deletes::RowMemory,
    pub(crate) delete_unknown: deletes::DeleteUnknown,
    /// Positions of channels, live and parked; `None` when no state file could be opened.
    pub(crate) resume: Option<Arc<Store>>,
    /// Resuming channels, for the router.
    resumers: tokio::sync::mpsc::UnboundedSender<Arc<Cursor>>,
    /// The oldest LSN a channel needs (`u64::MAX`: none): the slot is not confirmed past it.
    hold: AtomicU64,
    /// Parked channels, and the WAL bytes held for channels, as of the last sweep.
    pub(crate) parked: AtomicU64,
    pub(crate) held_bytes: AtomicU64,
}

/// A channel's `postgres_changes` entries resolved for its claims, not yet in the index.
#[derive(Debug)]
pub(crate) struct Resolved {
    viewer: Arc<Viewer>,
    bindings: Vec<subscription::TableBinding>,
}

impl PostgresChanges {
    /// Waits until the change stream is live, at most `timeout`. Every waiter shares one
    /// signal: no query and no timer per waiting channel.
    pub(crate) async fn wait_streaming(&self, timeout: Duration) -> bool {
        let mut live = self.live.clone();
        matches!(
            tokio::time::timeout(timeout, live.wait_for(|live| *live)).await,
            Ok(Ok(_))
        )
    }

    /// Whether changes can progress, for the readiness probe: `Err` with the reason when the
    /// stream stopped for good or has not been live for `grace`. Lag alone is no reason.
    pub(crate) fn readiness(&self, grace: Duration) -> Result<(), String> {
        if let Some(reason) = lock(&self.halted).clone() {
            return Err(format!("change stream halted: {reason}"));
        }
        match *lock(&self.down_since) {
            Some(since) if since.elapsed() >= grace => Err(format!(
                "change stream not live for {} s (database or slot unreachable)",
                since.elapsed().as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// Whether the stream stopped for good.
    pub(crate) fn is_halted(&self) -> bool {
        lock(&self.halted).is_some()
    }

    /// Resolves a channel's entries against the publication and the catalog for its claims.
    /// Errors are the reference's system message texts.
    pub(crate) async fn resolve(
        &self,
        claims: &Claims,
        entries: &[(serde_json::Value, u32)],
    ) -> Result<Resolved, SubscribeError> {
        let unavailable = |e: DbError| SubscribeError::Unavailable(e.to_string());
        let client = self.db.client().await.map_err(unavailable)?;
        let bypass = match subscription::role_bypasses_rls(&client, &claims.role).await {
            Ok(Some(bypass)) => bypass,
            Ok(None) => {
                return Err(SubscribeError::Invalid(format!(
                    "Unable to subscribe to changes with given parameters: role \"{}\" of the JWT does not exist in the database",
                    claims.role
                )));
            }
            Err(e @ DbError::Unavailable(_)) => return Err(unavailable(e)),
            Err(e) => return Err(SubscribeError::Invalid(e.message())),
        };
        let viewer = Arc::new(Viewer::new(claims.role.clone(), &claims.all, bypass));
        let mut bindings = Vec::new();
        for (value, id) in entries {
            let binding = subscription::parse_binding(value, *id)?;
            bindings.extend(
                subscription::resolve(&client, &self.publication, &claims.role, &binding).await?,
            );
        }
        Ok(Resolved { viewer, bindings })
    }

    /// A join with Postgres Changes: its slot in the resume store (a parked channel of the same
    /// identity taken over, or a new one).
    pub(crate) fn claim(&self, id: Identity, outbox: &Outbox) -> Option<Claim> {
        Some(self.resume.as_ref()?.claim(id, outbox))
    }

    /// A resuming channel is in the index: the router decides when its replay starts.
    pub(crate) fn admit(&self, cursor: Arc<Cursor>) {
        let _ = self.resumers.send(cursor);
    }

    /// Puts a channel's resolved subscriptions in the index, replacing what it had, in one
    /// step: a batch sees either the old set or the new one.
    pub(crate) fn register(&self, member: &Arc<Member>, resolved: Resolved) {
        let subs = resolved
            .bindings
            .into_iter()
            .map(|binding| Subscription {
                member: member.clone(),
                shape: payload::Shape::of(&binding),
                binding,
                viewer: resolved.viewer.clone(),
            })
            .collect();
        self.index.replace(member.id, subs);
    }
}

/// Settings of the Postgres side.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) migrate: bool,
    pub(crate) max_record_bytes: usize,
    /// How long a full outbox may pause the stream.
    pub(crate) slow_consumer: Duration,
    pub(crate) delete_memory_bytes: usize,
    pub(crate) delete_unknown: deletes::DeleteUnknown,
    pub(crate) resume_window: Duration,
    pub(crate) resume_max_retained_bytes: u64,
    /// The resume state file; `None`: next to the binary.
    pub(crate) resume_path: Option<PathBuf>,
    pub(crate) resume_slots: u32,
}

/// Why the Postgres side could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(String),
    #[error("{0}")]
    Connect(String),
    #[error(transparent)]
    Migration(#[from] migrations::MigrationError),
    #[error(transparent)]
    Resume(#[from] resume::StoreError),
}

/// Connects, applies the migrations, and starts the listener and the router task.
pub(crate) async fn start(
    settings: &Settings,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<PostgresChanges>, StartError> {
    let connect =
        ConnectConfig::from_url(&settings.url).map_err(|e| StartError::Url(e.to_string()))?;
    let db = Arc::new(Database::new(connect.clone(), 8));
    if settings.migrate {
        let client = db
            .client()
            .await
            .map_err(|e| StartError::Connect(e.to_string()))?;
        migrations::apply(&client).await?;
    }
    let mut listener_config = ListenerConfig::new(connect, settings.slot.clone());
    listener_config.publication = settings.publication.clone();
    listener_config.additional_publications = vec![migrations::MESSAGES_PUBLICATION.to_owned()];
    // A slot Postgres invalidated (past `max_slot_wal_keep_size`) is recreated, and subscribers
    // are told that changes were lost.
    listener_config.recreate_lost_slot = true;
    let store = open_resume(settings, &db).await?;
    let (listener, transactions) = Listener::new(listener_config);
    let source = WalSource {
        transactions,
        ack: listener.ack_handle(),
    };
    let (live_tx, live) = tokio::sync::watch::channel(false);
    let (resumers, resumers_rx) = tokio::sync::mpsc::unbounded_channel();
    let pg = Arc::new(PostgresChanges {
        db: db.clone(),
        index: Index::default(),
        lag: listener.lag_handle(),
        live,
        halted: std::sync::Mutex::new(None),
        down_since: std::sync::Mutex::new(Some(std::time::Instant::now())),
        publication: settings.publication.clone(),
        max_record_bytes: settings.max_record_bytes,
        slow_consumer: settings.slow_consumer,
        deletes: deletes::RowMemory::new(settings.delete_memory_bytes),
        delete_unknown: settings.delete_unknown,
        resume: store,
        resumers,
        hold: AtomicU64::new(u64::MAX),
        parked: AtomicU64::new(0),
        held_bytes: AtomicU64::new(0),
    });
    // The hold of what the last process left parked, before the first acknowledgement.
    sweep(&pg);
    tracker.spawn(sweep_loop(pg.clone(), shutdown.clone()));
    let listener_shutdown = shutdown.clone();
    let listener_pg = pg.clone();
    tracker.spawn(async move {
        match listener.run(listener_shutdown).await {
            Ok(()) => info!("wal listener stopped"),
            Err(e) => {
                error!(error = %e, "wal listener stopped: postgres changes are not delivered");
                *lock(&listener_pg.halted) = Some(e.to_string());
            }
        }
    });
    tracker.spawn(watch_live(pg.clone(), live_tx, shutdown.clone()));
    tracker.spawn(route_loop(
        pg.clone(),
        registry,
        metrics,
        source,
        resumers_rx,
        shutdown.clone(),
    ));
    if settings.migrate {
        tracker.spawn(janitor::run(db, shutdown));
    }
    Ok(pg)
}

/// Opens the resume state file (default: next to the binary, else the temporary directory),
/// and turns parked positions the slot no longer has into gaps.
async fn open_resume(settings: &Settings, db: &Database) -> Result<Option<Arc<Store>>, StartError> {
    let open = |path: PathBuf| {
        resume::Store::open(&resume::Settings {
            path,
            slots: settings.resume_slots,
            window: settings.resume_window,
            max_retained_bytes: settings.resume_max_retained_bytes,
        })
    };
    let file = format!("realtime-resume-{}.state", settings.slot);
    let store = match &settings.resume_path {
        Some(path) => open(path.clone())?,
        None => {
            let beside = std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join(&file)));
            match beside.map(open) {
                Some(Ok(store)) => store,
                other => {
                    if let Some(Err(e)) = other {
                        warn!(error = %e, "resume state not kept next to the binary: using the temporary directory");
                    }
                    match open(std::env::temp_dir().join(&file)) {
                        Ok(store) => store,
                        Err(e) => {
                            warn!(error = %e, "no resume state file: channels cannot resume (set RESUME_STATE_PATH)");
                            return Ok(None);
                        }
                    }
                }
            }
        }
    };
    let client = db
        .client()
        .await
        .map_err(|e| StartError::Connect(e.to_string()))?;
    let query = |e: tokio_postgres::Error| StartError::Connect(e.to_string());
    // (Not on a standby, where there is no current WAL position to compare with.)
    if let Ok(row) = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .await
    {
        store.check_wal(row.get::<_, i64>(0) as u64);
    }
    let confirmed = client
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots \
             WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
            &[&settings.slot],
        )
        .await
        .map_err(query)?
        .map(|r| r.get::<_, i64>(0) as u64);
    store.check_log(confirmed);
    Ok(Some(Arc::new(store)))
}

/// Expires parked channels, enforces the retention cap and computes the hold.
fn sweep(pg: &PostgresChanges) {
    let Some(store) = &pg.resume else {
        return;
    };
    let high = store.routed().max(pg.lag.lag().server.0);
    let sweep = store.sweep(high);
    let hold = sweep.hold.unwrap_or(u64::MAX);
    pg.hold.store(hold, Ordering::Release);
    pg.parked.store(sweep.parked as u64, Ordering::Relaxed);
    pg.held_bytes.store(
        sweep.hold.map_or(0, |h| high.saturating_sub(h)),
        Ordering::Relaxed,
    );
}

/// Every 10 ms the positions sockets wrote go to the state file; every 250 ms the sweep.
async fn sweep_loop(pg: Arc<PostgresChanges>, shutdown: CancellationToken) {
    let Some(store) = pg.resume.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        store.flush();
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(25) {
            sweep(&pg);
        }
    }
    store.flush();
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns the listener's streaming flag into the shared signal joins wait on, keeps the time
/// since the stream was last live, and tells subscribers about gaps.
async fn watch_live(
    pg: Arc<PostgresChanges>,
    live: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told_gaps = pg.lag.gaps().0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = pg.lag.is_streaming();
        live.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        });
        {
            let mut down = lock(&pg.down_since);
            match (now, *down) {
                (true, Some(_)) => *down = None,
                (false, None) => *down = Some(std::time::Instant::now()),
                _ => {}
            }
        }
        let (gaps, reason) = pg.lag.gaps();
        if gaps > told_gaps {
            told_gaps = gaps;
            tell_changes_lost(&pg, reason);
            if let Some(store) = &pg.resume {
                store.positions_lost();
            }
        }
    }
}

/// Tells every channel subscribed to Postgres Changes, with one `system` message, that changes
/// were lost (the slot was recreated), so an app knows to refetch: status `error`, and a message
/// that starts with the machine-readable reason (`ChangesLost: slot_invalidated: …`).
fn tell_changes_lost(pg: &PostgresChanges, reason: &str) {
    let members = pg.index.members();
    warn!(
        reason,
        channels = members.len(),
        "the replication slot was lost and recreated: telling subscribers that changes were lost"
    );
    let message = format!(
        "ChangesLost: {reason}: the replication slot was lost and recreated; changes committed \
         meanwhile were not delivered, refetch"
    );
    for member in members {
        let topic = member.topic();
        let sub_topic = topic.strip_prefix("realtime:").unwrap_or(topic);
        let body = realtime_protocol::payload::system(
            "postgres_changes",
            false,
            &message,
            Some(sub_topic),
        );
        let frame = member.vsn.encode(None, None, topic, "system", &body);
        member.outbox.push(crate::outbox::Frame::text(frame));
    }
}

async fn route_loop(
    pg: Arc<PostgresChanges>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mut source: impl ChangeSource,
    mut resumers: tokio::sync::mpsc::UnboundedReceiver<Arc<Cursor>>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // What is live and what a replay: after a restart, what the last process routed live is a
    // replay (for the channels that resume), the rest is live.
    let mut replay = replay::Replay::new(pg.resume.as_ref().map_or(0, |s| s.routed()));
    let cx = route::Context {
        index: &pg.index,
        registry: &registry,
        db: &pg.db,
        max_record_bytes: pg.max_record_bytes,
        slow_consumer: pg.slow_consumer,
        deletes: &pg.deletes,
        delete_unknown: pg.delete_unknown,
    };
    // A new session is asked for a moment after the first channel that needs one, so the
    // channels of a wave of rejoins (after a restart, say) share it.
    let mut restream_at: Option<tokio::time::Instant> = None;
    loop {
        let more = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(cursor) = resumers.recv() => {
                Metrics::add(&metrics.resumes, 1);
                if replay.admit(cursor) {
                    restream_at = Some(tokio::time::Instant::now() + RESTREAM_GATHER);
                }
                continue;
            }
            () = tokio::time::sleep_until(restream_at.unwrap_or_else(tokio::time::Instant::now)), if restream_at.is_some() => {
                restream_at = None;
                Metrics::add(&metrics.restreams, 1);
                source.restream();
                continue;
            }
            more = source.next_batch(&mut batch, MAX_BATCH) => more,
        };
        if !more {
            break;
        }
        // The stream is at-least-once and can be asked to stream again: a change already routed
        // live goes only to channels replaying it (`replay`), and is dropped when none is.
        let stats = route::route(&cx, &mut replay, &batch).await;
        let whole = batch.iter().filter(|tx| tx.last).count();
        Metrics::add(&metrics.wal_transactions, whole as u64);
        Metrics::add(&metrics.wal_redelivered, stats.redelivered);
        Metrics::add(&metrics.wal_backpressure_waits, stats.waits);
        Metrics::add(&metrics.deletes_unknown, stats.deletes_unknown);
        Metrics::add(&metrics.wal_changes, stats.changes);
        Metrics::add(&metrics.postgres_changes_out, stats.frames);
        Metrics::add(&metrics.replayed_changes, stats.replayed);
        Metrics::add(&metrics.dropped_deliveries, stats.dropped);
        Metrics::add(&metrics.visibility_queries, stats.visibility_queries);
        Metrics::add(&metrics.visibility_policy_decisions, stats.policy_decisions);
        Metrics::add(&metrics.db_broadcasts, stats.db_broadcasts);
        // A transaction counts as delivered with its last part; the slot is not confirmed past
        // the oldest position a live or parked channel needs (the transaction before it).
        if let Some(done) = batch.iter().rev().find(|tx| tx.last) {
            let done = done.commit_lsn.0;
            if let Some(store) = &pg.resume {
                store.set_routed(done);
            }
            let hold = pg.hold.load(Ordering::Acquire);
            let ack = if hold == u64::MAX {
                done
            } else {
                done.min(hold.saturating_sub(1))
            };
            source.delivered(realtime_wal_listener::Lsn(ack));
        }
        batch.clear();
    }
    warn!("change router stopped");
}
