//! Postgres Changes and broadcast from the database: one WAL stream for the whole process,
//! routed to channels.
//!
//! - `subscription`: join-time parsing and catalog checks of `postgres_changes` entries.
//! - `filter`: the filter syntax and its evaluation.
//! - `router`: table → subscriptions, and the batch path from WAL transactions to sockets.
//! - `payload`: the `postgres_changes` message.
//! - `visibility`: batched RLS checks.
//! - `policy`: row policies evaluated in process, the fast path of those checks.
//! - `migrations`: the `realtime` schema objects applied at start.
//!
//! Delivery: the listener hands whole transactions over a bounded queue; the router task takes
//! what is queued (a batch), routes it, and acknowledges the batch's last commit LSN once every
//! frame is in the sockets' outboxes. Outbox pushes never wait (slow sockets are closed, see
//! `outbox`), so a slow client never stalls the stream.

pub(crate) mod filter;
pub(crate) mod migrations;
pub(crate) mod payload;
pub mod policy;
pub(crate) mod router;
pub(crate) mod subscription;
pub(crate) mod visibility;

use crate::auth::Claims;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::registry::{MemberId, Registry};
use realtime_protocol::Vsn;
use realtime_wal_listener::{ConnectConfig, LagHandle, Listener, ListenerConfig, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard, mpsc};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use visibility::Viewer;

/// Transactions routed together at most.
const MAX_BATCH: usize = 256;

/// Plain SQL connections to the database: one shared for catalog queries (tokio-postgres
/// pipelines concurrent queries on it), a few exclusive ones for transactions.
#[derive(Debug)]
pub(crate) struct Database {
    connect: ConnectConfig,
    shared: Mutex<Option<Arc<Client>>>,
    exclusive: Vec<Mutex<Option<Conn>>>,
}

/// A connection and the statements prepared on it.
#[derive(Debug)]
pub(crate) struct Conn {
    client: Client,
    statements: std::collections::HashMap<String, tokio_postgres::Statement>,
}

/// An exclusive connection, held for one transaction.
pub(crate) struct Exclusive<'a>(MutexGuard<'a, Option<Conn>>);

impl std::ops::Deref for Exclusive<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.0.as_ref().expect("connected before handed out").client
    }
}

impl std::ops::DerefMut for Exclusive<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.0.as_mut().expect("connected before handed out").client
    }
}

