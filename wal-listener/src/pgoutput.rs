//! Sans-IO decoder for the `pgoutput` logical decoding protocol, version 1.
//!
//! Input is the payload of one `XLogData` message (the bytes after its 25-byte header); output is one
//! [`PgOutputMessage`] or a [`DecodeError`]. The decoder never panics: every read is checked against the
//! remaining length, counts are validated before anything is allocated, and trailing bytes are an error.
//! Values are kept as slices of the input buffer ([`bytes::Bytes`]), so decoding a change costs one
//! vector per tuple and no copy of the column data.
//!
//! Two distinctions that Realtime payloads need are preserved rather than folded away:
//! - [`TupleValue::UnchangedToast`]: an UPDATE did not touch a TOASTed column and Postgres did not send
//!   it. It is not NULL; the consumer must leave the column out (or fill it from the old tuple).
//! - [`OldTuple::Key`] versus [`OldTuple::Full`]: with replica identity DEFAULT / USING INDEX the old
//!   tuple holds only the key columns (others are NULL placeholders); with FULL it is the whole old row.
//!
//! Protocol version 1 is negotiated: a transaction is sent only once its commit has been decoded, so
//! every change seen here belongs to a committed transaction. Streaming of in-progress transactions
//! (version 2) is not requested.

use bytes::Bytes;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lsn::Lsn;

/// A pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it announced.
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    /// A tuple column had an unknown kind byte.
    #[error("unknown tuple column kind {0:#04x}")]
    UnknownColumnKind(u8),
    /// A sub-message marker (`N`, `K`, `O`) was not the one expected.
    #[error("unexpected tuple marker {0:#04x}")]
    UnexpectedMarker(u8),
    /// A count or length field was negative or larger than the remaining message.
    #[error("invalid {0} in pgoutput message")]
    InvalidLength(&'static str),
    /// A name was not valid UTF-8 (the connection asks for UTF-8).
    #[error("name is not valid utf-8")]
    InvalidUtf8,
    /// Bytes were left after the message was fully decoded.
    #[error("{0} trailing bytes after pgoutput message")]
    TrailingBytes(usize),
}

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000)
    }

    /// The timestamp as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        let us = self.unix_micros();
        if us >= 0 {
            UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
        }
    }

    /// The current time.
    pub fn now() -> PgTimestamp {
        let us = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        PgTimestamp(us - PG_EPOCH_UNIX_SECS * 1_000_000)
    }

    /// UTC with millisecond precision, `YYYY-MM-DDTHH:MM:SS.mmmZ`: the Realtime `commit_timestamp`
    /// format (protocol.md §7.4). Milliseconds are truncated, not rounded.
    pub fn to_rfc3339_millis(self) -> String {
        let us = self.unix_micros();
        let secs = us.div_euclid(1_000_000);
        let millis = us.rem_euclid(1_000_000) / 1000;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }
}

impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339_millis())
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm, in era arithmetic of 400-year cycles.
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(RelationBody),
    Type(TypeBody),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

/// `B`: start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record (the transaction's "final" LSN).
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    /// LSN of the commit record; equal to [`Begin::final_lsn`].
    pub commit_lsn: Lsn,
    /// End of the commit record: confirming this position tells Postgres the transaction is done.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// `O`: the transaction was replicated from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Replica identity setting of a relation (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (if any).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
    /// Any other byte, kept for forward compatibility.
    Other(u8),
}

impl ReplicaIdentity {
    pub(crate) fn from_byte(b: u8) -> Self {
        match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => ReplicaIdentity::Other(other),
        }
    }
}

/// One column of a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// `R`: the shape of a table, sent before the first change to it in a session and after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// `Y`: a non-builtin type used by a following relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeBody {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that Postgres did not send. Not NULL: the value is unknown here.
    UnchangedToast,
    /// `t`: the value in the type's text output form.
    Text(Bytes),
    /// `b`: the value in binary form (only with the `binary` option, which is not requested).
    Binary(Bytes),
}

impl TupleValue {
    /// The text form as `&str`, if this is a text value in valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TupleValue::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// The column values of one row, in attribute order.
pub type Tuple = Vec<TupleValue>;

/// The old row sent with an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns carry values (others are NULL placeholders).
    Key(Tuple),
    /// `O`: the whole old row (replica identity FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// `I`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

/// `U`; `old` is absent when the key did not change and replica identity is not FULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_id: u32,
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

/// `D`; `old` is absent only with replica identity NOTHING (Postgres then sends no DELETE at all for
/// published tables, but the decoder accepts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: Option<OldTuple>,
}

