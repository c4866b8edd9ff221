//! A Supabase Realtime compatible gateway: Phoenix channels over WebSocket, byte-compatible with
//! Supabase Realtime so that supabase-js / realtime-js clients connect unchanged.
//!
//! Modules, in the order data flows through them:
//! - `edge`: the listener; WebSocket upgrades (connect-time auth) and the REST routes.
//! - `socket`: one task per connection: read, dispatch, poll database work, drain the outbox.
//! - `outbox`: a socket's bounded queue of encoded frames and the slow-consumer rule.
//! - `channel`: the channels of a socket, one file per feature (join, broadcast, presence,
//!   Postgres Changes, private-channel access, token refresh) and the work queue that keeps
//!   database waits off the socket's loop.
//! - `topics`: who is joined where (the membership object), presence state, encode-once
//!   fan-out, and the [`Bus`](topics::Bus) seam every client publish passes.
//! - `changes`: Postgres Changes and database broadcasts: the change source seam, the
//!   subscription index, filters, visibility (RLS), payloads and replays.
//! - `resume`: channels' positions in the change log, parked channels, the state file.
//! - `cluster`: several nodes as one over NATS (Broadcast and Presence), the clustered `Bus`.
//! - `db`: the gateway's own database client: connections, migrations, private-channel
//!   checks, replay, retention.
//! - `auth`: token verification: HS secret, JWKS (inline, file, URL with refresh), claim
//!   validators, `sb_` API keys.
//! - [`config`], `metrics`, `state` (the handle every task shares).
//!
//! [`run`] is the whole gateway; `main.rs` only wires it to the process.

pub mod auth;
#[doc(hidden)]
pub mod changes;
mod channel;
mod cluster;
pub mod config;
mod db;
mod edge;
mod metrics;
mod outbox;
mod resume;
mod socket;
mod state;
#[cfg(test)]
mod test_support;
mod topics;

pub use changes::StartError;
pub use config::{Config, ConfigError, Secret};
pub use db::DbError;
pub use db::migrations::MigrationError;

use state::Shared;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid: exit non-zero with the message.
    #[error("{0}")]
    Config(config::ConfigError),
    /// The database could not be set up (connection, migrations).
    #[error(transparent)]
    Postgres(#[from] changes::StartError),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Runs the gateway on `listener` until `shutdown` completes, then closes every socket (with a
/// close frame) and returns once all tasks ended or the shutdown deadline passed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    config.validate().map_err(RunError::Config)?;
    let secret =
        config
            .jwt_secret
            .clone()
            .ok_or(RunError::Config(config::ConfigError::Invalid(
                "a JWT secret is required (API_JWT_SECRET)".into(),
            )))?;
    let deadline = std::time::Duration::from_millis(config.shutdown_timeout_ms);
    let shutdown_token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let cluster = match &config.cluster_nats_url {
        None => None,
        Some(urls) => Some(
            cluster::Cluster::start(
                cluster::Settings {
                    urls: urls.clone(),
                    name: config
                        .node_name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("gw-{:08x}", rand::random::<u32>())),
                    prefix: config.cluster_prefix.clone(),
                    heartbeat: std::time::Duration::from_millis(config.node_heartbeat_ms),
                    down_after: std::time::Duration::from_millis(config.node_down_after_ms),
                    linger: std::time::Duration::from_millis(config.topic_unsub_linger_ms),
                    largest_message: config.max_payload_bytes() + cluster::ENVELOPE_ALLOWANCE,
                },
                shutdown_token.clone(),
                &tracker,
            )
            .await
            .map_err(RunError::Cluster)?,
        ),
    };
    let registry = Arc::new(match &cluster {
        Some(c) => topics::Registry::new(Arc::new(c.clone()), c.node()),
        None => topics::Registry::new(Arc::new(topics::LocalBus), topics::NodeId::random()),
    });
    if let Some(c) = &cluster {
        c.attach(&registry);
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let verifier = auth::Verifier::from_config(&config, &secret).map_err(RunError::Config)?;
    let postgres = match &config.database_url {
        None => None,
        Some(url) => {
            let settings = changes::Settings {
                url: url.expose().to_owned(),
                slot: config.slot_name.clone(),
                publication: config.publication.clone(),
                migrate: !config.disable_migrations,
                max_record_bytes: config.max_record_bytes,
                slow_consumer: std::time::Duration::from_millis(config.slow_consumer_ms),
                delete_memory_bytes: config.delete_memory_bytes,
                delete_unknown: config.delete_unknown,
                resume_window: std::time::Duration::from_millis(config.resume_window_ms),
                resume_max_retained_bytes: config.resume_max_retained_bytes,
                resume_path: config.resume_state_path.clone(),
                resume_slots: config.resume_slots,
            };
            let pg = changes::start(
                &settings,
                registry.clone(),
                metrics.clone(),
                shutdown_token.clone(),
                &tracker,
            )
            .await?;
            Some(pg)
        }
    };
    verifier
        .start_refresh(&tracker, shutdown_token.clone())
        .await;
    let shared = Arc::new(Shared {
        verifier,
        config,
        registry,
        metrics,
        postgres,
        cluster,
        shutdown: shutdown_token,
        tracker,
    });
    info!(addr = %listener.local_addr().map_err(RunError::Listener)?, "listening");
    let accept = shared
        .tracker
        .spawn(edge::accept::accept_loop(shared.clone(), listener));
    tokio::select! {
        () = shutdown => info!("shutting down"),
        _ = shared.shutdown.cancelled() => {}
    }
    shared.shutdown.cancel();
    let _ = accept.await;
    shared.tracker.close();
    if tokio::time::timeout(deadline, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = shared.tracker.len(),
            "shutdown deadline passed with tasks still running"
        );
    }
    Ok(())
}
