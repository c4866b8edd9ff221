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

/// A committed transaction, delivered whole and in commit order.
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
}
