//! What the listener emits: whole transactions of changes, with resolved relation metadata.

use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::PgType;
use crate::lsn::Lsn;
use crate::pgoutput::{OldTuple, PgTimestamp, ReplicaIdentity, Tuple, TupleValue};
use crate::value;

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Part of the replica identity key.
    pub is_key: bool,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Name (`pg_type.typname`) and JSON kind of the type, from the catalog.
    pub pg_type: Arc<PgType>,
}

/// A published table as the stream described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID.
    pub id: u32,
    pub schema: String,
    pub table: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// Writes a tuple as a JSON object `{"column": value, …}` per [`crate::value`].
    /// Unchanged TOAST values are left out (protocol.md §7.5); with `keys_only`, only key columns are
    /// written (use it for [`OldTuple::Key`]).
    pub fn write_record_json(&self, out: &mut Vec<u8>, tuple: &Tuple, keys_only: bool) {
        out.push(b'{');
        let mut first = true;
        for (col, v) in self.columns.iter().zip(tuple) {
            if keys_only && !col.is_key {
                continue;
            }
            let text = match v {
                TupleValue::UnchangedToast => continue,
                TupleValue::Null => None,
                TupleValue::Text(b) | TupleValue::Binary(b) => Some(b),
            };
            if !first {
                out.push(b',');
            }
            first = false;
            value::write_string(out, &col.name);
            out.push(b':');
            match text {
                None => out.extend_from_slice(b"null"),
                Some(b) => match std::str::from_utf8(b) {
                    Ok(s) => value::write_json(out, &col.pg_type.kind, s),
                    Err(_) => value::write_string(out, &String::from_utf8_lossy(b)),
                },
            }
        }
        out.push(b'}');
    }

    /// The `old_record` object for an old tuple: key columns for `K`, every column for `O`.
    pub fn write_old_record_json(&self, out: &mut Vec<u8>, old: &OldTuple) {
        match old {
            OldTuple::Key(t) => self.write_record_json(out, t, true),
            OldTuple::Full(t) => self.write_record_json(out, t, false),
        }
    }
}

/// One row change, or a truncate, or a logical message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert {
        relation: Arc<Relation>,
        new: Tuple,
    },
    Update {
        relation: Arc<Relation>,
        /// Key tuple (`K`, key changed) or full old row (`O`, replica identity FULL); `None` when the key
        /// did not change under DEFAULT / USING INDEX identity.
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: Arc<Relation>,
        old: Option<OldTuple>,
    },
    Truncate {
        relations: Vec<Arc<Relation>>,
        cascade: bool,
        restart_identity: bool,
    },
    /// From `pg_logical_emit_message` (with [`crate::ListenerConfig::messages`]).
    Message {
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
}

/// A committed transaction, or one part of a large one, in commit order.
///
/// A transaction with more changes than [`crate::ListenerConfig::chunk_max_changes`] (or more
/// bytes than `chunk_max_bytes`) arrives in several parts as it is decoded, so it never has to
/// fit in memory whole: every part has the same `xid`, `commit_lsn` and `commit_time`, `chunk`
/// counts them from 0, and only the last has `last = true`. Acknowledge a `commit_lsn` only
/// once its last part is handled. Parts are cut at the same places when a transaction is
/// streamed again, so `(commit_lsn, chunk)` identifies a part across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub xid: u32,
    /// LSN of the commit record: the identity of this transaction in the stream. Redelivered after a
    /// restart, a transaction has the same `commit_lsn`; pass it to [`crate::AckHandle::ack`].
    pub commit_lsn: Lsn,
    /// End of the commit record; what the listener reports as flushed once `commit_lsn` is acked.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    /// Replication origin, when the transaction was itself replicated from elsewhere.
    pub origin: Option<String>,
    pub changes: Vec<Change>,
    /// Which part of the transaction this is, from 0.
    pub chunk: u32,
    /// Whether this part ends with the commit (a whole transaction is one last part).
    pub last: bool,
    /// The bytes this part holds of the listener's queue budget, given back when it is dropped.
    pub(crate) budget: Budget,
}

/// A share of the listener's queue budget (`queue_max_bytes`), released on drop. Clones hold
/// nothing.
#[derive(Debug, Default)]
pub(crate) struct Budget(Option<(std::sync::Arc<BudgetPool>, usize)>);

/// Bytes of transactions handed to the consumer and not dropped yet.
#[derive(Debug, Default)]
pub(crate) struct BudgetPool {
    pub(crate) used: std::sync::atomic::AtomicUsize,
    pub(crate) released: tokio::sync::Notify,
}

impl Budget {
    pub(crate) fn take(pool: &std::sync::Arc<BudgetPool>, bytes: usize) -> Budget {
        pool.used
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        Budget(Some((pool.clone(), bytes)))
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some((pool, bytes)) = self.0.take() {
            pool.used
                .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
            pool.released.notify_one();
        }
    }
}

impl Clone for Budget {
    fn clone(&self) -> Budget {
        Budget(None)
    }
}

impl PartialEq for Budget {
    fn eq(&self, _: &Budget) -> bool {
        true
    }
}

impl Eq for Budget {}
