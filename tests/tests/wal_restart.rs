//! Kill the listener mid-stream (its task aborted: no goodbye, no final status update, like kill -9)
//! and start another: exactly the committed set arrives, only unacknowledged transactions come again,
//! and they come with the same LSN.

mod wal_common;

use std::collections::{BTreeMap, BTreeSet};

use realtime_wal_listener::Lsn;
use wal_common::{config, db, inserted_ids, start, start_ready, table_ids, write_rows};

const ROWS: i64 = 3000;

#[tokio::test]
async fn kill_mid_stream_then_restart_delivers_exactly_the_committed_set() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY)")
        .await?;
    let cfg = config(&db.url, "killed");
    let mut first = start_ready(cfg.clone()).await?;
    let writer = tokio::spawn(write_rows(db.url.clone(), 0, ROWS));

    // Phase 1: receive 600 transactions; acknowledge all but the last 50 ("not yet handed on").
    let mut seen: BTreeMap<Lsn, Vec<i64>> = BTreeMap::new();
    let mut order = Vec::new();
    while order.len() < 600 {
        let tx = first.next_unacked().await?;
        order.push(tx.commit_lsn);
        assert!(seen.insert(tx.commit_lsn, inserted_ids(&tx)).is_none());
    }
    let acked = order[order.len() - 51];
    first.ack.ack(acked);
    // Let a status update carry the ack, then die without a goodbye.
    wal_common::wait_flushed(&first, acked).await?;
    first.task.abort();
    let _ = first.task.await;
    drop(first.rx);

    // Phase 2: a new listener on the same slot, while the writer keeps going.
    let mut second = start(cfg);
    writer.await??;
    let committed = table_ids(&c).await?;
    assert_eq!(committed.len() as i64, ROWS);
    let mut received: BTreeSet<i64> = seen.values().flatten().copied().collect();
    let mut redelivered = 0;
    while received.len() < committed.len() {
        let tx = second.next().await?;
        let ids = inserted_ids(&tx);
        if let Some(previous) = seen.get(&tx.commit_lsn) {
            assert_eq!(
                previous, &ids,
                "redelivered transaction has the same lsn and rows"
            );
            assert!(
                tx.commit_lsn > acked,
                "acknowledged transaction {} came again",
                tx.commit_lsn
            );
            redelivered += 1;
        } else {
            assert!(
                seen.keys()
                    .next_back()
                    .is_none_or(|last| tx.commit_lsn > *last),
                "new transactions continue in commit order"
            );
            seen.insert(tx.commit_lsn, ids.clone());
        }
        for id in ids {
            received.insert(id);
        }
    }
    assert_eq!(received, committed, "exactly the committed set");
    assert_eq!(
        redelivered, 50,
        "the 50 unacknowledged transactions came again, nothing else"
    );
    second.stop().await
}
