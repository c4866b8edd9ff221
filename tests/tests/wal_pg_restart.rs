//! Restart Postgres (`pg_ctl restart -m fast`) mid-stream: the listener reconnects by itself and the
//! consumer ends up with exactly the committed set. Its own test binary, so its own cluster.

mod wal_common;

use std::collections::{BTreeMap, BTreeSet};

use realtime_tests::postgres;
use realtime_wal_listener::Lsn;
use wal_common::{config, db, inserted_ids, start_ready, table_ids, write_rows};

const ROWS: i64 = 3000;

#[tokio::test]
async fn postgres_restart_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let cluster = postgres::cluster().await;
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY)")
        .await?;
    let mut l = start_ready(config(&db.url, "pgrestart")).await?;
    let writer = tokio::spawn(write_rows(db.url.clone(), 0, ROWS));

    let mut seen: BTreeMap<Lsn, Vec<i64>> = BTreeMap::new();
    let mut received = BTreeSet::new();
    let mut redelivered = 0;
    let mut restart: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut committed: Option<BTreeSet<i64>> = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Some(all) = &committed
            && received.len() >= all.len()
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not every committed row arrived"
        );
        // Everything may have arrived before the restart is over: look at the restart and the
        // writer again every 250 ms instead of waiting for a transaction that will not come.
        let tx = match tokio::time::timeout(std::time::Duration::from_millis(250), l.next()).await {
            Ok(tx) => tx?,
            Err(_) => {
                if restart.as_ref().is_some_and(|r| r.is_finished())
                    && committed.is_none()
                    && writer.is_finished()
                {
                    committed = Some(table_ids(&postgres::connect(&db.url).await?).await?);
                }
                continue;
            }
        };
        let ids = inserted_ids(&tx);
        match seen.get(&tx.commit_lsn) {
            Some(previous) => {
                assert_eq!(previous, &ids, "redelivered with the same lsn and rows");
                redelivered += 1;
            }
            None => {
                seen.insert(tx.commit_lsn, ids.clone());
            }
        }
        received.extend(ids);
        if restart.is_none() && received.len() > 500 {
            // Keep consuming meanwhile: a fast shutdown waits until the walsender's receiver has
            // confirmed everything sent, which takes acknowledgements.
            restart = Some(tokio::task::spawn_blocking(|| cluster.restart()));
        }
        if restart.as_ref().is_some_and(|r| r.is_finished())
            && committed.is_none()
            && writer.is_finished()
        {
            committed = Some(table_ids(&postgres::connect(&db.url).await?).await?);
        }
    }
    writer.await??;
    restart.expect("restarted").await??;
    let committed = committed.unwrap_or_default();
    assert!(committed.len() as i64 >= ROWS);
    assert_eq!(received, committed, "exactly the committed set");
    eprintln!("redelivered after restart: {redelivered}");
    l.stop().await
}
