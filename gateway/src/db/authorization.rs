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
//! - Write: as the JWT's role, insert a probe row for the extension; success grants write,
//!   SQLSTATE 42501 (RLS violation) denies it, any other error is an error.

use super::{Database, DbError};
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

impl Context<'_> {
    /// The parameters of [`SET_CONTEXT`].
    fn params(&self) -> [Param<'_>; 5] {
        [
            &self.role,
            &self.topic,
            &self.claims,
            &self.sub,
            &self.headers,
        ]
    }
}

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

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

/// A probe row (as the gateway's role for read, as the JWT's role for write).
const INSERT_PROBE: &str = "insert into realtime.messages (id, topic, extension, inserted_at, updated_at) \
     values ($1, $2, $3, now() at time zone 'utc', now() at time zone 'utc')";

const SELECT_PROBES: &str = "select id from realtime.messages where id = any($1)";

/// Read permissions: `(broadcast, presence)`; presence is only checked when asked.
///
/// The statements are prepared once per connection and pipelined: a check is one round trip.
/// The rollback runs whatever happened before it (an aborted transaction accepts it).
pub(crate) async fn read(
    db: &Database,
    ctx: &Context<'_>,
    check_presence: bool,
) -> Result<(bool, Option<bool>), AuthzError> {
    let mut client = db
        .exclusive()
        .await
        .map_err(|e| AuthzError::Unavailable(e.message()))?;
    let unavailable =
        |e: tokio_postgres::Error| AuthzError::Unavailable(DbError::from(e).message());
    let insert = client.prepared(INSERT_PROBE).await.map_err(unavailable)?;
    let set = client.prepared(SET_CONTEXT).await.map_err(unavailable)?;
    let select = client.prepared(SELECT_PROBES).await.map_err(unavailable)?;
    let client = &*client;
    let broadcast_id = Uuid::new_v4();
    let presence_id = Uuid::new_v4();
    let ids = vec![broadcast_id, presence_id];
    let broadcast_params: [Param<'_>; 3] = [&broadcast_id, &ctx.topic, &"broadcast"];
    let presence_params: [Param<'_>; 3] = [&presence_id, &ctx.topic, &"presence"];
    let context = ctx.params();
    let select_params: [Param<'_>; 1] = [&ids];
    let (begin, broadcast_probe, presence_probe, set, rows, _rollback) = tokio::join!(
        client.batch_execute("begin"),
        client.execute(&insert, &broadcast_params),
        async {
            if check_presence {
                client.execute(&insert, &presence_params).await.map(Some)
            } else {
                Ok(None)
            }
        },
        client.execute(&set, &context),
        client.query(&select, &select_params),
        client.batch_execute("rollback"),
    );
    begin.map_err(unavailable)?;
    let policy = |e: tokio_postgres::Error| AuthzError::Policy(DbError::from(e).message());
    broadcast_probe.map_err(policy)?;
    presence_probe.map_err(policy)?;
    set.map_err(policy)?;
    let seen: Vec<Uuid> = rows.map_err(policy)?.iter().map(|r| r.get(0)).collect();
    Ok((
        seen.contains(&broadcast_id),
        check_presence.then(|| seen.contains(&presence_id)),
    ))
}

/// Write permission for one extension (`broadcast` or `presence`), in one round trip as
/// [`read`].
pub(crate) async fn write(
    db: &Database,
    ctx: &Context<'_>,
    extension: &str,
) -> Result<bool, AuthzError> {
    let mut client = db
        .exclusive()
        .await
        .map_err(|e| AuthzError::Unavailable(e.message()))?;
    let unavailable =
        |e: tokio_postgres::Error| AuthzError::Unavailable(DbError::from(e).message());
    let set = client.prepared(SET_CONTEXT).await.map_err(unavailable)?;
    let insert = client.prepared(INSERT_PROBE).await.map_err(unavailable)?;
    let client = &*client;
    let id = Uuid::new_v4();
    let context = ctx.params();
    let probe_params: [Param<'_>; 3] = [&id, &ctx.topic, &extension];
    let (begin, set, probe, _rollback) = tokio::join!(
        client.batch_execute("begin"),
        client.execute(&set, &context),
        client.execute(&insert, &probe_params),
        client.batch_execute("rollback"),
    );
    begin.map_err(unavailable)?;
    set.map_err(|e| AuthzError::Policy(DbError::from(e).message()))?;
    match probe {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Ok(false),
        Err(e) => Err(AuthzError::Policy(DbError::from(e).message())),
    }
}
