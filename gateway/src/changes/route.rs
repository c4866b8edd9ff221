//! The path of a batch of committed transactions from the change source to the sockets.
//!
//! For a batch: evaluate every subscription's event and filters on each change ([`matching`]);
//! decide visibility for the rows of RLS tables, first by the row policies in process, then
//! one SQL check per (table, chunk of viewers) for what those could not decide
//! ([`visibility_flags`]); build each change's `data` once per shape and each distinct frame
//! once, and push into the sockets' outboxes without waiting ([`deliver`]). The caller
//! acknowledges the batch's last LSN afterwards.

use super::database_broadcast;
use super::deletes::{DeleteUnknown, RowMemory};
use super::index::{Index, Subscription, TableSubs};
use super::payload::{self, Shape};
use super::policy::{self, Undecided};
use super::replay::{Mode, Replay};
use super::subscription::{EventFilter, TableAccess, TableBinding};
use super::visibility::{self, Viewer};
use crate::db::Database;
use crate::outbox::{Frame, Mark};
use crate::resume::Phase;
use crate::resume::Position;
use crate::topics::Registry;
use futures_util::StreamExt;
use realtime_protocol::Vsn;
use realtime_wal_listener::{Change, OldTuple, Relation, Transaction, Tuple, TupleValue};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};

/// What a batch did, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchStats {
    pub(crate) changes: u64,
    pub(crate) frames: u64,
    pub(crate) dropped: u64,
    pub(crate) visibility_queries: u64,
    /// (viewer, row) visibility decided in process by the row policies.
    pub(crate) policy_decisions: u64,
    pub(crate) db_broadcasts: u64,
    /// Pushes that waited for a full outbox.
    pub(crate) waits: u64,
    /// DELETEs of RLS tables whose old row was not known (`DELETE_UNKNOWN` decided).
    pub(crate) deletes_unknown: u64,
    /// Frames queued to resuming channels from a replay.
    pub(crate) replayed: u64,
    /// Transactions (or parts) streamed again that no resuming channel needed.
    pub(crate) redelivered: u64,
}

/// A change with the subscriptions whose event and filters it passes.
struct Matched<'a> {
    at: Position,
    mode: Mode,
    xid: u32,
    commit_time: i64,
    relation: &'a Arc<Relation>,
    change: &'a Change,
    subs: Vec<Arc<Subscription>>,
    /// For a DELETE of an RLS table: the old row its visibility is judged on.
    old_row: OldRow<'a>,
}

/// The old row of a DELETE of an RLS table.
enum OldRow<'a> {
    /// Not such a DELETE.
    NotNeeded,
    /// From the WAL (`REPLICA IDENTITY FULL`).
    Wal(&'a Tuple),
    /// Remembered from the stream.
    Remembered(Tuple),
    /// Not known: `DELETE_UNKNOWN` decides.
    Unknown,
}

impl OldRow<'_> {
    fn tuple(&self) -> Option<&Tuple> {
        match self {
            OldRow::Wal(t) => Some(t),
            OldRow::Remembered(t) => Some(t),
            OldRow::NotNeeded | OldRow::Unknown => None,
        }
    }
}

/// What the batch path needs besides the batch.
pub(crate) struct Context<'a> {
    pub(crate) index: &'a Index,
    pub(crate) registry: &'a Registry,
    pub(crate) db: &'a Database,
    pub(crate) max_record_bytes: usize,
    /// How long a full outbox may pause the stream before its socket is closed as slow.
    pub(crate) slow_consumer: std::time::Duration,
    /// Rows of RLS tables as last seen, for DELETEs that carry only the key.
    pub(crate) deletes: &'a RowMemory,
    pub(crate) delete_unknown: DeleteUnknown,
}

