//! Counters and gauges, rendered in the Prometheus text format on `/metrics`.
//!
//! Plain atomics: incrementing one is a relaxed add, and rendering reads them once.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why a socket closed, for `realtime_socket_closes_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseKind {
    Client,
    IdleTimeout,
    SlowConsumer,
    Shutdown,
    Error,
    /// A new join of the same client took the socket's channel over.
    Replaced,
}

impl CloseKind {
    const ALL: [CloseKind; 6] = [
        CloseKind::Client,
        CloseKind::IdleTimeout,
        CloseKind::SlowConsumer,
        CloseKind::Shutdown,
        CloseKind::Error,
        CloseKind::Replaced,
    ];

    fn label(self) -> &'static str {
        match self {
            CloseKind::Client => "client",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::SlowConsumer => "slow_consumer",
            CloseKind::Shutdown => "shutdown",
            CloseKind::Error => "error",
            CloseKind::Replaced => "replaced",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) connections: AtomicI64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) channels: AtomicI64,
    pub(crate) joins_total: AtomicU64,
    pub(crate) join_errors_total: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) malformed_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) broadcasts_total: AtomicU64,
    pub(crate) rest_broadcasts_total: AtomicU64,
    pub(crate) dropped_deliveries: AtomicU64,
    pub(crate) wal_transactions: AtomicU64,
    pub(crate) wal_changes: AtomicU64,
    pub(crate) wal_redelivered: AtomicU64,
    pub(crate) postgres_changes_out: AtomicU64,
    pub(crate) visibility_queries: AtomicU64,
    pub(crate) visibility_policy_decisions: AtomicU64,
    pub(crate) db_broadcasts: AtomicU64,
    pub(crate) wal_backpressure_waits: AtomicU64,
    pub(crate) deletes_unknown: AtomicU64,
    pub(crate) resumes: AtomicU64,
    pub(crate) resume_gaps: AtomicU64,
    pub(crate) replayed_changes: AtomicU64,
    pub(crate) restreams: AtomicU64,
    closes: [AtomicU64; 6],
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn gauge(gauge: &AtomicI64, delta: i64) {
        gauge.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, kind: CloseKind) {
        let i = CloseKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.closes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "realtime_connections",
            "Open WebSocket connections.",
            load_i(&self.connections),
        );
        gauge(
            "realtime_channels",
            "Joined channels.",
            load_i(&self.channels),
        );
        let counters: &[(&str, &str, &AtomicU64)] = &[
            (
                "realtime_connections_total",
                "WebSocket connections accepted.",
                &self.connections_total,
            ),
            (
                "realtime_connections_refused_total",
                "WebSocket upgrades refused.",
                &self.connections_refused,
            ),
            (
                "realtime_joins_total",
                "Successful channel joins.",
                &self.joins_total,
            ),
            (
                "realtime_join_errors_total",
                "Refused channel joins.",
                &self.join_errors_total,
            ),
            (
                "realtime_messages_in_total",
                "Frames received from clients.",
                &self.messages_in,
            ),
            (
                "realtime_malformed_messages_total",
                "Frames dropped as malformed.",
                &self.malformed_in,
            ),
            (
                "realtime_messages_out_total",
                "Frames written to clients.",
                &self.messages_out,
            ),
            (
                "realtime_bytes_out_total",
                "Bytes of frames written to clients.",
                &self.bytes_out,
            ),
            (
                "realtime_broadcasts_total",
                "Broadcasts fanned out from sockets.",
                &self.broadcasts_total,
            ),
            (
                "realtime_rest_broadcasts_total",
                "Broadcasts received over REST.",
                &self.rest_broadcasts_total,
            ),
            (
                "realtime_dropped_deliveries_total",
                "Deliveries dropped because a socket did not drain.",
                &self.dropped_deliveries,
            ),
            (
                "realtime_wal_transactions_total",
                "Transactions received from the WAL stream.",
                &self.wal_transactions,
            ),
            (
                "realtime_deletes_unknown_total",
                "DELETEs of RLS tables whose old row was not known (DELETE_UNKNOWN decided who got them).",
                &self.deletes_unknown,
            ),
            (
                "realtime_wal_backpressure_waits_total",
                "Times the change stream paused for a socket whose outbox was full.",
                &self.wal_backpressure_waits,
            ),
            (
                "realtime_wal_redelivered_total",
                "Transactions the WAL stream delivered again that no resuming channel needed, dropped.",
                &self.wal_redelivered,
            ),
            (
                "realtime_resumes_total",
                "Joins that took over a parked channel and got what it missed.",
                &self.resumes,
            ),
            (
                "realtime_resume_gaps_total",
                "Joins told with a ResumeGap system message that changes were missed.",
                &self.resume_gaps,
            ),
            (
                "realtime_replayed_changes_total",
                "postgres_changes frames queued to resuming channels from the replayed stream.",
                &self.replayed_changes,
            ),
            (
                "realtime_wal_restreams_total",
                "Times the change stream was read again from the slot for resuming channels.",
                &self.restreams,
            ),
            (
                "realtime_wal_changes_total",
                "Row changes received from the WAL stream.",
                &self.wal_changes,
            ),
            (
                "realtime_postgres_changes_out_total",
                "postgres_changes frames queued to sockets.",
                &self.postgres_changes_out,
            ),
            (
                "realtime_visibility_queries_total",
                "Batched RLS visibility queries.",
                &self.visibility_queries,
            ),
            (
                "realtime_visibility_policy_decisions_total",
                "Row visibility decided in process from the table's policies, per subscriber group and row.",
                &self.visibility_policy_decisions,
            ),
            (
                "realtime_db_broadcasts_total",
                "Broadcasts from the database (realtime.messages).",
                &self.db_broadcasts,
            ),
        ];
        for &(name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "realtime_socket_closes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sockets closed, by reason.\n# TYPE {name} counter"
        );
        for (kind, v) in CloseKind::ALL.iter().zip(&self.closes) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                kind.label(),
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

fn load_i(v: &AtomicI64) -> i64 {
    v.load(Ordering::Relaxed)
}
