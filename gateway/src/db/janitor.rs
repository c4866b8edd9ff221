//! Retention of `realtime.messages`: the reference drops daily partitions after 72 hours; one
//! plain table with a periodic delete keeps the same window without anyone having to create
//! partitions ahead of time.

use super::{Database, DbError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long broadcasts stay in `realtime.messages` (replay reaches back this far).
const MESSAGE_RETENTION_HOURS: i32 = 72;
/// How often the janitor runs.
const JANITOR_INTERVAL: Duration = Duration::from_secs(600);

/// Deletes expired rows now and then every [`JANITOR_INTERVAL`], until shutdown.
pub(crate) async fn run(db: Arc<Database>, shutdown: CancellationToken) {
    loop {
        match clean(&db).await {
            Ok(0) => {}
            Ok(n) => info!(rows = n, "janitor removed expired realtime.messages rows"),
            Err(e) => warn!(error = %e, "janitor could not clean realtime.messages"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(JANITOR_INTERVAL) => {}
        }
    }
}

async fn clean(db: &Database) -> Result<u64, DbError> {
    let client = db.client().await?;
    Ok(client
        .execute(
            "delete from realtime.messages where inserted_at < now()::timestamp - make_interval(hours => $1)",
            &[&MESSAGE_RETENTION_HOURS],
        )
        .await?)
}