/// Routes a batch of transactions. Every frame is queued when this returns.
pub(crate) async fn route(
    cx: &Context<'_>,
    replay: &mut Replay,
    batch: &[Transaction],
) -> BatchStats {
    let mut stats = BatchStats::default();
    let matched = matching(cx, replay, batch, &mut stats);
    if matched.is_empty() {
        return stats;
    }
    let visible = visibility_flags(cx.db, &matched, &mut stats).await;
    stats.deletes_unknown = matched
        .iter()
        .filter(|m| matches!(m.old_row, OldRow::Unknown))
        .count() as u64;
    deliver(cx, &matched, &visible, &mut stats).await;
    stats
}

/// The changes of the batch with the subscriptions they pass; broadcasts from the database are
/// delivered on the way. A change already routed live goes only to channels replaying it
/// (`replay`).
fn matching<'a>(
    cx: &Context<'_>,
    replay: &mut Replay,
    batch: &'a [Transaction],
    stats: &mut BatchStats,
) -> Vec<Matched<'a>> {
    let mut matched = Vec::new();
    let mut replaying: FastMap<u32, TableSubs> = FastMap::default();
    let mut replaying_session = replay.session();
    for tx in batch {
        let commit_time = tx.commit_time.unix_micros();
        let base = replay.begin(tx.commit_lsn.0, tx.chunk, tx.changes.len());
        let mut skipped = 0;
        for (i, change) in tx.changes.iter().enumerate() {
            let at = Position {
                lsn: tx.commit_lsn.0,
                index: base.saturating_add(i as u32),
            };
            let mode = replay.change(at);
            if mode == Mode::Skip {
                skipped += 1;
                continue;
            }
            let relation = match change {
                Change::Insert { relation, .. }
                | Change::Update { relation, .. }
                | Change::Delete { relation, .. } => relation,
                _ => continue,
            };
            if mode == Mode::Live {
                stats.changes += 1;
            }
            if let Change::Insert { new, .. } = change
                && database_broadcast::is_messages(relation)
            {
                // Broadcasts from the database are not replayed (resume is for changes).
                if mode == Mode::Replay {
                    continue;
                }
                stats.db_broadcasts +=
                    u64::from(database_broadcast::deliver(cx.registry, relation, new));
                continue;
            }
            let Some(subs) = cx.index.snapshot(relation.id) else {
                continue;
            };
            // A replayed change goes to replaying channels only: pick them out of the table's
            // subscriptions once per table and session, not once per change.
            let subs = match mode {
                Mode::Replay => {
                    if replaying_session != replay.session() {
                        replaying.clear();
                        replaying_session = replay.session();
                    }
                    replaying
                        .entry(relation.id)
                        .or_insert_with(|| {
                            Arc::new(
                                subs.iter()
                                    .filter(|s| {
                                        s.member
                                            .resume
                                            .as_ref()
                                            .is_some_and(|c| c.phase() == Phase::Replaying)
                                    })
                                    .cloned()
                                    .collect(),
                            )
                        })
                        .clone()
                }
                _ => subs,
            };
            let passing: Vec<_> = subs
                .iter()
                .filter(|s| {
                    Replay::admits(mode, s.member.resume.as_deref(), at)
                        && passes(&s.binding, relation, change)
                })
                .cloned()
                .collect();
            // The row memory follows the live stream only; a replay reads what it has.
            let old_row = old_row(cx.deletes, &subs, relation, change, mode == Mode::Live);
            if !passing.is_empty() {
                matched.push(Matched {
                    at,
                    mode,
                    xid: tx.xid,
                    commit_time,
                    relation,
                    change,
                    subs: passing,
                    old_row,
                });
            }
        }
        if skipped > 0 && skipped == tx.changes.len() {
            stats.redelivered += 1;
        }
    }
    matched
}

