//! A transaction part as bytes, for handing decoded changes to other processes (the cluster's
//! shared change log): [`encode`] writes one [`Transaction`] part, [`decode`] reads it back
//! equal to what was written.
//!
//! The format is versioned and self-contained: every part carries the relations its changes
//! refer to (each once), so a reader needs nothing from the stream before it. Integers are
//! little-endian; strings and byte strings are a `u32` length and the bytes. [`decode`] never
//! panics and never allocates more than the input can hold: every count is checked against the
//! bytes left before anything is reserved.

use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::PgType;
use crate::change::{Budget, Change, Column, Relation, Transaction};
use crate::lsn::Lsn;
use crate::pgoutput::{OldTuple, PgTimestamp, ReplicaIdentity, Tuple, TupleValue};
use crate::value::ValueKind;

/// The format written by [`encode`].
const VERSION: u8 = 1;
/// Arrays of arrays nest at most this deep (Postgres arrays of a type are one level; domains
/// over arrays add none).
const MAX_KIND_DEPTH: u32 = 8;

/// Why bytes are not a transaction part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("ends early, at byte {0}")]
    Truncated(usize),
    #[error("bad {what} at byte {at}")]
    Invalid { what: &'static str, at: usize },
    #[error("{0} bytes after the end")]
    Trailing(usize),
}

/// Appends `tx` to `out`.
pub fn encode(tx: &Transaction, out: &mut Vec<u8>) {
    // The changes first, into their own buffer, collecting the relations they use.
    let mut relations: Vec<&Relation> = Vec::new();
    let mut index_of = |relation| index_of(&mut relations, relation);
    let mut body = Vec::new();
    put_u32(&mut body, tx.changes.len() as u32);
    for change in &tx.changes {
        match change {
            Change::Insert { relation, new } => {
                body.push(b'I');
                put_u32(&mut body, index_of(relation));
                put_tuple(&mut body, new);
            }
            Change::Update { relation, old, new } => {
                body.push(b'U');
                put_u32(&mut body, index_of(relation));
                put_old(&mut body, old.as_ref());
                put_tuple(&mut body, new);
            }
            Change::Delete { relation, old } => {
                body.push(b'D');
                put_u32(&mut body, index_of(relation));
                put_old(&mut body, old.as_ref());
            }
            Change::Truncate {
                relations: truncated,
                cascade,
                restart_identity,
            } => {
                body.push(b'T');
                put_u32(&mut body, truncated.len() as u32);
                for relation in truncated {
                    put_u32(&mut body, index_of(relation));
                }
                body.push(u8::from(*cascade));
                body.push(u8::from(*restart_identity));
            }
            Change::Message {
                transactional,
                prefix,
                content,
            } => {
                body.push(b'M');
                body.push(u8::from(*transactional));
                put_bytes(&mut body, prefix.as_bytes());
                put_bytes(&mut body, content);
            }
        }
    }

    out.push(VERSION);
    put_u32(out, tx.xid);
    put_u64(out, tx.commit_lsn.0);
    put_u64(out, tx.end_lsn.0);
    put_u64(out, tx.commit_time.0 as u64);
    put_u32(out, tx.chunk);
    out.push(u8::from(tx.last));
    match &tx.origin {
        None => out.push(0),
        Some(origin) => {
            out.push(1);
            put_bytes(out, origin.as_bytes());
        }
    }
    put_u32(out, relations.len() as u32);
    for relation in relations {
        put_relation(out, relation);
    }
    out.extend_from_slice(&body);
}

