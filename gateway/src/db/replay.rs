//! Replay on private channels (`config.broadcast.replay {since, limit}`, protocol.md §5.6):
//! the newest messages of the topic since a time, delivered oldest first after the join reply.

use super::{Database, DbError};

/// At most this many messages are replayed (the reference clamps `limit` to 1..=25).
const MAX_LIMIT: i64 = 25;

/// One stored broadcast.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) event: String,
    /// JSON text of `payload`, for JSON messages.
    pub(crate) payload: Option<String>,
    /// `binary_payload`, for binary messages.
    pub(crate) binary: Option<Vec<u8>>,
}

/// Loads the messages of `topic` inserted since `since_ms` (ms since the epoch), oldest first.
pub(crate) async fn load(
    db: &Database,
    topic: &str,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<Row>, DbError> {
    let client = db.client().await?;
    let limit = limit.clamp(1, MAX_LIMIT);
    let rows = client
        .query(
            "select id::text, event, payload::text, binary_payload from realtime.messages
              where topic = $1 and private is true and extension = 'broadcast'
                and inserted_at >= to_timestamp($2::float8 / 1000)::timestamp
                and inserted_at < now()::timestamp + interval '1 minute'
                and event is not null
              order by inserted_at desc
              limit $3",
            &[&topic, &(since_ms as f64), &limit],
        )
        .await?;
    let mut out: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            id: r.get(0),
            event: r.get(1),
            payload: r.get(2),
            binary: r.get(3),
        })
        .filter(|r| r.payload.is_some() || r.binary.is_some())
        .collect();
    out.reverse();
    Ok(out)
}