/// `T`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// `M`: a message from `pg_logical_emit_message` (only with the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Checked reads over one message.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.u64(what).map(Lsn)
    }

    fn timestamp(&mut self, what: &'static str) -> Result<PgTimestamp, DecodeError> {
        Ok(PgTimestamp(self.u64(what)? as i64))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8)?;
        let s = s.to_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(what));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// A non-negative count whose items take at least `min_item` bytes each.
    fn count(
        &mut self,
        raw: i64,
        min_item: usize,
        what: &'static str,
    ) -> Result<usize, DecodeError> {
        let n = usize::try_from(raw).map_err(|_| DecodeError::InvalidLength(what))?;
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(DecodeError::InvalidLength(what));
        }
        Ok(n)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let raw = self.i16("tuple column count")?;
        let n = self.count(i64::from(raw), 1, "tuple column count")?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8("tuple column kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let raw = self.i32("tuple value length")?;
                    let len = usize::try_from(raw)
                        .map_err(|_| DecodeError::InvalidLength("tuple value length"))?;
                    let data = self.bytes(len, "tuple value")?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(other)),
            };
            values.push(v);
        }
        Ok(values)
    }

    fn new_tuple(&mut self) -> Result<Tuple, DecodeError> {
        match self.u8("new tuple marker")? {
            b'N' => self.tuple(),
            other => Err(DecodeError::UnexpectedMarker(other)),
        }
    }
}

