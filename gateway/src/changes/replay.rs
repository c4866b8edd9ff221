//! The router's side of resuming: which changes of the stream are live, which are a replay for
//! resuming channels, and who gets them.
//!
//! The stream is one log read in order. `high` is the newest change routed live. When a
//! resuming channel needs changes before `high`, the router asks the source to stream again
//! from the slot's confirmed position (which never passed the channel's position): the changes
//! up to `high` come again, and go only to channels that are replaying, each from its own
//! position; past `high` the stream is live again and the replaying channels with it.
//!
//! - A channel that resumes waits (gets nothing, not even live changes) until the stream is
//!   back at its position; so what it missed comes first, in commit order, then live changes,
//!   without a duplicate.
//! - The router notices a new session by a position that goes back: then every waiting channel
//!   replays, and a channel already replaying continues after what it got.

use crate::resume::{Cursor, Phase, Position};
use std::sync::Arc;

/// How one change is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A new change: every live channel.
    Live,
    /// Already routed live: only replaying channels after their position.
    Replay,
    /// Already routed, and nobody replays: dropped.
    Skip,
}

/// Positions of the stream as the router has seen it.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// The newest change routed live.
    high: Position,
    /// The last change routed (live or replayed).
    cursor: Position,
    /// (commit LSN, index of the next change) of the transaction being received in parts.
    next_index: (u64, u32),
    /// Channels waiting for or in a replay.
    resumers: Vec<Arc<Cursor>>,
    /// A new session was asked for and has not started yet.
    restream_pending: bool,
    /// Sessions seen (a new one can make waiting channels replaying).
    sessions: u64,
}

impl Replay {
    /// Starts after a process restart: what the last process routed live is a replay now.
    pub(crate) fn new(routed: u64) -> Replay {
        let high = Position::whole(routed);
        Replay {
            high,
            cursor: high,
            ..Replay::default()
        }
    }

    /// A channel resuming from its position: live at once when it missed nothing, replaying
    /// when a replay that covers it is under way, else waiting. Returns true when a new
    /// session must be asked for.
    pub(crate) fn admit(&mut self, cursor: Arc<Cursor>) -> bool {
        self.resumers.retain(|c| !c.is_retired());
        let from = cursor.from();
        if from >= self.high {
            cursor.set_phase(Phase::Live);
            return false;
        }
        if self.cursor < self.high && from >= self.cursor {
            cursor.set_phase(Phase::Replaying);
            self.resumers.push(cursor);
            return false;
        }
        cursor.set_phase(Phase::Waiting);
        self.resumers.push(cursor);
        !std::mem::replace(&mut self.restream_pending, true)
    }

    /// The index of the first change of part `chunk` (of `changes` changes) of the transaction
    /// committed at `lsn`; notices a new session.
    pub(crate) fn begin(&mut self, lsn: u64, chunk: u32, changes: usize) -> u32 {
        let base = if chunk == 0 || self.next_index.0 != lsn {
            0
        } else {
            self.next_index.1
        };
        self.next_index = (lsn, base.saturating_add(changes as u32));
        let first = Position { lsn, index: base };
        if first <= self.cursor && changes > 0 {
            self.new_session();
        }
        base
    }

    /// Counts sessions: who replays changes only when a new one starts.
    pub(crate) fn session(&self) -> u64 {
        self.sessions
    }

    fn new_session(&mut self) {
        self.sessions += 1;
        self.restream_pending = false;
        self.resumers.retain(|c| !c.is_retired());
        for c in &self.resumers {
            match c.phase() {
                Phase::Waiting => c.set_phase(Phase::Replaying),
                // It has everything up to where the last session stopped.
                Phase::Replaying => c.raise_from(self.cursor),
                Phase::Live => {}
            }
        }
    }

    /// Routes the change at `at`.
    pub(crate) fn change(&mut self, at: Position) -> Mode {
        self.cursor = at;
        if at > self.high {
            if !self.resumers.is_empty() {
                // The replay reached the live edge: replaying channels are live from here.
                self.resumers.retain(|c| {
                    if c.phase() == Phase::Replaying {
                        c.set_phase(Phase::Live);
                        false
                    } else {
                        !c.is_retired()
                    }
                });
            }
            self.high = at;
            return Mode::Live;
        }
        if self.resumers.iter().any(|c| c.phase() == Phase::Replaying) {
            Mode::Replay
        } else {
            Mode::Skip
        }
    }