impl Exclusive<'_> {
    /// A statement prepared on this connection, prepared once and kept.
    pub(crate) async fn prepared(
        &mut self,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let conn = self.0.as_mut().expect("connected before handed out");
        if let Some(statement) = conn.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = conn.client.prepare(sql).await?;
        if conn.statements.len() > 256 {
            conn.statements.clear();
        }
        conn.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

impl Database {
    pub(crate) fn new(connect: ConnectConfig, exclusive: usize) -> Database {
        Database {
            connect,
            shared: Mutex::new(None),
            exclusive: (0..exclusive.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    async fn open(&self) -> Result<Client, String> {
        realtime_wal_listener::connect_sql(&self.connect)
            .await
            .map_err(|e| format!("cannot connect to the database: {e}"))
    }

    /// The shared connection (reconnected when it was lost).
    pub(crate) async fn client(&self) -> Result<Arc<Client>, String> {
        let mut slot = self.shared.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.open().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// An exclusive connection for a transaction.
    pub(crate) async fn exclusive(&self) -> Result<Exclusive<'_>, String> {
        let start = rand::random::<u32>() as usize % self.exclusive.len();
        let mut guard = None;
        for i in 0..self.exclusive.len() {
            if let Ok(g) = self.exclusive[(start + i) % self.exclusive.len()].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.exclusive[start].lock().await,
        };
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(Conn {
                client: self.open().await?,
                statements: Default::default(),
            });
        }
        Ok(Exclusive(guard))
    }
}

/// The Postgres side of the gateway.
#[derive(Debug)]
pub(crate) struct PostgresChanges {
    pub(crate) db: Database,
    pub(crate) router: router::Router,
    pub(crate) lag: LagHandle,
    pub(crate) publication: String,
    pub(crate) max_record_bytes: usize,
}

impl PostgresChanges {
    /// Waits until the WAL stream is live, at most `timeout`.
    pub(crate) async fn wait_streaming(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.lag.is_streaming() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Why a channel could not be subscribed.
#[derive(Debug)]
pub(crate) enum SubscribeError {
    /// The database is unreachable: worth trying again.
    Unavailable(String),
    /// The entries are invalid for this database and role.
    Invalid(String),
}

/// Resolves a channel's `postgres_changes` entries for its claims and registers them in the
/// router, replacing what the channel had. Errors are the reference's system message texts.
pub(crate) async fn subscribe(
    pg: &PostgresChanges,
    member: MemberId,
    outbox: &Outbox,
    vsn: Vsn,
    topic: &str,
    claims: &Claims,
    entries: &[(serde_json::Value, u32)],
) -> Result<(), SubscribeError> {
    let result = async {
        let client = pg.db.client().await?;
        let bypass = match subscription::role_bypasses_rls(&client, &claims.role).await? {
            Some(bypass) => bypass,
            None => {
                return Err(format!(
                    "Unable to subscribe to changes with given parameters: role \"{}\" of the JWT does not exist in the database",
                    claims.role
                ));
            }
        };
        let viewer = Arc::new(Viewer::new(claims.role.clone(), &claims.all, bypass));
        let topic: Arc<str> = Arc::from(topic);
        let mut subs = Vec::new();
        for (value, id) in entries {
            let binding = subscription::parse_binding(value, *id)?;
            for table in subscription::resolve(&client, &pg.publication, &claims.role, &binding).await? {
                let shape = payload::Shape::of(&table);
                subs.push(router::Subscription {
                    member,
                    outbox: outbox.clone(),
                    vsn,
                    topic: topic.clone(),
                    binding: table,
                    viewer: viewer.clone(),
                    shape,
                });
            }
        }
        Ok(subs)
    }
    .await;
    match result {
        Ok(subs) => {
            pg.router.subscribe(member, subs);
            Ok(())
        }
        Err(e) => {
            pg.router.unsubscribe(member);
            // Whether the database is reachable now decides if trying again can help.
            if pg.db.client().await.is_err() {
                Err(SubscribeError::Unavailable(e))
            } else {
                Err(SubscribeError::Invalid(e))
            }
        }
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
}

/// Connects, applies the migrations, and starts the listener and the router task.
pub(crate) async fn start(
    settings: &Settings,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Arc<PostgresChanges>> {
    let connect = ConnectConfig::from_url(&settings.url)
        .map_err(|e| anyhow::anyhow!("invalid DATABASE_URL: {e}"))?;
    let db = Database::new(connect.clone(), 8);
    if settings.migrate {
        let client = db.client().await.map_err(anyhow::Error::msg)?;
        migrations::apply(&client).await?;
    }
    let mut listener_config = ListenerConfig::new(connect, settings.slot.clone());
    listener_config.publication = settings.publication.clone();
    listener_config.additional_publications = vec![migrations::MESSAGES_PUBLICATION.to_owned()];
    let (listener, transactions) = Listener::new(listener_config);
    let ack = listener.ack_handle();
    let lag = listener.lag_handle();
    let pg = Arc::new(PostgresChanges {
        db,
        router: router::Router::default(),
        lag,
        publication: settings.publication.clone(),
        max_record_bytes: settings.max_record_bytes,
    });
    let listener_shutdown = shutdown.clone();
    tracker.spawn(async move {
        match listener.run(listener_shutdown).await {
            Ok(()) => info!("wal listener stopped"),
            Err(e) => {
                error!(error = %e, "wal listener stopped: postgres changes are not delivered")
            }
        }
    });
    let task_pg = pg.clone();
    let router_shutdown = shutdown.clone();
    tracker.spawn(async move {
        route_loop(
            task_pg,
            registry,
            metrics,
            transactions,
            ack,
            router_shutdown,
        )
        .await;
    });
    if settings.migrate {
        tracker.spawn(janitor(pg.clone(), shutdown));
    }
    Ok(pg)
}

/// How long broadcasts stay in `realtime.messages` (replay reaches back this far), as the
/// reference's daily partitions dropped after 72 hours.
const MESSAGE_RETENTION_HOURS: i32 = 72;
/// How often the janitor runs.
const JANITOR_INTERVAL: Duration = Duration::from_secs(600);

/// Deletes `realtime.messages` rows older than the retention, periodically. The reference drops
/// daily partitions instead; one plain table with this delete keeps the same window without
/// anyone having to create partitions ahead of time.
async fn janitor(pg: Arc<PostgresChanges>, shutdown: CancellationToken) {
    loop {
        match pg.db.client().await {
            Ok(client) => {
                let deleted = client
                    .execute(
                        "delete from realtime.messages where inserted_at < now()::timestamp - make_interval(hours => $1)",
                        &[&MESSAGE_RETENTION_HOURS],
                    )
                    .await;
                match deleted {
                    Ok(0) => {}
                    Ok(n) => info!(rows = n, "janitor removed expired realtime.messages rows"),
                    Err(e) => {
                        warn!(error = %subscription::db_error_text(&e), "janitor could not clean realtime.messages")
                    }
                }
            }
            Err(e) => warn!(error = %e, "janitor could not connect"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(JANITOR_INTERVAL) => {}
        }
    }
}

async fn route_loop(
    pg: Arc<PostgresChanges>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mut transactions: mpsc::Receiver<Transaction>,
    ack: realtime_wal_listener::AckHandle,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_routed = realtime_wal_listener::Lsn::default();
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            tx = transactions.recv() => match tx {
                Some(tx) => tx,
                None => break,
            },
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match transactions.try_recv() {
                Ok(tx) => batch.push(tx),
                Err(_) => break,
            }
        }
        // The stream is at-least-once: after a reconnect, transactions already routed come again
        // with the same commit LSN. They were delivered once; drop them.
        let before = batch.len();
        batch.retain(|tx| tx.commit_lsn > last_routed);
        Metrics::add(&metrics.wal_redelivered, (before - batch.len()) as u64);
        if let Some(last) = batch.last() {
            last_routed = last.commit_lsn;
        }
        let stats = router::route(&pg.router, &registry, &pg.db, &batch, pg.max_record_bytes).await;
        Metrics::add(&metrics.wal_transactions, batch.len() as u64);
        Metrics::add(&metrics.wal_changes, stats.changes);
        Metrics::add(&metrics.postgres_changes_out, stats.frames);
        Metrics::add(&metrics.dropped_deliveries, stats.dropped);
        Metrics::add(&metrics.visibility_queries, stats.visibility_queries);
        Metrics::add(&metrics.visibility_policy_decisions, stats.policy_decisions);
        Metrics::add(&metrics.db_broadcasts, stats.db_broadcasts);
        if let Some(last) = batch.last() {
            ack.ack(last.commit_lsn);
        }
        batch.clear();
    }
    warn!("change router stopped");
}
