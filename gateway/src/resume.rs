//! Resuming Postgres Changes from positions: a channel whose socket goes away without
//! `phx_leave` is *parked* with the position of the last change its client has, and a later
//! join with the same identity takes it over and gets what it missed, from the log.
//!
//! - A **position** is (commit LSN, index of the change in its transaction); `WHOLE` as the
//!   index means the whole transaction.
//! - Every channel with Postgres Changes has a [`Cursor`] in one slot of the [`Store`]: the
//!   position last *written* to its socket and the position its client *confirmed* (a WebSocket
//!   pong to a ping sent after the frames: every client answers pings on its own). The slot
//!   lives in a file, written with one `pwrite` per flush: after a `kill -9` the file still has
//!   what was written, and the next process parks every channel that was live at that position.
//! - A socket the client closed, or that went silent, parks at the confirmed position; one the
//!   server closed (shutdown, slow consumer) at the written one.
//! - The replication slot's confirmed position never moves past the oldest live or parked
//!   position (the router acks no further), so the log still has what a parked channel missed;
//!   a parked channel is kept for the resume window and while the WAL it holds stays under the
//!   cap. Past either, it becomes a *gap*: the join that would have resumed it is told, once.
//!
//! The store knows nothing of topics or the index: it maps identities to slots and keeps the
//! positions. The router (`crate::changes`) replays; the socket records writes and pongs.

use crate::outbox::{CloseReason, Outbox};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{info, warn};

/// The index meaning "the whole transaction".
pub(crate) const WHOLE: u32 = u32::MAX;

/// Where a change is in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Position {
    pub(crate) lsn: u64,
    pub(crate) index: u32,
}

impl Position {
    pub(crate) fn whole(lsn: u64) -> Position {
        Position { lsn, index: WHOLE }
    }
}

/// Who may take over a parked channel: role, `sub`, `session_id` (else the token), topic,
/// private flag and the `postgres_changes` bindings, hashed (SHA-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Identity([u8; 32]);

impl Identity {
    pub(crate) fn of(
        claims: &serde_json::Map<String, serde_json::Value>,
        role: &str,
        token: &str,
        topic: &str,
        private: bool,
        bindings: &[(serde_json::Value, u32)],
    ) -> Identity {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut field = |bytes: &[u8]| {
            digest.update(&(bytes.len() as u64).to_le_bytes());
            digest.update(bytes);
        };
        field(role.as_bytes());
        let text = |key: &str| claims.get(key).map(|v| v.to_string()).unwrap_or_default();
        field(text("sub").as_bytes());
        match claims.get("session_id") {
            Some(session) => field(session.to_string().as_bytes()),
            None => field(token.as_bytes()),
        }
        field(topic.as_bytes());
        field(&[u8::from(private)]);
        for (binding, _) in bindings {
            field(binding.to_string().as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.finish().as_ref());
        Identity(out)
    }
}

/// Why a join could not resume: the `ResumeGap` reason it is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum GapReason {
    /// Rejoined after `RESUME_WINDOW_MS`.
    WindowExpired = 1,
    /// The WAL it held grew past `RESUME_MAX_RETAINED_BYTES`.
    RetentionCap = 2,
    /// The log no longer has its position (the replication slot was lost or recreated).
    PositionLost = 3,
}

impl GapReason {
    fn from_u8(v: u8) -> GapReason {
        match v {
            2 => GapReason::RetentionCap,
            3 => GapReason::PositionLost,
            _ => GapReason::WindowExpired,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GapReason::WindowExpired => "window_expired",
            GapReason::RetentionCap => "retention_cap",
            GapReason::PositionLost => "position_lost",
        }
    }

    /// The `system` message text: the machine-readable code and reason first.
    pub(crate) fn message(self) -> String {
        let why = match self {
            GapReason::WindowExpired => "the channel rejoined after the resume window",
            GapReason::RetentionCap => "the changes it missed were more than the gateway keeps",
            GapReason::PositionLost => "the log no longer has the changes it missed",
        };
        format!(
            "ResumeGap: {}: {why}; changes committed while it was away were not delivered, refetch",
            self.as_str()
        )
    }
}

/// Where a replaying channel stands, as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Gets live changes.
    Live = 0,
    /// Waits for the stream to come back to its position; gets nothing meanwhile.
    Waiting = 1,
    /// Gets the replayed changes after its position, then live ones.
    Replaying = 2,
}

