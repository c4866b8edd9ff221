//! The state every task shares, behind one cloneable handle.

use crate::auth::Verifier;
use crate::changes::PostgresChanges;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::topics::Registry;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) verifier: Verifier,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// The Postgres side, when a database is configured.
    pub(crate) postgres: Option<Arc<PostgresChanges>>,
    /// This node's side of the cluster, when `CLUSTER_NATS_URL` is set.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cancelled when the gateway shuts down; every socket's kill token is a child of it.
    pub(crate) shutdown: CancellationToken,
    /// Every task the gateway spawns, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
}

impl Shared {
    /// Why a private channel cannot be joined while no database is configured.
    pub(crate) fn private_channels_unavailable(&self) -> String {
        "UnableToConnectToProject: Realtime was unable to connect to the project database \
         (private channels are authorized by RLS on realtime.messages: set DATABASE_URL)"
            .to_owned()
    }

    /// Why postgres_changes bindings cannot be served while no database is configured.
    pub(crate) fn postgres_changes_unavailable(&self) -> String {
        "Unable to subscribe to changes with given parameters: no database is configured \
         (set DATABASE_URL)"
            .to_owned()
    }
}
