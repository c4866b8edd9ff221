//! The `realtime` schema objects clients and policies depend on, applied at start, once each,
//! recorded in `realtime.schema_migrations`. Concurrent gateways serialise on an advisory lock.

use super::DbError;
use tokio_postgres::Client;
use tracing::info;

/// The publication of `realtime.messages` (broadcast from the database), created by migration 1.
pub(crate) const MESSAGES_PUBLICATION: &str = "supabase_realtime_messages_publication";

/// Migrations in order: (version, SQL).
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_realtime_schema",
        include_str!("../../sql/0001_realtime_schema.sql"),
    ),
    (
        "0002_visibility",
        include_str!("../../sql/0002_visibility.sql"),
    ),
];

/// An arbitrary key for `pg_advisory_xact_lock`.
const LOCK_KEY: i64 = 0x7265_616c_7469_6d65;

/// Applies the migrations that have not run yet.
/// Why the migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot create realtime.schema_migrations: {0}")]
    Setup(DbError),
    #[error("migration {version} failed: {error}")]
    Failed {
        version: &'static str,
        error: DbError,
    },
}

pub(crate) async fn apply(client: &Client) -> Result<(), MigrationError> {
    // Under the lock too: two gateways starting at once on a fresh database would both try
    // to create the schema, and one would fail on the catalog's unique index. One simple query
    // of several statements is one transaction, so the lock is held until its end.
    client
        .batch_execute(&format!(
            "select pg_advisory_xact_lock({LOCK_KEY});
             create schema if not exists realtime;
             create table if not exists realtime.schema_migrations (
               version text primary key,
               inserted_at timestamptz not null default now())"
        ))
        .await
        .map_err(|e| MigrationError::Setup(e.into()))?;
    for (version, sql) in MIGRATIONS {
        let failed = |error: tokio_postgres::Error| MigrationError::Failed {
            version,
            error: error.into(),
        };
        client.batch_execute("begin").await.map_err(failed)?;
        let result = async {
            client
                .execute("select pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await?;
            let done = client
                .query_opt(
                    "select 1 from realtime.schema_migrations where version = $1",
                    &[version],
                )
                .await?
                .is_some();
            if !done {
                client.batch_execute(sql).await?;
                client
                    .execute(
                        "insert into realtime.schema_migrations (version) values ($1)",
                        &[version],
                    )
                    .await?;
                info!(version, "migration applied");
            }
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        match result {
            Ok(()) => client.batch_execute("commit").await.map_err(failed)?,
            Err(e) => {
                let _ = client.batch_execute("rollback").await;
                return Err(failed(e));
            }
        }
    }
    Ok(())
}
