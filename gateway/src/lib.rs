//! A Supabase Realtime compatible gateway: Phoenix channels over WebSocket, byte-compatible with
//! Supabase Realtime so that supabase-js / realtime-js clients connect unchanged.
//!
//! Modules, and what each owns:
//! - [`config`]: the one configuration struct (flags and environment).
//! - `http`: the listener; WebSocket upgrades (connect-time auth) and hand-off to `rest`.
//! - `rest`: warp routes: REST broadcast, health, metrics.
//! - `socket`: one task per connection: read, dispatch, drain the outbox, idle timeout.
//! - `channel`: the channels of a socket and the handler of every client push.
//! - `presence`: Phoenix.Presence state per topic and its diffs.
//! - `registry`: topic → members, and the encode-once fan-out.
//! - `outbox`: a socket's bounded queue of encoded frames and the slow-consumer rule.
//! - `auth`: token verification: HS secret, JWKS (inline, file, URL with refresh), claim
//!   validators, `sb_` API keys.
//! - `metrics`: counters and the Prometheus text.
//!
//! [`run`] is the whole gateway; `main.rs` only wires it to the process.

pub mod auth;
mod authorization;
mod channel;
pub mod config;
mod http;
mod metrics;
mod outbox;
#[doc(hidden)]
pub mod postgres;
mod presence;
mod registry;
mod replay;
mod rest;
mod socket;
mod state;

pub use config::{Config, Secret};

use anyhow::Context;
use state::Shared;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Runs the gateway on `listener` until `shutdown` completes, then closes every socket (with a
/// close frame) and returns once all tasks ended or the shutdown deadline passed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let secret = config
        .jwt_secret
        .clone()
        .context("a JWT secret is required (API_JWT_SECRET)")?;
    let deadline = std::time::Duration::from_millis(config.shutdown_timeout_ms);
    let registry = Arc::new(registry::Registry::default());
    let metrics = Arc::new(metrics::Metrics::default());
    let shutdown_token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let verifier = auth::Verifier::from_config(&config, &secret).map_err(anyhow::Error::msg)?;
    let postgres = match &config.database_url {
        None => None,
        Some(url) => {
            let settings = postgres::Settings {
                url: url.expose().to_owned(),
                slot: config.slot_name.clone(),
                publication: config.publication.clone(),
                migrate: !config.disable_migrations,
                max_record_bytes: config.max_record_bytes,
            };
            let pg = postgres::start(
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
        shutdown: shutdown_token,
        tracker,
    });
    info!(addr = %listener.local_addr()?, "listening");
    let accept = shared
        .tracker
        .spawn(http::accept_loop(shared.clone(), listener));
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
