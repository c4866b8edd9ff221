//! The change source: where committed transactions come from, in commit order, and where the
//! position of what was delivered is reported back.
//!
//! Today that is this process's own WAL listener ([`WalSource`]); with several nodes it is a
//! shared log that every node reads. Either way every node delivers what it reads to its own
//! sockets only, so nothing is delivered twice.

use realtime_wal_listener::{AckHandle, Lsn, Transaction};
use std::future::Future;
use tokio::sync::mpsc;

/// Committed transactions in commit order.
pub(crate) trait ChangeSource: Send {
    /// Waits for the next transaction, then appends it and whatever else is ready, up to `max`
    /// in all. Returns false when the source has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken out of the source unless it is appended to `batch`.
    fn next_batch<'a>(
        &'a mut self,
        batch: &'a mut Vec<Transaction>,
        max: usize,
    ) -> impl Future<Output = bool> + Send + 'a;

    /// Everything up to and including `lsn` reached the sockets' outboxes, and no channel
    /// needs it again.
    fn delivered(&self, lsn: Lsn);

    /// Streams again from the oldest position not delivered (for channels that resume): the
    /// transactions after it come again, in order, after whatever was already queued.
    fn restream(&self);
}

/// The local WAL listener's stream of transactions.
#[derive(Debug)]
pub(crate) struct WalSource {
    pub(crate) transactions: mpsc::Receiver<Transaction>,
    pub(crate) ack: AckHandle,
}

impl ChangeSource for WalSource {
    async fn next_batch<'a>(&'a mut self, batch: &'a mut Vec<Transaction>, max: usize) -> bool {
        let Some(first) = self.transactions.recv().await else {
            return false;
        };
        batch.push(first);
        while batch.len() < max {
            match self.transactions.try_recv() {
                Ok(tx) => batch.push(tx),
                Err(_) => break,
            }
        }
        true
    }

    fn delivered(&self, lsn: Lsn) {
        self.ack.ack(lsn);
    }

    fn restream(&self) {
        self.ack.restream();
    }
}
