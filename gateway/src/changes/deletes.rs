//! Who may see a DELETE of an RLS table. The row is gone when the change arrives, so its
//! policies are judged on the old row:
//!
//! - with `REPLICA IDENTITY FULL` the WAL carries the whole old row: exact;
//! - with the default identity the WAL carries only the key: the gateway remembers the rows it
//!   saw inserted or updated (bounded by `DELETE_MEMORY_BYTES`, oldest forgotten first) and uses
//!   the remembered row;
//! - a row it does not know (changed before this process, while nobody was subscribed, or
//!   forgotten) is delivered as the reference does, to every subscriber with the key only
//!   (`DELETE_UNKNOWN=reference`), or to nobody (`DELETE_UNKNOWN=withhold`), and counted.

use realtime_wal_listener::{Relation, Tuple, TupleValue};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// What happens to a DELETE whose old row is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeleteUnknown {
    /// Every subscriber gets it, with the primary key only (the reference's behaviour).
    Reference,
    /// Nobody gets it.
    Withhold,
}

/// A row's primary-key values as text.
type Key = Vec<Box<str>>;

/// The last known version of rows of RLS tables, by table and key.
#[derive(Debug)]
pub(crate) struct RowMemory {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (table OID, key) → (generation, row).
    rows: HashMap<(u32, Key), (u64, Tuple)>,
    /// Insertion order, for forgetting the oldest first; an entry whose generation no longer
    /// matches (the row was replaced or removed since) is skipped.
    order: VecDeque<((u32, Key), u64)>,
    bytes: usize,
    generation: u64,
}

/// Bytes a remembered row costs: its values and the bookkeeping around them.
fn cost(key: &Key, row: &Tuple) -> usize {
    const PER_ROW: usize = 96;
    const PER_VALUE: usize = 40;
    PER_ROW
        + key.iter().map(|k| k.len() + 16).sum::<usize>()
        + row
            .iter()
            .map(|v| {
                PER_VALUE
                    + match v {
                        TupleValue::Text(b) | TupleValue::Binary(b) => b.len(),
                        _ => 0,
                    }
            })
            .sum::<usize>()
}

