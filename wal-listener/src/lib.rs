//! A durable logical-replication listener for Postgres' `pgoutput` plugin.
//!
//! One [`Listener`] holds one replication connection on a durable slot and emits whole committed
//! transactions, in commit order, into a bounded queue. The consumer acknowledges what it has handed on
//! ([`AckHandle::ack`]); only acknowledged positions are confirmed to Postgres, so a crash or restart
//! of either side loses nothing — unacknowledged transactions are delivered again with the same LSN.
//! It knows nothing of Phoenix, sockets or subscribers.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use realtime_wal_listener::{ConnectConfig, Listener, ListenerConfig};
//! let connect = ConnectConfig::from_url("postgres://postgres:pw@127.0.0.1:5432/postgres")?;
//! let (listener, mut transactions) = Listener::new(ListenerConfig::new(connect, "realtime"));
//! let ack = listener.ack_handle();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let task = tokio::spawn(listener.run(shutdown.clone()));
//! while let Some(tx) = transactions.recv().await {
//!     // ... hand tx.changes on ...
//!     ack.ack(tx.commit_lsn);
//! }
//! # Ok(()) }
//! ```
//!
//! Modules:
//! - [`listener`]: the replication loop, delivery contract, acknowledgement rules, lag.
//! - [`pgoutput`]: sans-IO decoder of pgoutput protocol version 1; never panics.
//! - [`value`]: Postgres text output to JSON, as Realtime's `record` needs it.
//! - [`change`]: the emitted types ([`Transaction`], [`Change`], [`Relation`]).
//! - [`config`]: Postgres URL parsing, listener settings.
//! - [`error`]: typed errors and their retry classification.
//! - [`lsn`]: WAL positions.
//! - [`wire`]: a transaction part as bytes and back, for a change log shared between processes.
//! - `catalog` (private): preflight checks and type resolution on a tokio-postgres connection.
//! - `replication` (private): startup, authentication (trust, cleartext, md5, SCRAM-SHA-256), simple
//!   queries, CopyBoth framing.
//! - `transport` (private): TCP and TLS via the `SSLRequest` exchange (tokio-rustls, ring).

mod catalog;
pub mod change;
pub mod config;
pub mod error;
pub mod listener;
pub mod lsn;
pub mod pgoutput;
mod replication;
mod transport;
pub mod value;
pub mod wire;

pub use catalog::PgType;
/// A plain SQL connection (tokio-postgres) over the same transport as the replication stream
/// (TLS per `sslmode`), for the consumer's own queries.
pub use catalog::connect as connect_sql;
pub use change::{Change, Column, Relation, Transaction};
pub use config::{ConnectConfig, ListenerConfig, Password, SslMode};
pub use error::{Error, ServerError};
pub use listener::{AckHandle, Lag, LagHandle, Listener};
pub use lsn::Lsn;
pub use pgoutput::{OldTuple, PgTimestamp, ReplicaIdentity, Tuple, TupleValue};
