//! The database as the gateway's own client: connections, the `realtime` schema it applies,
//! the private-channel checks, replay, and the retention of `realtime.messages`.
//!
//! - [`Database`]: one shared connection for catalog queries (tokio-postgres pipelines
//!   concurrent queries on it) and a few exclusive ones for transactions.
//! - `migrations`: the `realtime` schema objects applied at start.
//! - `authorization`: RLS checks on `realtime.messages` for private channels.
//! - `replay`: stored broadcasts of a private channel, for `broadcast.replay`.
//! - `janitor`: deletes `realtime.messages` rows past the retention.

pub(crate) mod authorization;
pub(crate) mod janitor;
pub(crate) mod migrations;
pub(crate) mod replay;

use realtime_wal_listener::ConnectConfig;
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;

/// A database error, classified by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached (connect refused, connection lost, shutting down):
    /// trying again later can help.
    #[error("cannot connect to the database: {0}")]
    Unavailable(String),
    /// A statement failed; the message is the server's.
    #[error("{0}")]
    Statement(String),
}

impl DbError {
    /// The server's message for statement errors, the whole text otherwise.
    pub(crate) fn message(&self) -> String {
        match self {
            DbError::Statement(m) => m.clone(),
            DbError::Unavailable(_) => self.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        match e.as_db_error() {
            // Class 08 (connection exception), 57P0x (shutdown, cannot connect now).
            Some(d) if d.code().code().starts_with("08") || d.code().code().starts_with("57P0") => {
                DbError::Unavailable(d.message().to_owned())
            }
            Some(d) => DbError::Statement(d.message().to_owned()),
            None => DbError::Unavailable(e.to_string()),
        }
    }
}

/// Plain SQL connections to the database.
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

    async fn open(&self) -> Result<Client, DbError> {
        realtime_wal_listener::connect_sql(&self.connect)
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// The shared connection (reconnected when it was lost).
    pub(crate) async fn client(&self) -> Result<Arc<Client>, DbError> {
        let mut slot = self.shared.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.open().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// An exclusive connection for a transaction.
    pub(crate) async fn exclusive(&self) -> Result<Exclusive<'_>, DbError> {
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