/// One channel's place in the log: shared by its member (the router reads the phase), its
/// socket (records writes and pongs) and the store (holds the WAL, persists).
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) slot: u32,
    phase: AtomicU8,
    /// Replay delivers changes after this position only.
    from: Mutex<Position>,
    written: Mutex<Position>,
    confirmed: Mutex<Position>,
    /// The confirmed LSN, for the hold scan without a lock.
    confirmed_lsn: AtomicU64,
    /// When a ping covering this channel went out unanswered (ms since the epoch), 0 if none.
    ping_since_ms: AtomicU64,
    /// Parked, released or taken over: nothing of it is recorded any more.
    retired: AtomicBool,
    /// Past the retention cap: no longer holds WAL, and parks as a gap.
    unresumable: AtomicBool,
    /// Its written position changed since the file last got it.
    dirty: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cursor {
    fn new(slot: u32, at: Position, phase: Phase) -> Cursor {
        Cursor {
            slot,
            phase: AtomicU8::new(phase as u8),
            from: Mutex::new(at),
            written: Mutex::new(at),
            confirmed: Mutex::new(at),
            confirmed_lsn: AtomicU64::new(at.lsn),
            ping_since_ms: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            unresumable: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(from: Position) -> Cursor {
        Cursor::new(0, from, Phase::Waiting)
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Waiting,
            2 => Phase::Replaying,
            _ => Phase::Live,
        }
    }

    /// Set by the router only.
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub(crate) fn from(&self) -> Position {
        *lock(&self.from)
    }

    /// Set by the router only: the replay restarted after the channel had everything up to `at`.
    pub(crate) fn raise_from(&self, at: Position) {
        let mut from = lock(&self.from);
        *from = (*from).max(at);
    }

    pub(crate) fn written(&self) -> Position {
        *lock(&self.written)
    }

    pub(crate) fn confirmed(&self) -> Position {
        *lock(&self.confirmed)
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// A ping covering this channel went out at `now_ms` (kept if one is already unanswered).
    pub(crate) fn pinged(&self, now_ms: u64) {
        let _ = self.ping_since_ms.compare_exchange(
            0,
            now_ms.max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The client answered: everything up to `at` reached it.
    pub(crate) fn confirm(&self, at: Position) {
        let mut confirmed = lock(&self.confirmed);
        if at > *confirmed {
            *confirmed = at;
            self.confirmed_lsn.store(at.lsn, Ordering::Release);
        }
        self.ping_since_ms.store(0, Ordering::Release);
    }

    /// Unanswered for at least `for_ms`: the socket is most likely dead.
    fn silent(&self, now_ms: u64, for_ms: u64) -> bool {
        let since = self.ping_since_ms.load(Ordering::Acquire);
        since != 0 && now_ms.saturating_sub(since) >= for_ms
    }
}

/// Which position a channel parks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParkAt {
    /// What its client confirmed: the client closed, or went silent.
    Confirmed,
    /// What was written to its socket: the server closed it.
    Written,
}

/// What a join gets from the store.
#[derive(Debug)]
pub(crate) enum Claim {
    /// It takes over a parked channel: replay after its position.
    Resumed(Arc<Cursor>),
    /// A new channel; `gap` when it would have resumed but cannot.
    Fresh {
        cursor: Option<Arc<Cursor>>,
        gap: Option<GapReason>,
    },
}

/// What the store holds for a slot.
#[derive(Debug)]
enum Entry {
    Free,
    Live {
        id: Identity,
        cursor: Arc<Cursor>,
        outbox: Outbox,
    },
    Parked {
        id: Identity,
        at: Position,
        since_ms: u64,
    },
    Gap {
        id: Identity,
        reason: GapReason,
        since_ms: u64,
    },
}

#[derive(Debug, Default)]
struct Book {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Identity → parked slots, oldest first.
    parked: HashMap<Identity, VecDeque<u32>>,
    /// Identity → gap slots.
    gaps: HashMap<Identity, VecDeque<u32>>,
    /// Identity → live slots (for the takeover of a dead socket's channel).
    live: HashMap<Identity, Vec<u32>>,
}

/// What a sweep found, for the router and the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sweep {
    /// The oldest LSN a live or parked channel needs; `None` when none holds anything.
    pub(crate) hold: Option<u64>,
    pub(crate) parked: usize,
    pub(crate) live: usize,
    /// Parked channels that became gaps in this sweep.
    pub(crate) expired: u64,
    pub(crate) capped: u64,
}

/// Settings of the store.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) path: PathBuf,
    pub(crate) slots: u32,
    pub(crate) window: Duration,
    pub(crate) max_retained_bytes: u64,
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
#[error("resume state file {path}: {source}")]
pub struct StoreError {
    path: String,
    source: std::io::Error,
}

const MAGIC: &[u8; 8] = b"RTRSUME1";
const HEADER: u64 = 64;
const RECORD: u64 = 64;
/// How long a gap is remembered, to tell the join that comes for it.
const GAP_MEMORY_MS: u64 = 3_600_000;
/// How long a ping may go unanswered before a join with the same identity takes the channel
/// over (its socket is taken for dead).
const SILENT_TAKEOVER_MS: u64 = 1_000;

const STATE_FREE: u8 = 0;
const STATE_LIVE: u8 = 1;
const STATE_PARKED: u8 = 2;
const STATE_GAP: u8 = 3;

/// The slots and their file.
#[derive(Debug)]
pub(crate) struct Store {
    file: File,
    /// The records as the file has them (64 bytes per slot), so positions go to the file in
    /// runs of adjacent records.
    image: Mutex<Vec<u8>>,
    /// Cursors whose written position the file does not have yet.
    dirty: Mutex<Vec<Arc<Cursor>>>,
    book: Mutex<Book>,
    capacity: u32,
    window_ms: u64,
    max_retained_bytes: u64,
    /// Commit LSN of the last transaction routed live, in full.
    routed: AtomicU64,
    /// The database's WAL position when this process started.
    floor: AtomicU64,
    /// Joins that found no free slot (they are not resumable).
    pub(crate) full: AtomicU64,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the state file and takes an exclusive lock on it: one process per
    /// file. Channels that were live when the last process ended are parked at the position
    /// last written to their socket, since the time that process was last alive.
    pub(crate) fn open(settings: &Settings) -> Result<Store, StoreError> {
        let path = &settings.path;
        let err = |source| StoreError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        lock_file(&file, path).map_err(err)?;
        let store = Store {
            file,
            image: Mutex::new(Vec::new()),
            dirty: Mutex::new(Vec::new()),
            book: Mutex::new(Book::default()),
            capacity: settings.slots.max(1),
            window_ms: settings.window.as_millis() as u64,
            max_retained_bytes: settings.max_retained_bytes,
            routed: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            full: AtomicU64::new(0),
        };
        store.load().map_err(err)?;
        Ok(store)
    }

    fn load(&self) -> std::io::Result<()> {
        let mut header = [0u8; HEADER as usize];
        let len = self.file.metadata()?.len();
        let fresh = len < HEADER || {
            self.file.read_exact_at(&mut header, 0)?;
            &header[0..8] != MAGIC
        };
        if fresh {
            self.file.set_len(0)?;
            header = [0u8; HEADER as usize];
            header[0..8].copy_from_slice(MAGIC);
            self.file.write_all_at(&header, 0)?;
            return Ok(());
        }
        let routed = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let alive_ms = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        self.routed.store(routed, Ordering::Release);
        let now = now_ms();
        let records = ((len - HEADER) / RECORD).min(u64::from(self.capacity)) as u32;
        let mut book = lock(&self.book);
        let mut buf = vec![0u8; (records as u64 * RECORD) as usize];
        self.file.read_exact_at(&mut buf, HEADER)?;
        let (mut parked, mut gaps) = (0, 0);
        for slot in 0..records {
            let r = &buf[(slot as u64 * RECORD) as usize..((slot as u64 + 1) * RECORD) as usize];
            let mut id = [0u8; 32];
            id.copy_from_slice(&r[32..64]);
            let id = Identity(id);
            let at = Position {
                lsn: u64::from_le_bytes(r[8..16].try_into().unwrap_or_default()),
                index: u32::from_le_bytes(r[16..20].try_into().unwrap_or_default()),
            };
            let since = u64::from_le_bytes(r[24..32].try_into().unwrap_or_default());
            let entry = match r[0] {
                STATE_LIVE | STATE_PARKED => {
                    let since = if r[0] == STATE_LIVE { alive_ms } else { since };
                    if now.saturating_sub(since) > self.window_ms {
                        Entry::Gap {
                            id,
                            reason: GapReason::WindowExpired,
                            since_ms: since,
                        }
                    } else {
                        Entry::Parked {
                            id,
                            at,
                            since_ms: since,
                        }
                    }
                }
                STATE_GAP if now.saturating_sub(since) < GAP_MEMORY_MS => Entry::Gap {
                    id,
                    reason: GapReason::from_u8(r[1]),
                    since_ms: since,
                },
                _ => Entry::Free,
            };
            match &entry {
                Entry::Parked { .. } => {
                    parked += 1;
                    book.parked.entry(id).or_default().push_back(slot);
                }
                Entry::Gap { .. } => {
                    gaps += 1;
                    book.gaps.entry(id).or_default().push_back(slot);
                }
                _ => book.free.push(slot),
            }
            book.entries.push(entry);
        }
        for slot in 0..records {
            self.persist(slot, &book.entries[slot as usize]);
        }
        book.free.reverse();
        if parked + gaps > 0 {
            info!(
                parked,
                gaps, "resume state loaded: channels of the last process wait for their clients"
            );
        }
        Ok(())
    }

    /// After the slot was checked at start: parked positions the slot no longer has (it is
    /// missing, or confirmed past them) become gaps.
    pub(crate) fn check_log(&self, confirmed: Option<u64>) {
        let mut book = lock(&self.book);
        let lost: Vec<u32> = book
            .entries
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| match e {
                Entry::Parked { at, .. } if confirmed.is_none_or(|c| c >= at.lsn) => {
                    Some(slot as u32)
                }
                _ => None,
            })
            .collect();
        if !lost.is_empty() {
            warn!(
                channels = lost.len(),
                "the replication slot no longer has what parked channels missed: they will be told"
            );
        }
        for slot in lost {
            self.to_gap(&mut book, slot, GapReason::PositionLost);
        }
    }

    /// The database's WAL is at `current`: a routed position past it belongs to another
    /// database (the state file outlived its cluster), so it and every parked position are void.
    /// Also the position a new channel starts at until something is routed: nothing committed
    /// before this process started is owed to a channel that joins now.
    pub(crate) fn check_wal(&self, current: u64) {
        self.floor.store(current, Ordering::Release);
        if self.routed() <= current {
            return;
        }
        warn!(
            routed = self.routed(),
            current, "the resume state file is from another database: starting it afresh"
        );
        self.routed.store(0, Ordering::Release);
        let _ = self.file.write_all_at(&0u64.to_le_bytes(), 8);
        self.positions_lost();
    }

    /// The slot was lost and recreated: every parked position is gone.
    pub(crate) fn positions_lost(&self) {
        let mut book = lock(&self.book);
        let slots: Vec<u32> = book.parked.values().flatten().copied().collect();
        for slot in slots {
            self.to_gap(&mut book, slot, GapReason::PositionLost);
        }
    }

    /// Commit LSN of the last transaction routed live in full.
    pub(crate) fn routed(&self) -> u64 {
        self.routed.load(Ordering::Acquire)
    }

    /// Called by the router after every frame of the transaction at `lsn` is queued.
    pub(crate) fn set_routed(&self, lsn: u64) {
        if self.routed.fetch_max(lsn, Ordering::AcqRel) < lsn {
            let _ = self.file.write_all_at(&lsn.to_le_bytes(), 8);
        }
    }

    /// A join of `id`: takes over its oldest parked channel, else a dead socket's live channel
    /// of the same identity, else starts a new one (told of a gap if one is remembered).
    pub(crate) fn claim(&self, id: Identity, outbox: &Outbox) -> Claim {
        let mut book = lock(&self.book);
        let now = now_ms();
        if let Some(slot) = book.parked.get_mut(&id).and_then(VecDeque::pop_front) {
            if book.parked.get(&id).is_some_and(VecDeque::is_empty) {
                book.parked.remove(&id);
            }
            let Entry::Parked { at, .. } = book.entries[slot as usize] else {
                unreachable!("a parked slot holds a parked entry");
            };
            let cursor = Arc::new(Cursor::new(slot, at, Phase::Waiting));
            self.set_live(&mut book, slot, id, cursor.clone(), outbox.clone());
            return Claim::Resumed(cursor);
        }
        let dead = book.live.get(&id).and_then(|slots| {
            slots
                .iter()
                .copied()
                .find(|slot| match &book.entries[*slot as usize] {
                    Entry::Live { cursor, .. } => cursor.silent(now, SILENT_TAKEOVER_MS),
                    _ => false,
                })
        });
        if let Some(slot) = dead
            && let Entry::Live {
                cursor: old,
                outbox: old_outbox,
                ..
            } = &book.entries[slot as usize]
        {
            // Its socket has not answered a ping for a while: the client is this join. Retired
            // under its write lock: the old socket's last `pwrite` lands before the new record.
            {
                let _writing = lock(&old.written);
                old.retired.store(true, Ordering::Release);
            }
            old_outbox.close(CloseReason::Replaced);
            let at = old.confirmed();
            info!(
                slot,
                "a silent socket's channel is taken over by a new join of its client"
            );
            self.unlink_live(&mut book, slot, &id);
            let cursor = Arc::new(Cursor::new(slot, at, Phase::Waiting));
            self.set_live(&mut book, slot, id, cursor.clone(), outbox.clone());
            return Claim::Resumed(cursor);
        }
        let gap = match book.gaps.get_mut(&id).and_then(VecDeque::pop_front) {
            Some(slot) => {
                if book.gaps.get(&id).is_some_and(VecDeque::is_empty) {
                    book.gaps.remove(&id);
                }
                let reason = match book.entries[slot as usize] {
                    Entry::Gap { reason, .. } => reason,
                    _ => GapReason::WindowExpired,
                };
                self.free(&mut book, slot);
                Some(reason)
            }
            None => None,
        };
        let cursor = self.allocate(&mut book).map(|slot| {
            let start = self.routed().max(self.floor.load(Ordering::Acquire));
            let cursor = Arc::new(Cursor::new(slot, Position::whole(start), Phase::Live));
            self.set_live(&mut book, slot, id, cursor.clone(), outbox.clone());
            cursor
        });
        if cursor.is_none() {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
        Claim::Fresh { cursor, gap }
    }

    /// The channel left (or was replaced, or its token expired): nothing to resume.
    pub(crate) fn release(&self, cursor: &Cursor) {
        if cursor.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut book = lock(&self.book);
        self.free(&mut book, cursor.slot);
    }

    /// The channel's socket went away: keep its position for the window.
    pub(crate) fn park(&self, cursor: &Cursor, at: ParkAt) {
        if cursor.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut book = lock(&self.book);
        let slot = cursor.slot;
        let Some(Entry::Live { id, .. }) = book.entries.get(slot as usize) else {
            return;
        };
        let id = *id;
        self.unlink_live(&mut book, slot, &id);
        let now = now_ms();
        let entry = if cursor.unresumable.load(Ordering::Acquire) {
            book.gaps.entry(id).or_default().push_back(slot);
            Entry::Gap {
                id,
                reason: GapReason::RetentionCap,
                since_ms: now,
            }
        } else {
            // A channel still waiting for its replay has what it had when it was parked before.
            let position = match (cursor.phase(), at) {
                (Phase::Waiting | Phase::Replaying, _) => cursor.confirmed(),
                (Phase::Live, ParkAt::Confirmed) => cursor.confirmed(),
                (Phase::Live, ParkAt::Written) => cursor.written(),
            };
            book.parked.entry(id).or_default().push_back(slot);
            Entry::Parked {
                id,
                at: position,
                since_ms: now,
            }
        };
        self.persist(slot, &entry);
        book.entries[slot as usize] = entry;
    }

    /// Frames up to `at` were written to the cursor's socket; the file gets it with the next
    /// [`Store::flush`].
    pub(crate) fn written(&self, cursor: &Arc<Cursor>, at: Position) {
        {
            let mut written = lock(&cursor.written);
            if at <= *written || cursor.is_retired() {
                return;
            }
            *written = at;
        }
        if !cursor.dirty.swap(true, Ordering::AcqRel) {
            lock(&self.dirty).push(cursor.clone());
        }
    }

    /// Writes the positions that changed since the last call to the file, one `pwrite` per run
    /// of adjacent records (called every 10 ms): a process killed at any moment leaves each
    /// record as it was or as it is now, and at most the last 10 ms of positions unwritten.
    pub(crate) fn flush(&self) {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        if dirty.is_empty() {
            return;
        }
        let mut image = lock(&self.image);
        let mut slots = Vec::with_capacity(dirty.len());
        for cursor in &dirty {
            cursor.dirty.store(false, Ordering::Release);
            if cursor.is_retired() {
                continue;
            }
            let at = cursor.written();
            let offset = cursor.slot as usize * RECORD as usize;
            if image.len() < offset + RECORD as usize {
                continue;
            }
            image[offset + 8..offset + 16].copy_from_slice(&at.lsn.to_le_bytes());
            image[offset + 16..offset + 20].copy_from_slice(&at.index.to_le_bytes());
            slots.push(cursor.slot);
        }
        slots.sort_unstable();
        slots.dedup();
        let mut i = 0;
        while i < slots.len() {
            let (start, mut end) = (slots[i], slots[i]);
            while i + 1 < slots.len() && slots[i + 1] == end + 1 {
                i += 1;
                end += 1;
            }
            let bytes =
                &image[start as usize * RECORD as usize..(end as usize + 1) * RECORD as usize];
            if let Err(e) = self
                .file
                .write_all_at(bytes, HEADER + u64::from(start) * RECORD)
            {
                warn!(error = %e, "resume positions not written");
            }
            i += 1;
        }
    }

    /// An idle channel of a live socket: everything up to `at` was handled (nothing was queued
    /// for it and its client confirmed all that was written).
    pub(crate) fn advance(&self, cursor: &Arc<Cursor>, at: Position) {
        if cursor.phase() != Phase::Live {
            return;
        }
        self.written(cursor, at);
        let mut confirmed = lock(&cursor.confirmed);
        if at > *confirmed {
            *confirmed = at;
            cursor.confirmed_lsn.store(at.lsn, Ordering::Release);
        }
    }

    /// Expires parked channels past the window, enforces the retention cap against `high` (the
    /// newest LSN routed), forgets old gaps, and returns the oldest LSN still held.
    pub(crate) fn sweep(&self, high: u64) -> Sweep {
        let now = now_ms();
        let _ = self.file.write_all_at(&now.to_le_bytes(), 16);
        let mut book = lock(&self.book);
        let mut sweep = Sweep::default();
        // (lsn, slot) of everything that holds WAL.
        let mut holders: Vec<(u64, u32)> = Vec::new();
        let mut expired = Vec::new();
        let mut forgotten = Vec::new();
        for (slot, entry) in book.entries.iter().enumerate() {
            let slot = slot as u32;
            match entry {
                Entry::Parked { at, since_ms, .. } => {
                    if now.saturating_sub(*since_ms) > self.window_ms {
                        expired.push(slot);
                    } else {
                        holders.push((at.lsn, slot));
                    }
                }
                Entry::Live { cursor, .. } => {
                    sweep.live += 1;
                    if !cursor.unresumable.load(Ordering::Acquire) {
                        holders.push((cursor.confirmed_lsn.load(Ordering::Acquire), slot));
                    }
                }
                Entry::Gap { since_ms, .. } if now.saturating_sub(*since_ms) > GAP_MEMORY_MS => {
                    forgotten.push(slot);
                }
                _ => {}
            }
        }
        sweep.expired = expired.len() as u64;
        for slot in expired {
            self.to_gap(&mut book, slot, GapReason::WindowExpired);
        }
        for slot in forgotten {
            self.free(&mut book, slot);
        }
        holders.sort_unstable();
        let mut oldest = 0;
        while oldest < holders.len()
            && high.saturating_sub(holders[oldest].0) > self.max_retained_bytes
        {
            let slot = holders[oldest].1;
            sweep.capped += 1;
            match &book.entries[slot as usize] {
                Entry::Live { cursor, .. } => {
                    cursor.unresumable.store(true, Ordering::Release);
                }
                _ => self.to_gap(&mut book, slot, GapReason::RetentionCap),
            }
            oldest += 1;
        }
        if sweep.capped > 0 {
            warn!(
                channels = sweep.capped,
                max_bytes = self.max_retained_bytes,
                "channels held more WAL than RESUME_MAX_RETAINED_BYTES: they can no longer resume"
            );
        }
        sweep.hold = holders.get(oldest).map(|(lsn, _)| *lsn);
        sweep.parked = book.parked.values().map(VecDeque::len).sum();
        sweep
    }

    fn allocate(&self, book: &mut Book) -> Option<u32> {
        if let Some(slot) = book.free.pop() {
            return Some(slot);
        }
        if (book.entries.len() as u64) < u64::from(self.capacity) {
            book.entries.push(Entry::Free);
            return Some(book.entries.len() as u32 - 1);
        }
        // Full: the oldest remembered gap makes room.
        let oldest = book
            .entries
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| match e {
                Entry::Gap { since_ms, .. } => Some((*since_ms, slot as u32)),
                _ => None,
            })
            .min()?;
        self.free(book, oldest.1);
        book.free.pop()
    }

    fn set_live(
        &self,
        book: &mut Book,
        slot: u32,
        id: Identity,
        cursor: Arc<Cursor>,
        outbox: Outbox,
    ) {
        let at = cursor.from();
        book.live.entry(id).or_default().push(slot);
        let entry = Entry::Live { id, cursor, outbox };
        self.persist_with(slot, STATE_LIVE, 0, &id, at, now_ms());
        book.entries[slot as usize] = entry;
    }

    fn unlink_live(&self, book: &mut Book, slot: u32, id: &Identity) {
        if let Some(slots) = book.live.get_mut(id) {
            slots.retain(|s| *s != slot);
            if slots.is_empty() {
                book.live.remove(id);
            }
        }
    }

    fn to_gap(&self, book: &mut Book, slot: u32, reason: GapReason) {
        let Some(Entry::Parked { id, .. }) = book.entries.get(slot as usize) else {
            return;
        };
        let id = *id;
        if let Some(queue) = book.parked.get_mut(&id) {
            queue.retain(|s| *s != slot);
            if queue.is_empty() {
                book.parked.remove(&id);
            }
        }
        book.gaps.entry(id).or_default().push_back(slot);
        let entry = Entry::Gap {
            id,
            reason,
            since_ms: now_ms(),
        };
        self.persist(slot, &entry);
        book.entries[slot as usize] = entry;
    }

    fn free(&self, book: &mut Book, slot: u32) {
        let Some(entry) = book.entries.get(slot as usize) else {
            return;
        };
        match entry {
            Entry::Free => return,
            Entry::Live { id, .. } => {
                let id = *id;
                self.unlink_live(book, slot, &id);
            }
            Entry::Parked { id, .. } => {
                let id = *id;
                if let Some(q) = book.parked.get_mut(&id) {
                    q.retain(|s| *s != slot);
                    if q.is_empty() {
                        book.parked.remove(&id);
                    }
                }
            }
            Entry::Gap { id, .. } => {
                let id = *id;
                if let Some(q) = book.gaps.get_mut(&id) {
                    q.retain(|s| *s != slot);
                    if q.is_empty() {
                        book.gaps.remove(&id);
                    }
                }
            }
        }
        self.persist(slot, &Entry::Free);
        book.entries[slot as usize] = Entry::Free;
        book.free.push(slot);
    }

    fn persist(&self, slot: u32, entry: &Entry) {
        let zero = Identity([0; 32]);
        match entry {
            Entry::Free => self.persist_with(slot, STATE_FREE, 0, &zero, Position::default(), 0),
            Entry::Live { id, cursor, .. } => {
                self.persist_with(slot, STATE_LIVE, 0, id, cursor.written(), now_ms())
            }
            Entry::Parked { id, at, since_ms } => {
                self.persist_with(slot, STATE_PARKED, 0, id, *at, *since_ms)
            }
            Entry::Gap {
                id,
                reason,
                since_ms,
            } => self.persist_with(
                slot,
                STATE_GAP,
                *reason as u8,
                id,
                Position::default(),
                *since_ms,
            ),
        }
    }

    /// One record in one `pwrite`: a process killed at any moment leaves the old record or the
    /// new one.
    fn persist_with(
        &self,
        slot: u32,
        state: u8,
        reason: u8,
        id: &Identity,
        at: Position,
        since_ms: u64,
    ) {
        let mut r = [0u8; RECORD as usize];
        r[0] = state;
        r[1] = reason;
        r[8..16].copy_from_slice(&at.lsn.to_le_bytes());
        r[16..20].copy_from_slice(&at.index.to_le_bytes());
        r[24..32].copy_from_slice(&since_ms.to_le_bytes());
        r[32..64].copy_from_slice(&id.0);
        let mut image = lock(&self.image);
        let offset = slot as usize * RECORD as usize;
        if image.len() < offset + RECORD as usize {
            image.resize(offset + RECORD as usize, 0);
        }
        image[offset..offset + RECORD as usize].copy_from_slice(&r);
        if let Err(e) = self
            .file
            .write_all_at(&r, HEADER + u64::from(slot) * RECORD)
        {
            warn!(error = %e, "resume state not written");
        }
    }
}

/// One process per state file: a second gateway on the same file would park the first one's
/// channels as its own.
fn lock_file(file: &File, path: &Path) -> std::io::Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::other(format!(
            "another gateway uses {} (set RESUME_STATE_PATH to a file of its own)",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn settings(dir: &Path) -> Settings {
        Settings {
            path: dir.join("resume.state"),
            slots: 16,
            window: Duration::from_secs(30),
            max_retained_bytes: 1 << 30,
        }
    }

    fn outbox() -> Outbox {
        crate::outbox::outbox(16, 1 << 20, CancellationToken::new()).0
    }

    fn id(n: u8) -> Identity {
        Identity([n; 32])
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("resume-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_parked_channel_is_taken_over_once_by_its_identity_only() {
        let dir = temp_dir("once");
        let store = Store::open(&settings(&dir)).unwrap();
        store.set_routed(100);
        let Claim::Fresh {
            cursor: Some(first),
            gap: None,
        } = store.claim(id(1), &outbox())
        else {
            panic!("a first join is fresh");
        };
        assert_eq!(first.written(), Position::whole(100));
        store.written(&first, Position { lsn: 120, index: 3 });
        first.confirm(Position { lsn: 120, index: 1 });
        store.park(&first, ParkAt::Confirmed);
        assert!(matches!(
            store.claim(id(2), &outbox()),
            Claim::Fresh { gap: None, .. }
        ));
        match store.claim(id(1), &outbox()) {
            Claim::Resumed(cursor) => {
                assert_eq!(cursor.from(), Position { lsn: 120, index: 1 });
                assert_eq!(cursor.phase(), Phase::Waiting);
            }
            other => panic!("expected a resume, got {other:?}"),
        }
        assert!(matches!(
            store.claim(id(1), &outbox()),
            Claim::Fresh { gap: None, .. }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_killed_process_leaves_live_channels_parked_at_what_was_written() {
        let dir = temp_dir("killed");
        {
            let store = Store::open(&settings(&dir)).unwrap();
            let Claim::Fresh {
                cursor: Some(cursor),
                ..
            } = store.claim(id(7), &outbox())
            else {
                panic!("fresh");
            };
            store.written(&cursor, Position { lsn: 500, index: 2 });
            store.flush();
            store.written(&cursor, Position { lsn: 600, index: 0 });
            store.sweep(500);
            // Dropped without parking or flushing: what a kill -9 leaves (the last 10 ms of
            // positions not written).
        }
        let store = Store::open(&settings(&dir)).unwrap();
        match store.claim(id(7), &outbox()) {
            Claim::Resumed(cursor) => assert_eq!(cursor.from(), Position { lsn: 500, index: 2 }),
            other => panic!("expected a resume, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn past_the_window_or_the_cap_a_join_is_told_of_the_gap_once() {
        let dir = temp_dir("gap");
        let mut s = settings(&dir);
        s.window = Duration::ZERO;
        s.max_retained_bytes = 1000;
        let store = Store::open(&s).unwrap();
        let Claim::Fresh {
            cursor: Some(a), ..
        } = store.claim(id(1), &outbox())
        else {
            panic!("fresh");
        };
        store.park(&a, ParkAt::Written);
        std::thread::sleep(Duration::from_millis(5));
        let sweep = store.sweep(0);
        assert_eq!(sweep.expired, 1);
        assert_eq!(sweep.hold, None);
        match store.claim(id(1), &outbox()) {
            Claim::Fresh {
                cursor: Some(again),
                gap: Some(GapReason::WindowExpired),
            } => store.release(&again),
            other => panic!("expected a gap, got {other:?}"),
        }
        // A live channel 2000 bytes behind a cap of 1000 stops holding WAL and parks as a gap.
        let Claim::Fresh {
            cursor: Some(b), ..
        } = store.claim(id(2), &outbox())
        else {
            panic!("fresh");
        };
        let sweep = store.sweep(2000);
        assert_eq!(sweep.capped, 1);
        store.park(&b, ParkAt::Written);
        assert!(matches!(
            store.claim(id(2), &outbox()),
            Claim::Fresh {
                gap: Some(GapReason::RetentionCap),
                ..
            }
        ));
        assert!(matches!(
            store.claim(id(2), &outbox()),
            Claim::Fresh { gap: None, .. }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_file_from_another_database_starts_afresh() {
        let dir = temp_dir("other");
        {
            let store = Store::open(&settings(&dir)).unwrap();
            store.set_routed(1_000_000);
            let Claim::Fresh {
                cursor: Some(cursor),
                ..
            } = store.claim(id(3), &outbox())
            else {
                panic!("fresh");
            };
            store.park(&cursor, ParkAt::Written);
        }
        let store = Store::open(&settings(&dir)).unwrap();
        assert_eq!(store.routed(), 1_000_000);
        // This database's WAL is at 5000: nothing of the file can be from it.
        store.check_wal(5000);
        assert_eq!(store.routed(), 0);
        assert!(matches!(
            store.claim(id(3), &outbox()),
            Claim::Fresh {
                gap: Some(GapReason::PositionLost),
                ..
            }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_file() {
        let dir = temp_dir("lock");
        let _first = Store::open(&settings(&dir)).unwrap();
        // flock locks are per open file description: a second open in this process conflicts
        // just as another process would.
        let second = Store::open(&settings(&dir));
        assert!(second.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Memory per parked channel: what 200,000 parked channels add to the process (their
    /// records are in the file, in the page cache, not counted).
    #[test]
    fn memory_per_parked_channel_is_bounded() {
        const N: u32 = 200_000;
        let dir = temp_dir("memory");
        let mut s = settings(&dir);
        s.slots = N;
        let store = Store::open(&s).unwrap();
        let outbox = outbox();
        let ids: Vec<Identity> = (0..N)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_le_bytes());
                Identity(id)
            })
            .collect();
        let _measuring = crate::test_support::MEASURING
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = crate::test_support::resident_bytes();
        for id in &ids {
            let Claim::Fresh {
                cursor: Some(cursor),
                ..
            } = store.claim(*id, &outbox)
            else {
                panic!("fresh");
            };
            store.park(&cursor, ParkAt::Written);
        }
        let per_parked = crate::test_support::resident_bytes().saturating_sub(before) / N as usize;
        println!(
            "resume: {per_parked} bytes of memory per parked channel (+ a 64-byte record in the file)"
        );
        assert!(
            per_parked > 0 && per_parked < 512,
            "{per_parked} bytes per parked channel"
        );
        assert_eq!(store.sweep(0).parked, N as usize);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_hold_is_the_oldest_live_or_parked_position() {
        let dir = temp_dir("hold");
        let store = Store::open(&settings(&dir)).unwrap();
        store.set_routed(50);
        let Claim::Fresh {
            cursor: Some(a), ..
        } = store.claim(id(1), &outbox())
        else {
            panic!("fresh");
        };
        store.set_routed(80);
        let Claim::Fresh {
            cursor: Some(b), ..
        } = store.claim(id(2), &outbox())
        else {
            panic!("fresh");
        };
        assert_eq!(store.sweep(80).hold, Some(50));
        store.advance(&a, Position::whole(90));
        assert_eq!(store.sweep(90).hold, Some(80));
        store.park(&b, ParkAt::Confirmed);
        assert_eq!(store.sweep(90).hold, Some(80));
        store.release(&a);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
