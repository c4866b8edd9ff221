//! With `wal_sender_timeout` at 1 s, a consumer that does not read for several seconds does not cost
//! the connection: the listener keeps sending status updates while it waits for queue room. Also: on
//! shutdown the final status update confirms what was acknowledged. Own binary: changes cluster settings.

mod wal_common;

use std::time::Duration;

use realtime_wal_listener::Change;
use wal_common::{config, db, start_ready, text};

#[tokio::test]
async fn blocked_consumer_keeps_the_connection_and_shutdown_confirms_acks() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    for sql in [
        "ALTER SYSTEM SET wal_sender_timeout = '1s'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE t (id int PRIMARY KEY)",
    ] {
        c.batch_execute(sql).await?;
    }
    let mut cfg = config(&db.url, "keepalive");
    cfg.queue_capacity = 1;
    cfg.status_interval = Duration::from_millis(300);
    let mut l = start_ready(cfg).await?;
    let pid_of_walsender = || async {
        let row = c
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'keepalive'",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, Option<i32>>(0))
    };
    let before = pid_of_walsender().await?;
    for i in 0..20 {
        c.execute("INSERT INTO t VALUES ($1)", &[&i]).await?;
    }
    // Nobody reads for 3 s: three walsender timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..20 {
        let tx = l.next().await?;
        let Change::Insert { new, .. } = &tx.changes[0] else {
            panic!()
        };
        assert_eq!(text(new, 0), Some(i.to_string().as_str()));
    }
    assert_eq!(
        pid_of_walsender().await?,
        before,
        "the walsender was not replaced"
    );
    l.stop().await?;

    // The final status update on shutdown confirms the last acknowledged transaction: with periodic
    // updates a minute apart and keepalive requests half a minute apart, only it can.
    for sql in [
        "ALTER SYSTEM RESET wal_sender_timeout",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await?;
    }
    let mut cfg = config(&db.url, "keepalive");
    cfg.status_interval = Duration::from_secs(60);
    let mut l = start_ready(cfg).await?;
    c.execute("INSERT INTO t VALUES (100)", &[]).await?;
    let tx = l.next().await?;
    l.stop().await?;
    // The walsender applies the update after our write returns: poll briefly.
    let end = tx.end_lsn;
    realtime_tests::postgres::wait_for(Duration::from_secs(5), "confirmed flush", || async {
        let confirmed: String = c
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = 'keepalive'",
                &[],
            )
            .await?
            .get(0);
        let confirmed: realtime_wal_listener::Lsn = confirmed.parse()?;
        Ok((confirmed >= end).then_some(()))
    })
    .await?;
    Ok(())
}