/// Reads one part written by [`encode`]; the whole of `bytes` must be that part.
pub fn decode(bytes: &[u8]) -> Result<Transaction, WireError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let xid = r.u32()?;
    let commit_lsn = Lsn(r.u64()?);
    let end_lsn = Lsn(r.u64()?);
    let commit_time = PgTimestamp(r.u64()? as i64);
    let chunk = r.u32()?;
    let last = r.flag("last")?;
    let origin = if r.flag("origin")? {
        Some(r.string()?)
    } else {
        None
    };
    // A relation takes at least 15 bytes; a change at least 5.
    let count = r.count(15)?;
    let mut relations = Vec::with_capacity(count);
    for _ in 0..count {
        relations.push(Arc::new(r.relation()?));
    }
    let relation = |r: &mut Reader<'_>| -> Result<Arc<Relation>, WireError> {
        let at = r.at;
        let i = r.u32()? as usize;
        relations.get(i).cloned().ok_or(WireError::Invalid {
            what: "relation index",
            at,
        })
    };
    let count = r.count(2)?;
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        let at = r.at;
        let change = match r.u8()? {
            b'I' => Change::Insert {
                relation: relation(&mut r)?,
                new: r.tuple()?,
            },
            b'U' => Change::Update {
                relation: relation(&mut r)?,
                old: r.old()?,
                new: r.tuple()?,
            },
            b'D' => Change::Delete {
                relation: relation(&mut r)?,
                old: r.old()?,
            },
            b'T' => {
                let n = r.count(4)?;
                let mut truncated = Vec::with_capacity(n);
                for _ in 0..n {
                    truncated.push(relation(&mut r)?);
                }
                Change::Truncate {
                    relations: truncated,
                    cascade: r.flag("cascade")?,
                    restart_identity: r.flag("restart_identity")?,
                }
            }
            b'M' => Change::Message {
                transactional: r.flag("transactional")?,
                prefix: r.string()?,
                content: Bytes::copy_from_slice(r.bytes()?),
            },
            _ => {
                return Err(WireError::Invalid {
                    what: "change kind",
                    at,
                });
            }
        };
        changes.push(change);
    }
    if r.at != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - r.at));
    }
    Ok(Transaction {
        xid,
        commit_lsn,
        end_lsn,
        commit_time,
        origin,
        changes,
        chunk,
        last,
        budget: Budget::default(),
    })
}

/// The place of `relation` in `relations`, added at the end when it is not there yet.
fn index_of<'t>(relations: &mut Vec<&'t Relation>, relation: &'t Arc<Relation>) -> u32 {
    let found = relations
        .iter()
        .position(|r| std::ptr::eq(*r, &**relation) || **r == **relation);
    let i = found.unwrap_or_else(|| {
        relations.push(relation);
        relations.len() - 1
    });
    i as u32
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn put_relation(out: &mut Vec<u8>, relation: &Relation) {
    put_u32(out, relation.id);
    put_bytes(out, relation.schema.as_bytes());
    put_bytes(out, relation.table.as_bytes());
    // `pg_class.relreplident`'s own byte.
    out.push(match relation.replica_identity {
        ReplicaIdentity::Default => b'd',
        ReplicaIdentity::Nothing => b'n',
        ReplicaIdentity::Full => b'f',
        ReplicaIdentity::Index => b'i',
        ReplicaIdentity::Other(b) => b,
    });
    put_u32(out, relation.columns.len() as u32);
    for column in &relation.columns {
        put_bytes(out, column.name.as_bytes());
        out.push(u8::from(column.is_key));
        put_u32(out, column.type_oid);
        put_u32(out, column.type_modifier as u32);
        put_u32(out, column.pg_type.oid);
        put_bytes(out, column.pg_type.name.as_bytes());
        put_kind(out, &column.pg_type.kind);
        out.push(column.pg_type.delimiter);
    }
}

fn put_kind(out: &mut Vec<u8>, kind: &ValueKind) {
    match kind {
        ValueKind::Number => out.push(b'n'),
        ValueKind::Bool => out.push(b'b'),
        ValueKind::Json => out.push(b'j'),
        ValueKind::Date => out.push(b'd'),
        ValueKind::Timestamp => out.push(b't'),
        ValueKind::TimestampTz => out.push(b'z'),
        ValueKind::Bytea => out.push(b'x'),
        ValueKind::Text => out.push(b's'),
        ValueKind::Array { element, delimiter } => {
            out.push(b'a');
            out.push(*delimiter);
            put_kind(out, element);
        }
    }
}

fn put_tuple(out: &mut Vec<u8>, tuple: &Tuple) {
    put_u32(out, tuple.len() as u32);
    for value in tuple {
        match value {
            TupleValue::Null => out.push(b'n'),
            TupleValue::UnchangedToast => out.push(b'u'),
            TupleValue::Text(b) => {
                out.push(b't');
                put_bytes(out, b);
            }
            TupleValue::Binary(b) => {
                out.push(b'b');
                put_bytes(out, b);
            }
        }
    }
}

