//! A slot that lost the WAL it needed (`max_slot_wal_keep_size` exceeded) gives the typed
//! `SlotInvalidated` error, not a retry loop. Own binary: it changes cluster settings.

mod wal_common;

use realtime_wal_listener::Error;
use wal_common::{config, db, start, start_ready};

/// Creates `slot` (streamed once, then left), and moves the WAL several segments past it with
/// `max_slot_wal_keep_size` at 1 MB, then checkpoints: Postgres invalidates the slot.
async fn invalidate(
    url: &str,
    c: &tokio_postgres::Client,
    slot: &str,
    table: &str,
) -> anyhow::Result<()> {
    c.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await?;
    c.batch_execute("SELECT pg_reload_conf()").await?;
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, pad text)"
    ))
    .await?;
    let l = start_ready(config(url, slot)).await?;
    l.stop().await?;
    wal_common::wait_slot_inactive(c, slot).await?;
    for i in 0..5 {
        c.execute(
            &format!("INSERT INTO {table} VALUES ($1, repeat('x', 1000))"),
            &[&i],
        )
        .await?;
        c.batch_execute("SELECT pg_switch_wal()").await?;
    }
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

#[tokio::test]
async fn invalidated_slot_is_a_typed_error() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    invalidate(&db.url, &c, "lost", "t").await?;
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

/// With `recreate_lost_slot`, an invalidated slot is dropped and created again: streaming goes
/// on, and the gap is counted with its reason so the consumer can tell its subscribers.
#[tokio::test]
async fn invalidated_slot_is_recreated_and_the_gap_counted() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    invalidate(&db.url, &c, "lost2", "t2").await?;
    let mut cfg = config(&db.url, "lost2");
    cfg.recreate_lost_slot = true;
    let mut l = start_ready(cfg).await?;
    assert_eq!(l.lag.gaps(), (1, "slot_invalidated"));
    c.execute("INSERT INTO t2 VALUES (100, 'after')", &[])
        .await?;
    let tx = l.next().await?;
    assert_eq!(tx.changes.len(), 1);
    l.stop().await
}

/// A slot dropped behind the listener's back (while it reconnects) is created again and the gap
/// counted as `slot_dropped`.
#[tokio::test]
async fn dropped_slot_is_recreated_and_the_gap_counted() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t3 (id int PRIMARY KEY)")
        .await?;
    let mut cfg = config(&db.url, "gone");
    // Room to drop the slot between the cut and the reconnect.
    cfg.backoff_initial = std::time::Duration::from_secs(2);
    let mut l = start_ready(cfg).await?;
    c.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'gone'",
    )
    .await?;
    wal_common::wait_slot_inactive(&c, "gone").await?;
    c.batch_execute("SELECT pg_drop_replication_slot('gone')")
        .await?;
    realtime_tests::postgres::wait_for(wal_common::WAIT, "the slot recreated", || async {
        Ok((l.lag.gaps().0 == 1 && l.lag.is_streaming()).then_some(()))
    })
    .await?;
    assert_eq!(l.lag.gaps(), (1, "slot_dropped"));
    c.execute("INSERT INTO t3 VALUES (1)", &[]).await?;
    assert_eq!(l.next().await?.changes.len(), 1);
    l.stop().await
}
