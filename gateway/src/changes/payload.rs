//! The `postgres_changes` payload (protocol.md §7.4–7.6), built from a WAL change.
//!
//! `data` depends only on the change and the *shape* (which columns the subscriber's role may see,
//! the `select` list, RLS), so it is built once per shape and shared by every channel of that
//! shape; only the `ids` wrapper differs per channel.

use super::subscription::TableBinding;
use realtime_wal_listener::value;
use realtime_wal_listener::{Change, OldTuple, Relation, ReplicaIdentity, Tuple, TupleValue};
use std::sync::Arc;

/// Values whose JSON text is at most this long survive a 413 (oversized record).
const SMALL_FIELD_BYTES: usize = 64;

/// Which columns a subscription delivers, by value (equal shapes build equal payloads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shape(Arc<ShapeSpec>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShapeSpec {
    schema: String,
    table: String,
    /// Delivered columns known at subscribe time.
    visible: Vec<String>,
    /// Every column known at subscribe time.
    known: Vec<String>,
    /// Columns not known at subscribe time (added later) are delivered when the role could
    /// select the whole table and there is no `select` list.
    unknown_visible: bool,
    pk: Vec<String>,
    pk_selectable: bool,
    rls: bool,
}

impl Shape {
    pub(crate) fn from_spec(spec: Arc<ShapeSpec>) -> Shape {
        Shape(spec)
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<ShapeSpec> {
        Arc::downgrade(&self.0)
    }

    /// The same interned shape (pointer equality).
    pub(crate) fn same(&self, other: &Shape) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub(crate) fn of(binding: &TableBinding) -> Shape {
        let access = &binding.access;
        let delivered = |name: &str, is_pk: bool| match &binding.select {
            Some(select) => is_pk || select.iter().any(|s| s == name),
            None => true,
        };
        let visible = access
            .columns
            .iter()
            .filter(|c| c.selectable && delivered(&c.name, c.is_pk))
            .map(|c| c.name.clone())
            .collect();
        Shape(Arc::new(ShapeSpec {
            schema: access.schema.clone(),
            table: access.table.clone(),
            visible,
            known: access.columns.iter().map(|c| c.name.clone()).collect(),
            unknown_visible: binding.select.is_none()
                && access.columns.iter().all(|c| c.selectable),
            pk: access
                .columns
                .iter()
                .filter(|c| c.is_pk)
                .map(|c| c.name.clone())
                .collect(),
            pk_selectable: access.pk_selectable,
            rls: access.rls,
        }))
    }

    fn delivers(&self, name: &str) -> bool {
        self.0.visible.iter().any(|v| v == name)
            || (self.0.unknown_visible && !self.0.known.iter().any(|k| k == name))
    }
}

/// Appends `{"ids":[…],"data":…}` to `out`.
pub(crate) fn write_message(out: &mut String, ids: &[u32], data: &str) {
    use std::fmt::Write;
    out.reserve(data.len() + 16 + ids.len() * 11);
    out.push_str("{\"ids\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{id}");
    }
    out.push_str("],\"data\":");
    out.push_str(data);
    out.push('}');
}

