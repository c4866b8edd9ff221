//! Private channels: read and write permissions from RLS policies on `realtime.messages`
//! (protocol.md §8.3), evaluated exactly as the reference server does.
//!
//! Every check runs in a transaction that is rolled back, with these transaction-local settings:
//! `role`, `realtime.topic` (what `realtime.topic()` returns), `request.jwt.claims`,
//! `request.jwt.claim.sub`, `request.jwt.claim.role` and `request.headers`.
//!
//! - Read: as the gateway's own (privileged) role, insert one probe row per extension to check
//!   (`broadcast`, and `presence` when presence is on); switch to the JWT's role; select the probes.
//!   A probe the role can see grants read for its extension.
//! - Write: as the JWT's role, insert a probe row for the extension inside a savepoint; success
//!   grants write, SQLSTATE 42501 (RLS violation) denies it, any other error is an error.

use crate::postgres::Database;
use crate::postgres::subscription::db_error_text;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

/// Who asks, for which topic.
#[derive(Debug, Clone)]
pub(crate) struct Context<'a> {
    pub(crate) role: &'a str,
    /// `request.jwt.claims` as JSON text.
    pub(crate) claims: &'a str,
    pub(crate) sub: &'a str,
    /// The sub-topic (channel name without `realtime:`).
    pub(crate) topic: &'a str,
    /// `request.headers` as JSON text.
    pub(crate) headers: &'a str,
}

/// Why a check could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthzError {
    /// No connection to the database.
    #[error("Realtime was unable to connect to the project database")]
    Unavailable(String),
    /// A policy raised an error (or another database error happened while checking).
    #[error("{0}")]
    Policy(String),
}

impl AuthzError {
    /// The join refusal reason; the detail goes to the log, never to the client.
    pub(crate) fn join_reason(&self, topic: &str) -> String {
        match self {
            AuthzError::Unavailable(_) => {
                "UnableToConnectToProject: Realtime was unable to connect to the project database"
                    .to_owned()
            }
            AuthzError::Policy(_) => unauthorized(topic),
        }
    }
}

/// `Unauthorized: You do not have permissions to read from this Channel topic: <topic>`.
pub(crate) fn unauthorized(topic: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {topic}")
}

const SET_CONTEXT: &str = "select set_config('role', $1, true), \
     set_config('realtime.topic', $2, true), \
     set_config('request.jwt.claims', $3, true), \
     set_config('request.jwt.claim.sub', $4, true), \
     set_config('request.jwt.claim.role', $1, true), \
     set_config('request.headers', $5, true)";

/// Read permissions: `(broadcast, presence)`; presence is only checked when asked.
pub(crate) async fn read(
    db: &Database,
    ctx: &Context<'_>,
    check_presence: bool,
) -> Result<(bool, Option<bool>), AuthzError> {
    let mut client = db.exclusive().await.map_err(AuthzError::Unavailable)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| AuthzError::Unavailable(db_error_text(&e)))?;
    let broadcast_id = Uuid::new_v4();
    let presence_id = Uuid::new_v4();
    let policy = |e: tokio_postgres::Error| AuthzError::Policy(db_error_text(&e));
    let result = async {
        tx.execute(
            "insert into realtime.messages (id, topic, extension, inserted_at, updated_at) \
             values ($1, $2, 'broadcast', now() at time zone 'utc', now() at time zone 'utc')",
            &[&broadcast_id, &ctx.topic],
        )
        .await
        .map_err(policy)?;
        if check_presence {
            tx.execute(
                "insert into realtime.messages (id, topic, extension, inserted_at, updated_at) \
                 values ($1, $2, 'presence', now() at time zone 'utc', now() at time zone 'utc')",
                &[&presence_id, &ctx.topic],
            )
            .await
            .map_err(policy)?;
        }
        tx.execute(
            SET_CONTEXT,
            &[&ctx.role, &ctx.topic, &ctx.claims, &ctx.sub, &ctx.headers],
        )
        .await
        .map_err(policy)?;
        let rows = tx
            .query(
                "select id from realtime.messages where id = any($1)",
                &[&vec![broadcast_id, presence_id]],
            )
            .await
            .map_err(policy)?;
        let seen: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        Ok((
            seen.contains(&broadcast_id),
            check_presence.then(|| seen.contains(&presence_id)),
        ))
    }
    .await;
    let _ = tx.rollback().await;
    result
}

/// Write permission for one extension (`broadcast` or `presence`).
pub(crate) async fn write(
    db: &Database,
    ctx: &Context<'_>,
    extension: &str,
) -> Result<bool, AuthzError> {
    let mut client = db.exclusive().await.map_err(AuthzError::Unavailable)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| AuthzError::Unavailable(db_error_text(&e)))?;
    let result = async {
        tx.execute(
            SET_CONTEXT,
            &[&ctx.role, &ctx.topic, &ctx.claims, &ctx.sub, &ctx.headers],
        )
        .await
        .map_err(|e| AuthzError::Policy(db_error_text(&e)))?;
        tx.batch_execute("savepoint probe")
            .await
            .map_err(|e| AuthzError::Policy(db_error_text(&e)))?;
        match tx
            .execute(
                "insert into realtime.messages (topic, extension, inserted_at, updated_at) \
                 values ($1, $2, now() at time zone 'utc', now() at time zone 'utc')",
                &[&ctx.topic, &extension],
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Ok(false),
            Err(e) => Err(AuthzError::Policy(db_error_text(&e))),
        }
    }
    .await;
    let _ = tx.rollback().await;
    result
}