/// Keeps the row memory of an RLS table up to date, and finds a DELETE's old row.
fn old_row<'a>(
    memory: &RowMemory,
    subs: &[Arc<Subscription>],
    relation: &Relation,
    change: &'a Change,
    live: bool,
) -> OldRow<'a> {
    if !subs.first().is_some_and(|s| s.binding.access.rls) {
        return OldRow::NotNeeded;
    }
    if !live {
        return match change {
            Change::Delete {
                old: Some(OldTuple::Full(t)),
                ..
            } => OldRow::Wal(t),
            Change::Delete { .. } => OldRow::Unknown,
            _ => OldRow::NotNeeded,
        };
    }
    match change {
        Change::Insert { new, .. } => {
            memory.remember(relation, new, None);
            OldRow::NotNeeded
        }
        Change::Update { new, old, .. } => {
            let full = match old {
                Some(OldTuple::Full(t)) => Some(t),
                // The key changed: the row under the old key is gone.
                Some(OldTuple::Key(t)) => {
                    memory.take(relation, t);
                    None
                }
                None => None,
            };
            memory.remember(relation, new, full);
            OldRow::NotNeeded
        }
        Change::Delete {
            old: Some(OldTuple::Full(t)),
            ..
        } => OldRow::Wal(t),
        Change::Delete {
            old: Some(OldTuple::Key(t)),
            ..
        } => memory
            .take(relation, t)
            .map_or(OldRow::Unknown, OldRow::Remembered),
        _ => OldRow::Unknown,
    }
}

/// The rows of one table to check for one viewer: (viewer, table, indexes into the matched
/// changes).
type PendingCheck = (Arc<Viewer>, Arc<TableAccess>, Vec<usize>);

/// (viewer address, table OID).
type CheckKey = (usize, u32);

/// One viewer's rows of one table for the SQL check: (key, viewer, indexes into the matched
/// changes).
type TableCheck = (CheckKey, Arc<Viewer>, Vec<usize>);

/// The SQL check's answer for one viewer and table: (row index, visible).
type CheckedRows = (CheckKey, Vec<(usize, bool)>);

/// Per (viewer, table), one flag per matched change: whether the viewer may see its row.
type Visible = FastMap<CheckKey, Vec<bool>>;

