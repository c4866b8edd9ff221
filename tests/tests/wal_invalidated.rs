//! A slot that lost the WAL it needed (`max_slot_wal_keep_size` exceeded) gives the typed
//! `SlotInvalidated` error, not a retry loop. Own binary: it changes cluster settings.

mod wal_common;

use realtime_wal_listener::Error;
use wal_common::{config, db, start, start_ready};

#[tokio::test]
async fn invalidated_slot_is_a_typed_error() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE t (id int PRIMARY KEY, pad text)",
    ] {
        c.batch_execute(sql).await?;
    }
    let l = start_ready(config(&db.url, "lost")).await?;
    l.stop().await?;
    wal_common::wait_slot_inactive(&c, "lost").await?;
    // Move the WAL several segments past the slot, then checkpoint: the slot is invalidated.
    for i in 0..5 {
        c.execute("INSERT INTO t VALUES ($1, repeat('x', 1000))", &[&i])
            .await?;
        c.batch_execute("SELECT pg_switch_wal()").await?;
    }
    c.batch_execute("CHECKPOINT").await?;
    let status: Option<String> = c
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lost'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(status.as_deref(), Some("lost"));

    let l = start(config(&db.url, "lost"));
    let err = tokio::time::timeout(wal_common::WAIT, l.task)
        .await??
        .unwrap_err();
    assert!(
        matches!(err, Error::SlotInvalidated { ref slot } if slot == "lost"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    Ok(())
}