    /// Whether a channel gets the change at `at` routed in `mode`.
    pub(crate) fn admits(mode: Mode, cursor: Option<&Cursor>, at: Position) -> bool {
        match (mode, cursor) {
            (Mode::Live, None) => true,
            (Mode::Live, Some(c)) => c.phase() != Phase::Waiting,
            (Mode::Replay, Some(c)) => c.phase() == Phase::Replaying && at > c.from(),
            (Mode::Replay, None) | (Mode::Skip, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, index: u32) -> Position {
        Position { lsn, index }
    }

    /// Routes one single-change transaction and says who of `cursors` gets it.
    fn route(replay: &mut Replay, lsn: u64, cursors: &[&Arc<Cursor>]) -> (Mode, Vec<bool>) {
        let base = replay.begin(lsn, 0, 1);
        let p = at(lsn, base);
        let mode = replay.change(p);
        let got = cursors
            .iter()
            .map(|c| Replay::admits(mode, Some(c), p))
            .collect();
        (mode, got)
    }

    fn cursor(from: Position) -> Arc<Cursor> {
        Arc::new(Cursor::for_tests(from))
    }

    #[test]
    fn a_resumer_gets_what_it_missed_in_order_then_live_without_a_duplicate() {
        let mut replay = Replay::new(0);
        let live = cursor(Position::default());
        live.set_phase(Phase::Live);
        for lsn in 1..=5 {
            assert_eq!(route(&mut replay, lsn, &[&live]), (Mode::Live, vec![true]));
        }
        // Parked after change 2: it waits, and live changes skip it meanwhile.
        let back = cursor(at(2, 0));
        assert!(replay.admit(back.clone()), "a new session is asked for");
        assert!(!replay.admit(cursor(at(3, 0))), "asked once");
        assert_eq!(
            route(&mut replay, 6, &[&live, &back]),
            (Mode::Live, vec![true, false])
        );
        // The new session starts at 2 (the slot's confirmed position held it).
        let mut got = Vec::new();
        for lsn in 2..=6 {
            let (mode, who) = route(&mut replay, lsn, &[&live, &back]);
            assert_eq!(mode, Mode::Replay);
            assert!(!who[0], "a live channel gets no replay");
            if who[1] {
                got.push(lsn);
            }
        }
        assert_eq!(got, vec![3, 4, 5, 6]);
        assert_eq!(
            route(&mut replay, 7, &[&live, &back]),
            (Mode::Live, vec![true, true])
        );
        assert_eq!(back.phase(), Phase::Live);
    }

    #[test]
    fn a_session_that_restarts_mid_replay_continues_after_what_was_replayed() {
        let mut replay = Replay::new(0);
        for lsn in 1..=6 {
            route(&mut replay, lsn, &[]);
        }
        let a = cursor(at(3, 0));
        assert!(replay.admit(a.clone()));
        let mut got = Vec::new();
        for lsn in 3..=4 {
            if route(&mut replay, lsn, &[&a]).1[0] {
                got.push(lsn);
            }
        }
        // A second resumer further back: another session, from 1.
        let b = cursor(at(1, 0));
        assert!(replay.admit(b.clone()));
        let mut got_b = Vec::new();
        for lsn in 1..=7 {
            let (_, who) = route(&mut replay, lsn, &[&a, &b]);
            if who[0] {
                got.push(lsn);
            }
            if who[1] {
                got_b.push(lsn);
            }
        }
        assert_eq!(got, vec![4, 5, 6, 7], "no change twice");
        assert_eq!(got_b, vec![2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_resumer_that_missed_nothing_is_live_at_once_and_parts_keep_their_index() {
        let mut replay = Replay::new(0);
        assert_eq!(replay.begin(10, 0, 3), 0);
        for i in 0..3 {
            assert_eq!(replay.change(at(10, i)), Mode::Live);
        }
        assert_eq!(replay.begin(10, 1, 2), 3);
        assert_eq!(replay.change(at(10, 3)), Mode::Live);
        assert_eq!(replay.change(at(10, 4)), Mode::Live);
        let done = cursor(Position::whole(10));
        assert!(!replay.admit(done.clone()));
        assert_eq!(done.phase(), Phase::Live);
        // Streamed again from part 0: positions go back, a new session; nobody replays.
        assert_eq!(replay.begin(10, 0, 3), 0);
        assert_eq!(replay.change(at(10, 0)), Mode::Skip);
    }
}