impl RowMemory {
    pub(crate) fn new(max_bytes: usize) -> RowMemory {
        RowMemory {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the row an INSERT or UPDATE left (`old` fills values an UPDATE did not send);
    /// a row with a value that is still unknown is forgotten instead.
    pub(crate) fn remember(&self, relation: &Relation, new: &Tuple, old: Option<&Tuple>) {
        if relation.replica_identity == realtime_wal_listener::ReplicaIdentity::Full {
            // The WAL carries the whole old row of a DELETE: nothing to remember.
            return;
        }
        let Some(key) = key_of(relation, new) else {
            return;
        };
        let mut inner = self.lock();
        let id = (relation.id, key);
        let previous = inner.rows.get(&id).map(|(_, row)| row);
        let mut row = Vec::with_capacity(new.len());
        for (i, value) in new.iter().enumerate() {
            let value = match value {
                TupleValue::UnchangedToast => match old
                    .and_then(|o| o.get(i))
                    .or_else(|| previous.and_then(|p| p.get(i)))
                {
                    Some(v @ (TupleValue::Text(_) | TupleValue::Null)) => v.clone(),
                    _ => {
                        drop(row);
                        inner.remove(&id);
                        return;
                    }
                },
                // Own copies: a slice would keep the whole replication read buffer alive.
                TupleValue::Text(b) => TupleValue::Text(bytes::Bytes::copy_from_slice(b)),
                other => other.clone(),
            };
            row.push(value);
        }
        let bytes = cost(&id.1, &row);
        if bytes > self.max_bytes / 16 {
            inner.remove(&id);
            return;
        }
        inner.remove(&id);
        inner.generation += 1;
        let generation = inner.generation;
        inner.bytes += bytes;
        inner.order.push_back((id.clone(), generation));
        inner.rows.insert(id, (generation, row));
        while inner.bytes > self.max_bytes {
            let Some((old_id, old_generation)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .rows
                .get(&old_id)
                .is_some_and(|(g, _)| *g == old_generation)
            {
                inner.remove(&old_id);
            }
        }
    }

    /// The remembered row for a DELETE's key, forgotten as it is taken.
    pub(crate) fn take(&self, relation: &Relation, key_tuple: &Tuple) -> Option<Tuple> {
        let key = key_of(relation, key_tuple)?;
        let mut inner = self.lock();
        let id = (relation.id, key);
        let row = inner.rows.get(&id).map(|(_, row)| row.clone());
        inner.remove(&id);
        row
    }

    /// Bytes the remembered rows cost now, and how many there are.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.bytes, inner.rows.len())
    }
}

impl Inner {
    fn remove(&mut self, id: &(u32, Key)) {
        if let Some((_, row)) = self.rows.remove(id) {
            self.bytes = self.bytes.saturating_sub(cost(&id.1, &row));
        }
        // Its entry in `order` stays until it comes up (its generation no longer matches).
        if self.order.len() > 2 * self.rows.len() + 1024 {
            let rows = &self.rows;
            self.order
                .retain(|(id, g)| rows.get(id).is_some_and(|(current, _)| current == g));
        }
    }
}

/// The primary-key (replica identity) values of a tuple, when all of them are known.
fn key_of(relation: &Relation, tuple: &Tuple) -> Option<Key> {
    let key: Option<Key> = relation
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_key)
        .map(|(i, _)| tuple.get(i)?.as_str().map(Box::from))
        .collect();
    key.filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use realtime_wal_listener::{Column, PgType, ReplicaIdentity};
    use std::sync::Arc;

    fn relation(identity: ReplicaIdentity) -> Relation {
        let ty = Arc::new(PgType::new(
            25,
            "text",
            realtime_wal_listener::value::ValueKind::Text,
        ));
        let column = |name: &str, is_key| Column {
            name: name.into(),
            is_key,
            type_oid: 25,
            type_modifier: -1,
            pg_type: ty.clone(),
        };
        Relation {
            id: 7,
            schema: "public".into(),
            table: "t".into(),
            replica_identity: identity,
            columns: vec![
                column("id", true),
                column("owner", false),
                column("body", false),
            ],
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rows_are_remembered_merged_and_forgotten_oldest_first() {
        let r = relation(ReplicaIdentity::Default);
        let memory = RowMemory::new(16 * 1024);
        memory.remember(&r, &vec![text("1"), text("alice"), text("hi")], None);
        // An UPDATE that did not send the TOASTed body keeps the remembered one.
        memory.remember(
            &r,
            &vec![text("1"), text("bob"), TupleValue::UnchangedToast],
            None,
        );
        let key = vec![text("1"), TupleValue::Null, TupleValue::Null];
        let row = memory.take(&r, &key).expect("remembered");
        assert_eq!(row, vec![text("1"), text("bob"), text("hi")]);
        assert!(memory.take(&r, &key).is_none(), "taken once");
        // Past the budget, the oldest rows go first.
        for i in 0..1000 {
            memory.remember(&r, &vec![text(&i.to_string()), text("o"), text("b")], None);
        }
        let (bytes, rows) = memory.usage();
        assert!(
            bytes <= 16 * 1024 && rows > 10,
            "{bytes} bytes, {rows} rows"
        );
        assert!(
            memory
                .take(&r, &vec![text("0"), TupleValue::Null, TupleValue::Null])
                .is_none()
        );
        assert!(
            memory
                .take(&r, &vec![text("999"), TupleValue::Null, TupleValue::Null])
                .is_some()
        );
        // A row whose value is still unknown is not remembered; FULL tables need no memory.
        memory.remember(
            &r,
            &vec![text("5000"), text("o"), TupleValue::UnchangedToast],
            None,
        );
        assert!(
            memory
                .take(&r, &vec![text("5000"), TupleValue::Null, TupleValue::Null])
                .is_none()
        );
        let full = relation(ReplicaIdentity::Full);
        memory.remember(&full, &vec![text("1"), text("o"), text("b")], None);
        assert!(
            memory
                .take(&full, &vec![text("1"), text("o"), text("b")])
                .is_none()
        );
    }
}
