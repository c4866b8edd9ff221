//! Helpers shared by the `wal_*` tests: a listener on a fresh database, with timeouts.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use anyhow::Context;
use realtime_tests::postgres::{self, TestDb};
use realtime_wal_listener::{
    AckHandle, Change, ConnectConfig, Error, LagHandle, Listener, ListenerConfig, Transaction,
    TupleValue,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

/// A fresh database with `supabase_realtime` published for all tables, and a client on it.
pub async fn db() -> anyhow::Result<(TestDb, tokio_postgres::Client)> {
    init_tracing();
    let cluster = postgres::cluster().await;
    let db = cluster.fresh_database().await?;
    let client = db.client().await?;
    client
        .batch_execute("CREATE PUBLICATION supabase_realtime FOR ALL TABLES")
        .await?;
    Ok((db, client))
}

pub fn config(url: &str, slot: &str) -> ListenerConfig {
    let mut cfg = ListenerConfig::new(ConnectConfig::from_url(url).expect("url"), slot);
    cfg.status_interval = Duration::from_millis(50);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg
}

pub struct Running {
    pub rx: mpsc::Receiver<Transaction>,
    pub ack: AckHandle,
    pub lag: LagHandle,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), Error>>,
}

/// Starts a listener and waits until it streams, so later commits are certain to be captured.
pub async fn start_ready(cfg: ListenerConfig) -> anyhow::Result<Running> {
    let running = start(cfg);
    postgres::wait_for(WAIT, "listener streaming", || async {
        if running.task.is_finished() {
            anyhow::bail!("listener ended early");
        }
        Ok(running.lag.is_streaming().then_some(()))
    })
    .await?;
    Ok(running)
}

/// Starts a listener without waiting.
pub fn start(cfg: ListenerConfig) -> Running {
    let (listener, rx) = Listener::new(cfg);
    let ack = listener.ack_handle();
    let lag = listener.lag_handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listener.run(shutdown.clone()));
    Running {
        rx,
        ack,
        lag,
        shutdown,
        task,
    }
}

impl Running {
    /// The next transaction, acknowledged.
    pub async fn next(&mut self) -> anyhow::Result<Transaction> {
        let tx = self.next_unacked().await?;
        self.ack.ack(tx.commit_lsn);
        Ok(tx)
    }

    pub async fn next_unacked(&mut self) -> anyhow::Result<Transaction> {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(tx)) => Ok(tx),
            Ok(None) => {
                let result = (&mut self.task).await;
                anyhow::bail!("listener ended: {result:?}")
            }
            Err(_) => anyhow::bail!("no transaction within {WAIT:?}"),
        }
    }

    /// Graceful stop: the final status update confirms what was acknowledged.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("listener did not stop")???;
        Ok(())
    }
}

/// Text of column `i` of a tuple.
pub fn text(tuple: &[TupleValue], i: usize) -> Option<&str> {
    tuple.get(i).and_then(|v| v.as_str())
}

/// The relation's table name of a row change.
pub fn table(change: &Change) -> &str {
    match change {
        Change::Insert { relation, .. }
        | Change::Update { relation, .. }
        | Change::Delete { relation, .. } => &relation.table,
        _ => "",
    }
}

/// Waits until no backend holds `slot`.
pub async fn wait_slot_inactive(client: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    postgres::wait_for(WAIT, "slot inactive", || async {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(match row {
            Some(r) if r.get::<_, bool>(0) => None,
            _ => Some(()),
        })
    })
    .await
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Row ids of the inserts in a transaction (first column as integer).
pub fn inserted_ids(tx: &Transaction) -> Vec<i64> {
    tx.changes
        .iter()
        .filter_map(|c| match c {
            Change::Insert { new, .. } => text(new, 0).and_then(|s| s.parse().ok()),
            _ => None,
        })
        .collect()
}

/// Inserts `count` rows into `t(id)` as single-row transactions (every tenth transaction holds three
/// rows), starting at `first`, through its own connection; reconnects after errors (for server restarts).
/// Returns when all are written; which ids really committed is read back from the table.
pub async fn write_rows(url: String, first: i64, count: i64) -> anyhow::Result<()> {
    let mut client = postgres::connect(&url).await?;
    let mut i = first;
    while i < first + count {
        let sql = if i % 10 == 0 {
            format!("INSERT INTO t VALUES ({i}), ({}), ({})", i + 1, i + 2)
        } else {
            format!("INSERT INTO t VALUES ({i})")
        };
        let step = if i % 10 == 0 { 3 } else { 1 };
        match client.batch_execute(&sql).await {
            Ok(()) => i += step,
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "23505") => i += step,
            Err(_) => {
                // Connection lost (server restart): reconnect and retry the same rows; a duplicate
                // means the lost statement had committed.
                client = postgres::wait_for(WAIT, "reconnect", || async {
                    Ok(postgres::connect(&url).await.ok())
                })
                .await?;
            }
        }
    }
    Ok(())
}

/// All ids in `t`.
pub async fn table_ids(
    client: &tokio_postgres::Client,
) -> anyhow::Result<std::collections::BTreeSet<i64>> {
    Ok(client
        .query("SELECT id::int8 FROM t", &[])
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect())
}

/// Waits until the listener has confirmed at least the transaction with this commit LSN.
pub async fn wait_flushed(
    running: &Running,
    commit_lsn: realtime_wal_listener::Lsn,
) -> anyhow::Result<()> {
    postgres::wait_for(WAIT, "flush", || async {
        Ok((running.lag.lag().flushed > commit_lsn).then_some(()))
    })
    .await
}