/// The `data` object of one change for one shape.
///
/// `old_row` is the whole old row of a DELETE of an RLS table whose visibility was judged on it
/// (from the WAL with `REPLICA IDENTITY FULL`, or remembered): those who get the change get the
/// old record, in the columns their shape delivers. Without it such a DELETE carries the
/// primary key only, as the reference's does.
pub(crate) fn data(
    shape: &Shape,
    relation: &Relation,
    change: &Change,
    old_row: Option<&Tuple>,
    commit_micros: i64,
    max_record_bytes: usize,
) -> String {
    let spec = &shape.0;
    let (kind, new, old) = match change {
        Change::Insert { new, .. } => ("INSERT", Some(new), None),
        Change::Update { new, old, .. } => ("UPDATE", Some(new), old.as_ref()),
        Change::Delete { old, .. } => ("DELETE", None, old.as_ref()),
        _ => return String::new(),
    };
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"schema\":");
    value::write_string(&mut out, &spec.schema);
    out.extend_from_slice(b",\"table\":");
    value::write_string(&mut out, &spec.table);

    if kind != "DELETE" && (spec.pk.is_empty() || !spec.pk_selectable) {
        let error = if spec.pk.is_empty() {
            "Error 400: Bad Request, no primary key"
        } else {
            "Error 401: Unauthorized"
        };
        out.extend_from_slice(b",\"commit_timestamp\":null,\"type\":");
        value::write_string(&mut out, kind);
        out.extend_from_slice(b",\"columns\":[],\"record\":{}");
        if kind == "UPDATE" {
            out.extend_from_slice(b",\"old_record\":{}");
        }
        out.extend_from_slice(b",\"errors\":[");
        value::write_string(&mut out, error);
        out.extend_from_slice(b"]}");
        return String::from_utf8(out).unwrap_or_default();
    }

    out.extend_from_slice(b",\"commit_timestamp\":");
    value::write_string(&mut out, &commit_timestamp(commit_micros));
    out.extend_from_slice(b",\"type\":");
    value::write_string(&mut out, kind);
    out.extend_from_slice(b",\"columns\":[");
    let mut first = true;
    for col in relation.columns.iter().filter(|c| shape.delivers(&c.name)) {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"name\":");
        value::write_string(&mut out, &col.name);
        out.extend_from_slice(b",\"type\":");
        value::write_string(&mut out, &col.pg_type.name);
        out.push(b'}');
    }
    out.push(b']');

    let full_old = match old {
        Some(OldTuple::Full(t)) => Some(t),
        _ => None,
    };
    // DELETE on an RLS table: only primary-key columns leave (deletes cannot be RLS-checked).
    let pk_only_old = kind == "DELETE" && spec.rls;
    let old_tuple: Option<(&Tuple, Columns)> = match (kind, old) {
        ("DELETE", _) if spec.rls && old_row.is_some() => old_row.map(|t| (t, Columns::All)),
        (_, Some(_)) if pk_only_old => old.map(|o| (o.tuple(), Columns::PrimaryKey)),
        (_, Some(OldTuple::Key(t))) => Some((t, Columns::Identity)),
        (_, Some(OldTuple::Full(t))) => Some((t, Columns::All)),
        // UPDATE that kept its key: the identity columns come from the new row.
        ("UPDATE", None) => match relation.replica_identity {
            ReplicaIdentity::Nothing => None,
            _ => new.map(|t| (t, Columns::Identity)),
        },
        _ => None,
    };

    let mut record = Vec::new();
    let mut old_record = Vec::new();
    let render = |limit: Option<usize>, record: &mut Vec<u8>, old_record: &mut Vec<u8>| {
        record.clear();
        old_record.clear();
        if let Some(new) = new {
            write_object(record, shape, relation, new, full_old, Columns::All, limit);
        }
        match old_tuple {
            Some((t, columns)) => {
                write_object(old_record, shape, relation, t, None, columns, limit)
            }
            None => old_record.extend_from_slice(b"{}"),
        }
    };
    render(None, &mut record, &mut old_record);
    let too_large = record.len() + old_record.len() > max_record_bytes;
    if too_large {
        render(Some(SMALL_FIELD_BYTES), &mut record, &mut old_record);
    }
    if new.is_some() {
        out.extend_from_slice(b",\"record\":");
        out.extend_from_slice(&record);
    }
    if kind != "INSERT" {
        out.extend_from_slice(b",\"old_record\":");
        out.extend_from_slice(&old_record);
    }
    if too_large {
        out.extend_from_slice(b",\"errors\":[\"Error 413: Payload Too Large\"]}");
    } else {
        out.extend_from_slice(b",\"errors\":null}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Which columns of a tuple an object carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Columns {
    All,
    /// Replica identity columns (and the primary key).
    Identity,
    /// Primary-key columns only (DELETE on an RLS table).
    PrimaryKey,
}

/// Writes the delivered columns of a tuple as a JSON object. Unchanged TOAST values are taken
/// from `fallback` (the full old row) when present, else left out; `limit` keeps only values
/// whose JSON is at most that long.
fn write_object(
    out: &mut Vec<u8>,
    shape: &Shape,
    relation: &Relation,
    tuple: &Tuple,
    fallback: Option<&Tuple>,
    columns: Columns,
    limit: Option<usize>,
) {
    out.push(b'{');
    let mut first = true;
    let mut scratch = Vec::new();
    for (i, col) in relation.columns.iter().enumerate() {
        if !shape.delivers(&col.name) {
            continue;
        }
        let is_pk = shape.0.pk.contains(&col.name);
        let wanted = match columns {
            Columns::All => true,
            Columns::Identity => col.is_key || is_pk,
            Columns::PrimaryKey => is_pk,
        };
        if !wanted {
            continue;
        }
        let mut v = tuple.get(i);
        if let Some(TupleValue::UnchangedToast) = v {
            v = fallback.and_then(|t| t.get(i));
        }
        scratch.clear();
        match v {
            None | Some(TupleValue::UnchangedToast) => continue,
            Some(TupleValue::Null) => scratch.extend_from_slice(b"null"),
            Some(v) => match v.as_str() {
                Some(text) => value::write_json(&mut scratch, &col.pg_type.kind, text),
                None => scratch.extend_from_slice(b"null"),
            },
        }
        if limit.is_some_and(|l| scratch.len() > l) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        value::write_string(out, &col.name);
        out.push(b':');
        out.extend_from_slice(&scratch);
    }
    out.push(b'}');
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from microseconds since the Unix epoch.
pub(crate) fn commit_timestamp(micros: i64) -> String {
    let millis = micros.div_euclid(1000);
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_timestamps() {
        assert_eq!(commit_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            commit_timestamp(1_735_732_800_123_456),
            "2025-01-01T12:00:00.123Z"
        );
        assert_eq!(
            commit_timestamp(951_782_400_000_000),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn message_wraps_ids() {
        let mut out = String::new();
        write_message(&mut out, &[1, 22], "{}");
        assert_eq!(out, r#"{"ids":[1,22],"data":{}}"#);
    }
}