/// Decodes one pgoutput message. `buf` must hold exactly one message.
pub fn decode(buf: Bytes) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let msg = match r.u8("message tag")? {
        b'B' => PgOutputMessage::Begin(Begin {
            final_lsn: r.lsn("begin final lsn")?,
            commit_time: r.timestamp("begin commit time")?,
            xid: r.u32("begin xid")?,
        }),
        b'C' => PgOutputMessage::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("commit end lsn")?,
            commit_time: r.timestamp("commit time")?,
        }),
        b'O' => PgOutputMessage::Origin(Origin {
            commit_lsn: r.lsn("origin lsn")?,
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = ReplicaIdentity::from_byte(r.u8("replica identity")?);
            let raw = r.i16("relation column count")?;
            // flags (1) + name (>= 1) + type oid (4) + type modifier (4)
            let n = r.count(i64::from(raw), 10, "relation column count")?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 != 0,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            PgOutputMessage::Relation(RelationBody {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutputMessage::Type(TypeBody {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => PgOutputMessage::Insert(Insert {
            relation_id: r.u32("insert relation id")?,
            new: r.new_tuple()?,
        }),
        b'U' => {
            let relation_id = r.u32("update relation id")?;
            let (old, new) = match r.u8("update tuple marker")? {
                b'K' => (Some(OldTuple::Key(r.tuple()?)), r.new_tuple()?),
                b'O' => (Some(OldTuple::Full(r.tuple()?)), r.new_tuple()?),
                b'N' => (None, r.tuple()?),
                other => return Err(DecodeError::UnexpectedMarker(other)),
            };
            PgOutputMessage::Update(Update {
                relation_id,
                old,
                new,
            })
        }
        b'D' => {
            let relation_id = r.u32("delete relation id")?;
            let old = match r.u8("delete tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(DecodeError::UnexpectedMarker(other)),
            };
            PgOutputMessage::Delete(Delete {
                relation_id,
                old: Some(old),
            })
        }
        b'T' => {
            let raw = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let n = r.count(i64::from(raw), 4, "truncate relation count")?;
            let mut relation_ids = Vec::with_capacity(n);
            for _ in 0..n {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            PgOutputMessage::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            })
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.lsn("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let raw = r.i32("message length")?;
            let len =
                usize::try_from(raw).map_err(|_| DecodeError::InvalidLength("message length"))?;
            let content = r.bytes(len, "message content")?;
            PgOutputMessage::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match r.remaining() {
        0 => Ok(msg),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_bytes(out: &mut Vec<u8>, cols: &[Option<&[u8]>]) {
        out.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for c in cols {
            match c {
                None => out.push(b'n'),
                Some(b"\0toast") => out.push(b'u'),
                Some(v) => {
                    out.push(b't');
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
            }
        }
    }

    fn relation() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&16385u32.to_be_bytes());
        m.extend_from_slice(b"public\0todos\0f");
        m.extend_from_slice(&2i16.to_be_bytes());
        m.push(1);
        m.extend_from_slice(b"id\0");
        m.extend_from_slice(&20u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m.push(0);
        m.extend_from_slice(b"body\0");
        m.extend_from_slice(&25u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m
    }

    #[test]
    fn decodes_relation() {
        let PgOutputMessage::Relation(r) = decode(Bytes::from(relation())).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.id, 16385);
        assert_eq!(r.namespace, "public");
        assert_eq!(r.name, "todos");
        assert_eq!(r.replica_identity, ReplicaIdentity::Full);
        assert_eq!(r.columns.len(), 2);
        assert!(r.columns[0].is_key);
        assert_eq!(r.columns[1].name, "body");
        assert_eq!(r.columns[1].type_oid, 25);
    }

    #[test]
    fn decodes_update_with_old_tuple_and_unchanged_toast() {
        let mut m = vec![b'U'];
        m.extend_from_slice(&7u32.to_be_bytes());
        m.push(b'O');
        tuple_bytes(&mut m, &[Some(b"1"), None]);
        m.push(b'N');
        tuple_bytes(&mut m, &[Some(b"2"), Some(b"\0toast")]);
        let PgOutputMessage::Update(u) = decode(Bytes::from(m)).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(u.relation_id, 7);
        assert_eq!(
            u.old,
            Some(OldTuple::Full(vec![
                TupleValue::Text(Bytes::from_static(b"1")),
                TupleValue::Null
            ]))
        );
        assert_eq!(u.new[1], TupleValue::UnchangedToast);
        assert_eq!(u.new[0].as_str(), Some("2"));
    }

    #[test]
    fn decodes_begin_commit_truncate_message() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x100u64.to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&42u32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(b)).unwrap(),
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(0x100),
                commit_time: PgTimestamp(0),
                xid: 42
            })
        );
        let mut t = vec![b'T'];
        t.extend_from_slice(&2u32.to_be_bytes());
        t.push(3);
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(t)).unwrap(),
            PgOutputMessage::Truncate(Truncate {
                cascade: true,
                restart_identity: true,
                relation_ids: vec![1, 2]
            })
        );
        let mut msg = vec![b'M', 1];
        msg.extend_from_slice(&5u64.to_be_bytes());
        msg.extend_from_slice(b"p\0");
        msg.extend_from_slice(&2i32.to_be_bytes());
        msg.extend_from_slice(b"hi");
        let PgOutputMessage::Message(m) = decode(Bytes::from(msg)).unwrap() else {
            panic!("not a message")
        };
        assert!(m.transactional);
        assert_eq!(&m.content[..], b"hi");
    }

    #[test]
    fn every_prefix_of_a_valid_message_is_an_error() {
        let full = relation();
        for n in 0..full.len() {
            assert!(
                decode(Bytes::copy_from_slice(&full[..n])).is_err(),
                "prefix {n}"
            );
        }
        let mut extra = full.clone();
        extra.push(0);
        assert_eq!(
            decode(Bytes::from(extra)),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut m = vec![b'I', 0, 0, 0, 1, b'N'];
        m.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(matches!(
            decode(Bytes::from(m)),
            Err(DecodeError::InvalidLength(_))
        ));
        let mut t = vec![b'T'];
        t.extend_from_slice(&u32::MAX.to_be_bytes());
        t.push(0);
        assert!(decode(Bytes::from(t)).is_err());
        let mut v = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        v.extend_from_slice(&(-5i32).to_be_bytes());
        assert!(decode(Bytes::from(v)).is_err());
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        // A small xorshift generator: deterministic, no dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let tags = b"BCORYIUDTMxN";
        for i in 0..20_000 {
            let len = i % 64;
            let mut buf = Vec::with_capacity(len + 1);
            buf.push(tags[i % tags.len()]);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.push((state & 0xFF) as u8);
            }
            let _ = decode(Bytes::from(buf));
        }
    }

    #[test]
    fn commit_timestamp_format() {
        assert_eq!(
            PgTimestamp(0).to_rfc3339_millis(),
            "2000-01-01T00:00:00.000Z"
        );
        // 2025-01-01T12:00:00.123456Z
        let unix_us: i64 = 1_735_732_800_123_456;
        let ts = PgTimestamp(unix_us - PG_EPOCH_UNIX_SECS * 1_000_000);
        assert_eq!(ts.to_rfc3339_millis(), "2025-01-01T12:00:00.123Z");
        assert_eq!(
            PgTimestamp(-1).to_rfc3339_millis(),
            "1999-12-31T23:59:59.999Z"
        );
    }
}