/// Visibility of the INSERT/UPDATE rows of RLS tables, per (viewer, table).
async fn visibility_flags(
    db: &Database,
    matched: &[Matched<'_>],
    stats: &mut BatchStats,
) -> Visible {
    let pks: Vec<Option<Vec<String>>> = matched.iter().map(rls_key).collect();
    let mut checks: FastMap<CheckKey, PendingCheck> = FastMap::default();
    for (index, m) in matched.iter().enumerate() {
        if pks[index].is_none() && m.old_row.tuple().is_none() {
            continue;
        }
        for sub in &m.subs {
            if !needs_rls_check(sub) {
                continue;
            }
            let entry = checks
                .entry((viewer_key(&sub.viewer), sub.binding.access.oid))
                .or_insert_with(|| (sub.viewer.clone(), sub.binding.access.clone(), Vec::new()));
            if entry.2.last() != Some(&index) {
                entry.2.push(index);
            }
        }
    }
    let mut visible = Visible::default();
    if checks.is_empty() {
        return visible;
    }
    let (residual, policies) = decide_in_process(db, matched, checks, &mut visible, stats).await;
    if residual.is_empty() {
        return visible;
    }
    wait_visible(db, matched, &pks).await;
    let checked = check_in_sql(db, matched, &pks, &policies, residual, stats).await;
    for (key, rows) in checked {
        let flags = visible
            .entry(key)
            .or_insert_with(|| vec![false; matched.len()]);
        for (index, seen) in rows {
            flags[index] = seen;
        }
    }
    visible
}

/// Decides what the row policies can decide in process; returns the rows left for the SQL
/// check (new rows of INSERT/UPDATE, old rows of DELETE), and the policies read.
async fn decide_in_process(
    db: &Database,
    matched: &[Matched<'_>],
    checks: FastMap<CheckKey, PendingCheck>,
    visible: &mut Visible,
    stats: &mut BatchStats,
) -> (Vec<(CheckKey, PendingCheck)>, visibility::RowPolicies) {
    let mut pairs: Vec<(String, u32)> = checks
        .values()
        .map(|(viewer, access, _)| (viewer.role.clone(), access.oid))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let policies = match visibility::row_policies(db, &pairs).await {
        Ok(policies) => policies,
        Err(e) => {
            warn!(error = %e, "could not read row policies: every row checked in SQL");
            visibility::RowPolicies::default()
        }
    };
    let mut residual = Vec::new();
    for (key, (viewer, access, rows)) in checks {
        let compiled = policies.tables.get(&(viewer.role.clone(), access.oid));
        let caller = compiled.map(|_| viewer.caller(&policies.functions));
        let flags = visible
            .entry(key)
            .or_insert_with(|| vec![false; matched.len()]);
        let mut undecided = Vec::new();
        for index in rows {
            let m = &matched[index];
            let Some(tuple) = judged_row(m) else {
                continue;
            };
            let decision = match (compiled, &caller) {
                (Some(compiled), Some(caller)) => compiled.decide(
                    &WalRow {
                        relation: m.relation,
                        tuple,
                    },
                    caller,
                ),
                _ => Err(Undecided),
            };
            match decision {
                Ok(seen) => {
                    stats.policy_decisions += 1;
                    flags[index] = seen;
                }
                Err(Undecided) => undecided.push(index),
            }
        }
        if !undecided.is_empty() {
            residual.push((key, (viewer, access, undecided)));
        }
    }
    (residual, policies)
}

/// The row a change's visibility is judged on: the new row of an INSERT/UPDATE, the old row of
/// a DELETE (when known).
fn judged_row<'a>(m: &'a Matched<'_>) -> Option<&'a Tuple> {
    match (m.change, m.old_row.tuple()) {
        (Change::Insert { new, .. } | Change::Update { new, .. }, _) => Some(new),
        (Change::Delete { .. }, old) => old,
        _ => None,
    }
}

/// Waits until the batch's transactions are visible to new snapshots: a commit reaches the WAL
/// before the committing backend leaves the proc array, and an SQL check that runs earlier
/// would not see the row.
async fn wait_visible(db: &Database, matched: &[Matched<'_>], pks: &[Option<Vec<String>>]) {
    let mut xids: Vec<u32> = matched
        .iter()
        .zip(pks)
        .filter(|(_, pk)| pk.is_some())
        .map(|(m, _)| m.xid)
        .collect();
    xids.sort_unstable();
    xids.dedup();
    match visibility::wait_visible(db, &xids, VISIBILITY_WAIT).await {
        Ok(true) => {}
        Ok(false) => warn!(
            "committed transactions not yet visible after the wait: RLS checks may withhold rows"
        ),
        Err(e) => warn!(error = %e, "could not wait for committed transactions to be visible"),
    }
}

/// The rows of one table to check for the viewers of one role: (table, role, their checks).
type RoleGroup = (Arc<TableAccess>, String, Vec<TableCheck>);

/// One call of the SQL check: a chunk of viewers of one table (and, judged on values, of one
/// role) against the batch's rows.
enum SqlJob {
    /// The rows rebuilt from their values (as committed, or as they were before a DELETE), the
    /// role's policies applied to them by `sql` (built once per group; `None`: no permissive
    /// policy, nothing visible): positions into `rows`.
    Values {
        access: Arc<TableAccess>,
        sql: Option<Arc<str>>,
        rows: Arc<Vec<usize>>,
        part: Vec<TableCheck>,
    },
    /// The rows looked up in the table by key, as it is now: for rows whose values cannot be
    /// rebuilt (an unchanged TOAST value) or roles whose policies were not read.
    Keys {
        access: Arc<TableAccess>,
        keys: Arc<Vec<Vec<String>>>,
        part: Vec<TableCheck>,
    },
}

/// The SQL check, for the rows the policies could not decide in process. Rows are judged on
/// their own values, like the in-process path: per (table, role), the rows once, the viewers in
/// a few chunks, each chunk one statement (`realtime.visible_key_indexes`), run side by side.
async fn check_in_sql(
    db: &Database,
    matched: &[Matched<'_>],
    pks: &[Option<Vec<String>>],
    policies: &visibility::RowPolicies,
    residual: Vec<(CheckKey, PendingCheck)>,
    stats: &mut BatchStats,
) -> Vec<CheckedRows> {
    let mut groups: FastMap<(u32, usize), RoleGroup> = FastMap::default();
    let mut roles: HashMap<String, usize> = HashMap::new();
    for (key, (viewer, access, rows)) in residual {
        let next = roles.len();
        let role = *roles.entry(viewer.role.clone()).or_insert(next);
        groups
            .entry((access.oid, role))
            .or_insert_with(|| (access.clone(), viewer.role.clone(), Vec::new()))
            .2
            .push((key, viewer, rows));
    }
    let mut jobs = Vec::new();
    for (_, (access, role, entries)) in groups {
        let mut rows: Vec<usize> = entries
            .iter()
            .flat_map(|(_, _, r)| r.iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        let json: Option<Vec<serde_json::Value>> = rows
            .iter()
            .map(|&i| visibility::row_json(matched[i].relation, judged_row(&matched[i])?))
            .collect();
        let quals = policies.raw.get(&(role, access.oid));
        // Up to VISIBILITY_CONCURRENCY calls per group, none with fewer than MIN_CHUNK viewers.
        let chunk = entries
            .len()
            .div_ceil(VISIBILITY_CONCURRENCY)
            .max(MIN_CHUNK);
        let mut parts = Vec::new();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            parts.push(entries.by_ref().take(chunk).collect::<Vec<_>>());
        }
        let statement = quals
            .zip(json)
            .and_then(|(quals, json)| visibility::rows_statement(&access, quals, &json));
        match statement {
            Some(sql) => {
                let (rows, sql) = (Arc::new(rows), sql.map(Arc::<str>::from));
                for part in parts {
                    jobs.push(SqlJob::Values {
                        access: access.clone(),
                        sql: sql.clone(),
                        rows: rows.clone(),
                        part,
                    });
                }
            }
            None => {
                let keys = keys_of(pks, &rows);
                for part in parts {
                    jobs.push(SqlJob::Keys {
                        access: access.clone(),
                        keys: keys.clone(),
                        part,
                    });
                }
            }
        }
    }
    stats.visibility_queries = jobs.len() as u64;
    let checked: Vec<Vec<CheckedRows>> = futures_util::stream::iter(jobs)
        .map(|job| run_job(db, pks, job))
        .buffer_unordered(VISIBILITY_CONCURRENCY)
        .collect()
        .await;
    checked.into_iter().flatten().collect()
}

async fn run_job(db: &Database, pks: &[Option<Vec<String>>], job: SqlJob) -> Vec<CheckedRows> {
    match job {
        SqlJob::Keys { access, keys, part } => check_chunk(db, pks, access, keys, part).await,
        SqlJob::Values {
            access,
            sql,
            rows,
            part,
        } => match check_values(db, &access, sql.as_deref(), &rows, &part).await {
            Some(checked) => checked,
            // Without `realtime.visible_key_indexes` (migrations disabled) or on a failed call:
            // the rows by key, one check per viewer.
            None => check_chunk(db, pks, access, keys_of(pks, &rows), part).await,
        },
    }
}

/// The distinct primary keys of `rows` (INSERT/UPDATE rows of RLS tables have one), sorted.
fn keys_of(pks: &[Option<Vec<String>>], rows: &[usize]) -> Arc<Vec<Vec<String>>> {
    let mut keys: Vec<Vec<String>> = rows.iter().filter_map(|&i| pks[i].clone()).collect();
    keys.sort();
    keys.dedup();
    Arc::new(keys)
}

/// One chunk of viewers (of one role) against the rows rebuilt from their values.
async fn check_values(
    db: &Database,
    access: &TableAccess,
    sql: Option<&str>,
    rows: &[usize],
    part: &[TableCheck],
) -> Option<Vec<CheckedRows>> {
    let viewers: Vec<Arc<Viewer>> = part.iter().map(|(_, v, _)| v.clone()).collect();
    let Some(sql) = sql else {
        return Some(
            part.iter()
                .map(|(key, _, mine)| (*key, mine.iter().map(|&r| (r, false)).collect()))
                .collect(),
        );
    };
    let results = match visibility::visible_for_many_sql(db, &viewers, sql).await {
        Ok(results) => results,
        Err(e) => {
            debug!(table = %access.table, error = %e, "batched visibility check failed: checking by key per viewer");
            return None;
        }
    };
    let checked = part
        .iter()
        .zip(results)
        .map(|((key, _, mine), seen)| {
            let seen = seen.unwrap_or_default();
            let mine = mine
                .iter()
                .copied()
                .map(|row| {
                    let visible = rows
                        .binary_search(&row)
                        .is_ok_and(|position| seen.contains(&position));
                    (row, visible)
                })
                .collect();
            (*key, mine)
        })
        .collect();
    Some(checked)
}

/// One chunk of viewers of one table against the batch's keys of that table.
async fn check_chunk(
    db: &Database,
    pks: &[Option<Vec<String>>],
    access: Arc<TableAccess>,
    keys: Arc<Vec<Vec<String>>>,
    part: Vec<TableCheck>,
) -> Vec<CheckedRows> {
    let viewers: Vec<Arc<Viewer>> = part.iter().map(|(_, v, _)| v.clone()).collect();
    let results = match visibility::visible_for_many(db, &viewers, &access, &keys).await {
        Ok(results) => results,
        Err(e) => {
            // Without the function (migrations disabled) or on a failed call: one check per
            // viewer.
            debug!(table = %access.table, error = %e, "batched visibility check failed: checking per viewer");
            let mut results = Vec::with_capacity(viewers.len());
            for viewer in &viewers {
                results.push(
                    match visibility::visible_keys(db, viewer, &access, &keys).await {
                        Ok(seen) => Some(
                            keys.iter()
                                .enumerate()
                                .filter(|(_, k)| seen.contains(*k))
                                .map(|(i, _)| i)
                                .collect(),
                        ),
                        Err(e) => {
                            warn!(table = %access.table, role = %viewer.role, error = %e, "visibility check failed: rows withheld");
                            None
                        }
                    },
                );
            }
            results
        }
    };
    // Keys are sorted: a row's key index by binary search.
    part.into_iter()
        .zip(results)
        .map(|((key, _, rows), seen)| {
            let seen = seen.unwrap_or_default();
            let rows = rows
                .into_iter()
                .map(|row| {
                    let visible = pks[row]
                        .as_ref()
                        .and_then(|pk| keys.binary_search(pk).ok())
                        .is_some_and(|i| seen.contains(&i));
                    (row, visible)
                })
                .collect();
            (key, rows)
        })
        .collect()
}

/// Frames of one change, shared between channels: (shape index, serializer, topic address,
/// binding ids).
type FrameKey = (usize, Vsn, usize, Vec<u32>);

/// Payloads and fan-out, in commit order. A channel's subscriptions on a table are adjacent in
/// the table's list (`Index::replace` adds them together), so one run of equal members is one
/// channel: its matching bindings share a frame per shape. Equal frames (same shape, ids,
/// serializer and topic) are encoded once per change and shared between channels.
///
/// A full outbox pauses the delivery (and with it the stream) until it has room, for at most
/// the slow-consumer time; a socket still full then is closed as slow and the rest carry on.
async fn deliver(
    cx: &Context<'_>,
    matched: &[Matched<'_>],
    visible: &Visible,
    stats: &mut BatchStats,
) {
    let max_record_bytes = cx.max_record_bytes;
    let mut frames: FastMap<FrameKey, Utf8Bytes> = FastMap::default();
    let mut shapes: Vec<Shape> = Vec::new();
    let mut datas: Vec<Option<String>> = Vec::new();
    let mut run: Vec<(usize, Vec<u32>, usize)> = Vec::new();
    for (index, m) in matched.iter().enumerate() {
        frames.clear();
        shapes.clear();
        datas.clear();
        let mut start = 0;
        while start < m.subs.len() {
            let member = m.subs[start].member.id;
            let end = start
                + m.subs[start..]
                    .iter()
                    .position(|s| s.member.id != member)
                    .unwrap_or(m.subs.len() - start);
            // (shape, ids, the first subscription) of this channel, in first-seen order.
            run.clear();
            for (offset, sub) in m.subs[start..end].iter().enumerate() {
                if needs_rls_check(sub) {
                    let seen = match &m.old_row {
                        OldRow::Unknown => cx.delete_unknown == DeleteUnknown::Reference,
                        _ => visible
                            .get(&(viewer_key(&sub.viewer), sub.binding.access.oid))
                            .is_some_and(|flags| flags[index]),
                    };
                    if !seen {
                        continue;
                    }
                }
                let shape_idx = match shapes.iter().position(|s| s.same(&sub.shape)) {
                    Some(i) => i,
                    None => {
                        shapes.push(sub.shape.clone());
                        datas.push(None);
                        shapes.len() - 1
                    }
                };
                match run.iter_mut().find(|(s, _, _)| *s == shape_idx) {
                    Some((_, ids, _)) => {
                        if !ids.contains(&sub.binding.binding_id) {
                            ids.push(sub.binding.binding_id);
                        }
                    }
                    None => run.push((shape_idx, vec![sub.binding.binding_id], start + offset)),
                }
            }
            for (shape_idx, ids, first) in run.drain(..) {
                let sub = &m.subs[first];
                let data = datas[shape_idx].get_or_insert_with(|| {
                    payload::data(
                        &shapes[shape_idx],
                        m.relation,
                        m.change,
                        m.old_row.tuple(),
                        m.commit_time,
                        max_record_bytes,
                    )
                });
                let topic = sub.member.topic();
                let topic_key = Arc::as_ptr(topic) as *const u8 as usize;
                let frame = frames
                    .entry((shape_idx, sub.member.vsn, topic_key, ids))
                    .or_insert_with_key(|(_, vsn, _, ids)| {
                        Utf8Bytes::from(vsn.encode_with(
                            None,
                            None,
                            topic,
                            "postgres_changes",
                            data.len() + 16 + ids.len() * 11,
                            |out| payload::write_message(out, ids, data),
                        ))
                    })
                    .clone();
                let frame = match &sub.member.resume {
                    Some(cursor) => Frame::Change(
                        frame,
                        Mark {
                            slot: cursor.slot,
                            lsn: m.at.lsn,
                            index: m.at.index,
                        },
                    ),
                    None => Frame::Text(frame),
                };
                let queued = match sub.member.outbox.try_push_stream(frame) {
                    Ok(queued) => queued,
                    Err(frame) => {
                        stats.waits += 1;
                        let deadline = tokio::time::Instant::now() + cx.slow_consumer;
                        sub.member.outbox.push_within(frame, deadline).await
                    }
                };
                if queued {
                    stats.frames += 1;
                    if m.mode == Mode::Replay {
                        stats.replayed += 1;
                    }
                } else {
                    stats.dropped += 1;
                }
            }
            start = end;
        }
    }
}

/// A WAL tuple as a row for the policy evaluator.
struct WalRow<'a> {
    relation: &'a Relation,
    tuple: &'a [TupleValue],
}

impl policy::Row for WalRow<'_> {
    fn cell(&self, column: &str) -> Option<policy::Cell<'_>> {
        let i = self
            .relation
            .columns
            .iter()
            .position(|c| c.name == column)?;
        Some(match self.tuple.get(i)? {
            TupleValue::Null => policy::Cell::Null,
            TupleValue::Text(_) => match self.tuple[i].as_str() {
                Some(text) => policy::Cell::Text(text, &self.relation.columns[i].pg_type.name),
                None => policy::Cell::Unknown,
            },
            TupleValue::UnchangedToast | TupleValue::Binary(_) => policy::Cell::Unknown,
        })
    }
}

/// A hash map keyed by small integers and pointers, hashed with [`FastHasher`].
type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher (the one rustc uses) for keys made of integers and addresses, which
/// the fan-out hashes once per subscriber and change; not resistant to chosen keys, and these
/// keys are not chosen by clients.
#[derive(Default, Clone, Copy)]
struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
}

/// Event filter and conditions: new row for INSERT/UPDATE, old identity for DELETE.
fn passes(binding: &TableBinding, relation: &Relation, change: &Change) -> bool {
    let wanted = matches!(
        (binding.event, change),
        (EventFilter::All, _)
            | (EventFilter::Insert, Change::Insert { .. })
            | (EventFilter::Update, Change::Update { .. })
            | (EventFilter::Delete, Change::Delete { .. })
    );
    if !wanted {
        return false;
    }
    binding.conditions.iter().all(|condition| {
        let Some(i) = relation
            .columns
            .iter()
            .position(|c| c.name == condition.column)
        else {
            return false;
        };
        let value = match change {
            Change::Insert { new, .. } => new.get(i),
            Change::Update { new, old, .. } => match new.get(i) {
                Some(TupleValue::UnchangedToast) => match old {
                    Some(OldTuple::Full(t)) => t.get(i),
                    _ => None,
                },
                v => v,
            },
            Change::Delete { old: Some(old), .. } => match old {
                OldTuple::Full(t) => t.get(i),
                OldTuple::Key(t) if relation.columns[i].is_key => t.get(i),
                OldTuple::Key(_) => None,
            },
            _ => None,
        };
        match value {
            Some(TupleValue::Null) => condition.matches(None),
            Some(v) => match v.as_str() {
                Some(text) => condition.matches(Some(text)),
                None => false,
            },
            None => false,
        }
    })
}

/// How long a batch waits for its transactions to be visible to new snapshots.
const VISIBILITY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Visibility queries run at once on the exclusive connections.
const VISIBILITY_CONCURRENCY: usize = 8;

/// Viewers checked in one call at least, when there are that many.
const MIN_CHUNK: usize = 16;

/// Interned viewers are compared by address.
fn viewer_key(viewer: &Arc<Viewer>) -> usize {
    Arc::as_ptr(viewer) as usize
}

fn needs_rls_check(sub: &Subscription) -> bool {
    sub.binding.access.rls && !sub.viewer.bypass_rls
}

/// The primary-key values (as text) of an INSERT/UPDATE row of an RLS table; `None` otherwise.
fn rls_key(m: &Matched<'_>) -> Option<Vec<String>> {
    let new = match m.change {
        Change::Insert { new, .. } | Change::Update { new, .. } => new,
        _ => return None,
    };
    let access = &m.subs.first()?.binding.access;
    if !access.rls {
        return None;
    }
    let mut key = Vec::new();
    for pk in access.columns.iter().filter(|c| c.is_pk) {
        let i = m.relation.columns.iter().position(|c| c.name == pk.name)?;
        key.push(new.get(i)?.as_str()?.to_owned());
    }
    (!key.is_empty()).then_some(key)
}