fn put_old(out: &mut Vec<u8>, old: Option<&OldTuple>) {
    match old {
        None => out.push(0),
        Some(OldTuple::Key(t)) => {
            out.push(b'K');
            put_tuple(out, t);
        }
        Some(OldTuple::Full(t)) => {
            out.push(b'O');
            put_tuple(out, t);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(WireError::Truncated(self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, WireError> {
        let at = self.at;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid { what, at }),
        }
    }

    /// A count of items of at least `min_size` bytes each, no more than the bytes left hold.
    fn count(&mut self, min_size: usize) -> Result<usize, WireError> {
        let at = self.at;
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.bytes.len() - self.at {
            return Err(WireError::Invalid { what: "count", at });
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, WireError> {
        let at = self.at;
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid { what: "text", at })
    }

    fn relation(&mut self) -> Result<Relation, WireError> {
        let id = self.u32()?;
        let schema = self.string()?;
        let table = self.string()?;
        let replica_identity = ReplicaIdentity::from_byte(self.u8()?);
        // A column takes at least 23 bytes.
        let n = self.count(23)?;
        let mut columns = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.string()?;
            let is_key = self.flag("is_key")?;
            let type_oid = self.u32()?;
            let type_modifier = self.u32()? as i32;
            let oid = self.u32()?;
            let type_name = self.string()?;
            let kind = self.kind(0)?;
            let delimiter = self.u8()?;
            columns.push(Column {
                name,
                is_key,
                type_oid,
                type_modifier,
                pg_type: Arc::new(PgType {
                    oid,
                    name: type_name,
                    kind,
                    delimiter,
                }),
            });
        }
        Ok(Relation {
            id,
            schema,
            table,
            replica_identity,
            columns,
        })
    }

    fn kind(&mut self, depth: u32) -> Result<ValueKind, WireError> {
        let at = self.at;
        Ok(match self.u8()? {
            b'n' => ValueKind::Number,
            b'b' => ValueKind::Bool,
            b'j' => ValueKind::Json,
            b'd' => ValueKind::Date,
            b't' => ValueKind::Timestamp,
            b'z' => ValueKind::TimestampTz,
            b'x' => ValueKind::Bytea,
            b's' => ValueKind::Text,
            b'a' if depth < MAX_KIND_DEPTH => {
                let delimiter = self.u8()?;
                ValueKind::Array {
                    element: Box::new(self.kind(depth + 1)?),
                    delimiter,
                }
            }
            _ => {
                return Err(WireError::Invalid {
                    what: "type kind",
                    at,
                });
            }
        })
    }

    fn tuple(&mut self) -> Result<Tuple, WireError> {
        let n = self.count(1)?;
        let mut tuple = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.at;
            tuple.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => TupleValue::Text(Bytes::copy_from_slice(self.bytes()?)),
                b'b' => TupleValue::Binary(Bytes::copy_from_slice(self.bytes()?)),
                _ => return Err(WireError::Invalid { what: "value", at }),
            });
        }
        Ok(tuple)
    }

    fn old(&mut self) -> Result<Option<OldTuple>, WireError> {
        let at = self.at;
        Ok(match self.u8()? {
            0 => None,
            b'K' => Some(OldTuple::Key(self.tuple()?)),
            b'O' => Some(OldTuple::Full(self.tuple()?)),
            _ => {
                return Err(WireError::Invalid {
                    what: "old row",
                    at,
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn relation(id: u32, table: &str) -> Arc<Relation> {
        Arc::new(Relation {
            id,
            schema: "public".into(),
            table: table.into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    name: "id".into(),
                    is_key: true,
                    type_oid: 20,
                    type_modifier: -1,
                    pg_type: Arc::new(PgType::new(20, "int8", ValueKind::Number)),
                },
                Column {
                    name: "tags".into(),
                    is_key: false,
                    type_oid: 1009,
                    type_modifier: -1,
                    pg_type: Arc::new(PgType::new(
                        1009,
                        "_text",
                        ValueKind::Array {
                            element: Box::new(ValueKind::Text),
                            delimiter: b',',
                        },
                    )),
                },
            ],
        })
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn sample() -> Transaction {
        let items = relation(16384, "items");
        let other = relation(16390, "other");
        Transaction {
            xid: 771,
            commit_lsn: Lsn(0x1_6B37_4D48),
            end_lsn: Lsn(0x1_6B37_4D78),
            commit_time: PgTimestamp(-5),
            origin: Some("upstream".into()),
            changes: vec![
                Change::Insert {
                    relation: items.clone(),
                    new: vec![text("1"), text("{a,b}")],
                },
                Change::Update {
                    relation: items.clone(),
                    old: Some(OldTuple::Full(vec![text("1"), TupleValue::Null])),
                    new: vec![text("1"), TupleValue::UnchangedToast],
                },
                Change::Delete {
                    relation: other.clone(),
                    old: Some(OldTuple::Key(vec![text("9"), TupleValue::Null])),
                },
                Change::Delete {
                    relation: items.clone(),
                    old: None,
                },
                Change::Truncate {
                    relations: vec![items, other],
                    cascade: true,
                    restart_identity: false,
                },
                Change::Message {
                    transactional: true,
                    prefix: "realtime".into(),
                    content: Bytes::from_static(b"\x00\xffpayload"),
                },
            ],
            chunk: 3,
            last: true,
            budget: Budget::default(),
        }
    }

    #[test]
    fn a_part_reads_back_as_written_with_each_relation_once() {
        let tx = sample();
        let mut out = Vec::new();
        encode(&tx, &mut out);
        let back = decode(&out).unwrap();
        assert_eq!(back, tx);
        // Changes of one relation share one decoded relation.
        match (&back.changes[0], &back.changes[1]) {
            (Change::Insert { relation: a, .. }, Change::Update { relation: b, .. }) => {
                assert!(Arc::ptr_eq(a, b));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out.windows(5).filter(|w| w == b"items").count(), 1);
    }

    #[test]
    fn an_empty_part_reads_back() {
        let tx = Transaction {
            xid: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: PgTimestamp(0),
            origin: None,
            changes: Vec::new(),
            chunk: 0,
            last: false,
            budget: Budget::default(),
        };
        let mut out = Vec::new();
        encode(&tx, &mut out);
        assert_eq!(decode(&out).unwrap(), tx);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_an_error_or_another_part_never_a_panic() {
        let mut out = Vec::new();
        encode(&sample(), &mut out);
        for end in 0..out.len() {
            assert!(decode(&out[..end]).is_err(), "cut at {end}");
        }
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0xff;
            let _ = decode(&bad);
        }
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(WireError::Trailing(1)));
        let mut other = out;
        other[0] = 2;
        assert_eq!(decode(&other), Err(WireError::Version(2)));
    }

    #[test]
    fn a_huge_count_is_refused_before_anything_is_reserved() {
        let mut out = Vec::new();
        out.push(VERSION);
        out.extend_from_slice(&[0; 4 + 8 + 8 + 8 + 4]);
        out.push(1); // last
        out.push(0); // no origin
        out.extend_from_slice(&u32::MAX.to_le_bytes()); // relations
        assert!(matches!(
            decode(&out),
            Err(WireError::Invalid { what: "count", .. })
        ));
    }

    fn value() -> impl Strategy<Value = TupleValue> {
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| TupleValue::Text(Bytes::from(b))),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| TupleValue::Binary(Bytes::from(b))),
        ]
    }

    fn change(relations: Vec<Arc<Relation>>) -> impl Strategy<Value = Change> {
        let n = relations.len();
        let pick = move |i: usize| relations[i % n].clone();
        let tuple = || proptest::collection::vec(value(), 0..4);
        let old = move || {
            prop_oneof![
                Just(None),
                tuple().prop_map(|t| Some(OldTuple::Key(t))),
                tuple().prop_map(|t| Some(OldTuple::Full(t))),
            ]
        };
        let p1 = pick.clone();
        let p2 = pick.clone();
        let p3 = pick.clone();
        let p4 = pick;
        prop_oneof![
            (any::<usize>(), tuple()).prop_map(move |(i, new)| Change::Insert {
                relation: p1(i),
                new
            }),
            (any::<usize>(), old(), tuple()).prop_map(move |(i, old, new)| Change::Update {
                relation: p2(i),
                old,
                new
            }),
            (any::<usize>(), old()).prop_map(move |(i, old)| Change::Delete {
                relation: p3(i),
                old
            }),
            (
                proptest::collection::vec(any::<usize>(), 0..3),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(move |(is, cascade, restart_identity)| Change::Truncate {
                    relations: is.into_iter().map(&p4).collect(),
                    cascade,
                    restart_identity,
                }),
            (
                any::<bool>(),
                "[a-z]{0,8}",
                proptest::collection::vec(any::<u8>(), 0..30)
            )
                .prop_map(|(transactional, prefix, content)| Change::Message {
                    transactional,
                    prefix,
                    content: Bytes::from(content),
                }),
        ]
    }

    fn transaction() -> impl Strategy<Value = Transaction> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
            proptest::option::of("[a-z]{0,6}"),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_flat_map(|(xid, commit, end, time, origin, chunk, last)| {
                let relations = vec![relation(1, "a"), relation(2, "b"), relation(3, "c")];
                proptest::collection::vec(change(relations), 0..12).prop_map(move |changes| {
                    Transaction {
                        xid,
                        commit_lsn: Lsn(commit),
                        end_lsn: Lsn(end),
                        commit_time: PgTimestamp(time),
                        origin: origin.clone(),
                        changes,
                        chunk,
                        last,
                        budget: Budget::default(),
                    }
                })
            })
    }

    proptest! {
        #[test]
        fn any_part_reads_back_as_written(tx in transaction()) {
            let mut out = Vec::new();
            encode(&tx, &mut out);
            prop_assert_eq!(decode(&out).unwrap(), tx);
        }

        #[test]
        fn any_bytes_are_an_error_or_a_part(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }
}
