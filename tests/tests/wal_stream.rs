//! The listener against a real Postgres: DML kinds, transactions, TOAST, replica identity, truncate,
//! schema changes, authentication, TLS, typed errors, slot contention.

mod wal_common;

use std::time::Duration;

use anyhow::Context;

use realtime_tests::postgres;
use realtime_wal_listener::{Change, Error, OldTuple, ReplicaIdentity, TupleValue};
use wal_common::{config, db, start, start_ready, table, text, wait_slot_inactive};

#[tokio::test]
async fn every_dml_kind_with_metadata() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, title text, n int)")
        .await?;
    let mut l = start_ready(config(&db.url, "dml")).await?;
    let before = realtime_wal_listener::PgTimestamp::now();
    c.batch_execute("INSERT INTO items VALUES (1, 'a', 10)")
        .await?;
    c.batch_execute("UPDATE items SET title = 'b' WHERE id = 1")
        .await?;
    c.batch_execute("UPDATE items SET id = 2 WHERE id = 1")
        .await?;
    c.batch_execute("DELETE FROM items WHERE id = 2").await?;

    let t1 = l.next().await?;
    assert_eq!(t1.changes.len(), 1);
    let Change::Insert { relation, new } = &t1.changes[0] else {
        panic!("{t1:?}")
    };
    assert_eq!(
        (relation.schema.as_str(), relation.table.as_str()),
        ("public", "items")
    );
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    let cols: Vec<_> = relation
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.pg_type.name.as_str(), c.is_key))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", "int8", true),
            ("title", "text", false),
            ("n", "int4", false)
        ]
    );
    assert_eq!(
        (text(new, 0), text(new, 1), text(new, 2)),
        (Some("1"), Some("a"), Some("10"))
    );
    assert!(
        t1.commit_time >= before,
        "commit time {} before {before}",
        t1.commit_time
    );
    assert!(t1.end_lsn > t1.commit_lsn);
    let mut record = Vec::new();
    relation.write_record_json(&mut record, new, false);
    assert_eq!(
        std::str::from_utf8(&record)?,
        r#"{"id":1,"title":"a","n":10}"#
    );

    let t2 = l.next().await?;
    assert!(t2.commit_lsn > t1.commit_lsn);
    let Change::Update { old, new, .. } = &t2.changes[0] else {
        panic!("{t2:?}")
    };
    assert_eq!(
        old, &None,
        "key unchanged: no old tuple under DEFAULT identity"
    );
    assert_eq!(text(new, 1), Some("b"));

    let t3 = l.next().await?;
    let Change::Update {
        relation,
        old: Some(OldTuple::Key(key)),
        new,
    } = &t3.changes[0]
    else {
        panic!("{t3:?}")
    };
    assert_eq!(text(key, 0), Some("1"));
    assert_eq!(text(new, 0), Some("2"));
    let mut old_json = Vec::new();
    relation.write_old_record_json(&mut old_json, &OldTuple::Key(key.clone()));
    assert_eq!(std::str::from_utf8(&old_json)?, r#"{"id":1}"#);

    let t4 = l.next().await?;
    let Change::Delete {
        old: Some(OldTuple::Key(key)),
        ..
    } = &t4.changes[0]
    else {
        panic!("{t4:?}")
    };
    assert_eq!(text(key, 0), Some("2"));
    assert_eq!(key[1], TupleValue::Null);
    l.stop().await
}

#[tokio::test]
async fn multi_table_transaction_is_one_unit_in_order() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
        .await?;
    let mut l = start_ready(config(&db.url, "multi")).await?;
    c.batch_execute(
        "BEGIN; INSERT INTO a VALUES (1); INSERT INTO b VALUES (1); UPDATE a SET id = 3; \
         DELETE FROM b; COMMIT; INSERT INTO b VALUES (9);",
    )
    .await?;
    let t = l.next().await?;
    let kinds: Vec<_> = t
        .changes
        .iter()
        .map(|ch| {
            let k = match ch {
                Change::Insert { .. } => "I",
                Change::Update { .. } => "U",
                Change::Delete { .. } => "D",
                _ => "?",
            };
            format!("{k}:{}", table(ch))
        })
        .collect();
    assert_eq!(kinds, ["I:a", "I:b", "U:a", "D:b"]);
    let next = l.next().await?;
    assert_eq!(next.changes.len(), 1);
    assert!(next.commit_lsn > t.commit_lsn);
    l.stop().await
}

#[tokio::test]
async fn hundred_thousand_row_transaction() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        .await?;
    let mut l = start_ready(config(&db.url, "big")).await?;
    c.batch_execute("INSERT INTO big SELECT i, 'row ' || i FROM generate_series(1, 100000) i")
        .await?;
    // Streamed through in parts of at most `chunk_max_changes`, never held whole: the same
    // commit LSN, parts numbered from 0, only the last one marked.
    let mut parts = Vec::new();
    loop {
        let part = l.next().await?;
        let last = part.last;
        parts.push(part);
        if last {
            break;
        }
    }
    let max = realtime_wal_listener::ListenerConfig::new(
        realtime_wal_listener::ConnectConfig::from_url(&db.url)?,
        "x",
    )
    .chunk_max_changes;
    assert!(parts.len() >= 100_000 / max, "{} parts", parts.len());
    let t = &parts[0];
    let mut all = Vec::new();
    for (n, part) in parts.iter().enumerate() {
        assert_eq!(part.chunk as usize, n);
        assert_eq!(part.commit_lsn, t.commit_lsn);
        assert_eq!(part.xid, t.xid);
        assert!(part.changes.len() <= max);
        all.extend(part.changes.iter());
    }
    assert_eq!(all.len(), 100_000);
    for (i, ch) in all.iter().enumerate() {
        let Change::Insert { new, .. } = ch else {
            panic!("not an insert")
        };
        assert_eq!(text(new, 0), Some((i + 1).to_string().as_str()));
    }
    let lag = l.lag.lag();
    assert!(lag.seconds < 60.0);
    l.stop().await
}

#[tokio::test]
async fn unchanged_toast_is_kept_distinct() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await?;
    let mut l = start_ready(config(&db.url, "toast")).await?;
    // Each statement its own transaction (a multi-statement simple query is one transaction).
    for sql in [
        "INSERT INTO docs SELECT 1, 0, repeat('x', 100000)",
        "UPDATE docs SET n = 1",
        "INSERT INTO docs_full SELECT 1, 0, repeat('y', 100000)",
        "UPDATE docs_full SET n = 1",
    ] {
        c.batch_execute(sql).await?;
    }
    let ins = l.next().await?;
    let Change::Insert { new, .. } = &ins.changes[0] else {
        panic!()
    };
    assert_eq!(text(new, 2).map(str::len), Some(100_000));
    let upd = l.next().await?;
    let Change::Update { relation, old, new } = &upd.changes[0] else {
        panic!()
    };
    assert_eq!(old, &None);
    assert_eq!(new[2], TupleValue::UnchangedToast);
    let mut record = Vec::new();
    relation.write_record_json(&mut record, new, false);
    assert_eq!(
        std::str::from_utf8(&record)?,
        r#"{"id":1,"n":1}"#,
        "unchanged toast left out"
    );

    l.next().await?;
    let upd = l.next().await?;
    let Change::Update {
        old: Some(OldTuple::Full(old)),
        new,
        ..
    } = &upd.changes[0]
    else {
        panic!("{upd:?}")
    };
    assert_eq!(text(old, 1), Some("0"));
    assert!(matches!(
        new[2],
        TupleValue::UnchangedToast | TupleValue::Text(_)
    ));
    l.stop().await
}

#[tokio::test]
async fn replica_identities() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute(
        "CREATE TABLE r_default (id int PRIMARY KEY, u int, v text);
         CREATE TABLE r_full (id int PRIMARY KEY, u int, v text);
         ALTER TABLE r_full REPLICA IDENTITY FULL;
         CREATE TABLE r_nothing (id int PRIMARY KEY, u int, v text);
         ALTER TABLE r_nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE r_index (id int PRIMARY KEY, u int NOT NULL, v text);
         CREATE UNIQUE INDEX r_index_u ON r_index (u);
         ALTER TABLE r_index REPLICA IDENTITY USING INDEX r_index_u;",
    )
    .await?;
    let mut l = start_ready(config(&db.url, "identity")).await?;
    for t in ["r_default", "r_full", "r_nothing", "r_index"] {
        c.batch_execute(&format!("INSERT INTO {t} VALUES (1, 10, 'a')"))
            .await?;
        if t == "r_nothing" {
            // Postgres refuses UPDATE and DELETE on a table published without replica identity.
            let err = c
                .batch_execute("UPDATE r_nothing SET v = 'b'")
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("replica identity")
                    || format!("{err:?}").contains("replica identity")
            );
            continue;
        }
        c.batch_execute(&format!("UPDATE {t} SET v = 'b', u = 11"))
            .await?;
        c.batch_execute(&format!("DELETE FROM {t}")).await?;
    }
    // DEFAULT: update without key change has no old tuple; delete carries the key.
    l.next().await?;
    let u = l.next().await?;
    let Change::Update { relation, old, .. } = &u.changes[0] else {
        panic!()
    };
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    assert_eq!(old, &None);
    let d = l.next().await?;
    let Change::Delete {
        old: Some(OldTuple::Key(k)),
        ..
    } = &d.changes[0]
    else {
        panic!()
    };
    assert_eq!((text(k, 0), &k[1]), (Some("1"), &TupleValue::Null));

    // FULL: whole old rows.
    l.next().await?;
    let u = l.next().await?;
    let Change::Update {
        relation,
        old: Some(OldTuple::Full(o)),
        ..
    } = &u.changes[0]
    else {
        panic!("{u:?}")
    };
    assert_eq!(relation.replica_identity, ReplicaIdentity::Full);
    assert_eq!((text(o, 1), text(o, 2)), (Some("10"), Some("a")));
    let d = l.next().await?;
    let Change::Delete {
        old: Some(OldTuple::Full(o)),
        ..
    } = &d.changes[0]
    else {
        panic!()
    };
    assert_eq!(text(o, 2), Some("b"));

    // NOTHING: inserts only.
    let i = l.next().await?;
    let Change::Insert { relation, .. } = &i.changes[0] else {
        panic!()
    };
    assert_eq!(relation.replica_identity, ReplicaIdentity::Nothing);

    // USING INDEX: the index column is the key; changing it sends the key tuple.
    l.next().await?;
    let u = l.next().await?;
    let Change::Update {
        relation,
        old: Some(OldTuple::Key(k)),
        ..
    } = &u.changes[0]
    else {
        panic!("{u:?}")
    };
    assert_eq!(relation.replica_identity, ReplicaIdentity::Index);
    let keys: Vec<_> = relation
        .columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| &c.name)
        .collect();
    assert_eq!(keys, ["u"]);
    assert_eq!(text(k, 1), Some("10"));
    let d = l.next().await?;
    let Change::Delete {
        relation,
        old: Some(old @ OldTuple::Key(_)),
    } = &d.changes[0]
    else {
        panic!()
    };
    let mut j = Vec::new();
    relation.write_old_record_json(&mut j, old);
    assert_eq!(std::str::from_utf8(&j)?, r#"{"u":11}"#);
    l.stop().await
}

#[tokio::test]
async fn truncate_and_add_column_mid_stream() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE t2 (id int PRIMARY KEY)")
        .await?;
    let mut l = start_ready(config(&db.url, "truncate")).await?;
    for sql in [
        "INSERT INTO t1 VALUES (1)",
        "TRUNCATE t1, t2 RESTART IDENTITY",
        "ALTER TABLE t1 ADD COLUMN label text DEFAULT 'x'",
        "INSERT INTO t1 VALUES (2, 'two')",
    ] {
        c.batch_execute(sql).await?;
    }
    let first = l.next().await?;
    let Change::Insert {
        relation: before, ..
    } = &first.changes[0]
    else {
        panic!()
    };
    assert_eq!(before.columns.len(), 1);
    let tr = l.next().await?;
    let Change::Truncate {
        relations,
        restart_identity,
        cascade,
    } = &tr.changes[0]
    else {
        panic!("{tr:?}")
    };
    let mut names: Vec<_> = relations.iter().map(|r| r.table.as_str()).collect();
    names.sort();
    assert_eq!(names, ["t1", "t2"]);
    assert!(*restart_identity && !*cascade);
    let after = l.next().await?;
    let Change::Insert { relation, new } = &after.changes[0] else {
        panic!()
    };
    assert_eq!(relation.columns.len(), 2);
    assert_eq!(relation.columns[1].name, "label");
    assert_eq!(text(new, 1), Some("two"));
    l.stop().await
}

#[tokio::test]
async fn tables_added_to_the_publication_later_are_picked_up() -> anyhow::Result<()> {
    let cluster = postgres::cluster().await;
    let db = cluster.fresh_database().await?;
    let c = db.client().await?;
    c.batch_execute(
        "CREATE TABLE early (id int PRIMARY KEY); CREATE TABLE late (id int PRIMARY KEY);
         CREATE PUBLICATION supabase_realtime FOR TABLE early;",
    )
    .await?;
    let mut l = start_ready(config(&db.url, "later")).await?;
    c.batch_execute("INSERT INTO late VALUES (1); INSERT INTO early VALUES (1)")
        .await?;
    let t = l.next().await?;
    assert_eq!(table(&t.changes[0]), "early");
    c.batch_execute(
        "ALTER PUBLICATION supabase_realtime ADD TABLE late; INSERT INTO late VALUES (2)",
    )
    .await?;
    let t = l.next().await?;
    assert_eq!(table(&t.changes[0]), "late");
    l.stop().await
}

#[tokio::test]
async fn md5_scram_and_tls_connections() -> anyhow::Result<()> {
    let cluster = postgres::cluster().await;
    let (db, c) = db().await?;
    c.batch_execute(
        "SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 pass';
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram:pass';
         CREATE TABLE t (id int PRIMARY KEY);
         GRANT SELECT ON t TO md5_user, scram_user;",
    )
    .await?;
    let mut urls = vec![
        ("md5", cluster.url_for("md5_user", "md5%20pass", &db.name)),
        (
            "scram",
            cluster.url_for("scram_user", "scram%3Apass", &db.name),
        ),
    ];
    if cluster.tls() {
        urls.push((
            "prefer",
            cluster
                .url_for("scram_user", "scram%3Apass", &db.name)
                .replace("sslmode=disable", "sslmode=prefer"),
        ));
        urls.push((
            "tls",
            cluster
                .url_for("scram_user", "scram%3Apass", &db.name)
                .replace("sslmode=disable", "sslmode=require"),
        ));
    }
    for (i, (label, url)) in urls.iter().enumerate() {
        let mut l = start_ready(config(url, &format!("auth_{label}"))).await?;
        c.batch_execute(&format!("INSERT INTO t VALUES ({i})"))
            .await?;
        let t = l
            .next()
            .await
            .with_context(|| format!("listener over {label}"))?;
        assert_eq!(
            text(t.changes[0].new_tuple(), 0),
            Some(i.to_string().as_str()),
            "{label}"
        );
        if matches!(*label, "tls" | "prefer") {
            let ssl: Option<bool> = c
                .query_one(
                    "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                     WHERE a.usename = 'scram_user' AND a.backend_type = 'walsender'",
                    &[],
                )
                .await?
                .get(0);
            assert_eq!(ssl, Some(true), "walsender connection is encrypted");
        }
        l.stop().await?;
    }
    // Wrong password: a typed authentication failure, not retried.
    let bad = cluster.url_for("scram_user", "nope", &db.name);
    let l = start(config(&bad, "auth_bad"));
    let err = tokio::time::timeout(wal_common::WAIT, l.task)
        .await??
        .unwrap_err();
    assert!(
        matches!(err, Error::Server(ref e) if e.code == "28P01"),
        "{err:?}"
    );
    Ok(())
}

trait NewTuple {
    fn new_tuple(&self) -> &[TupleValue];
}

impl NewTuple for Change {
    fn new_tuple(&self) -> &[TupleValue] {
        match self {
            Change::Insert { new, .. } | Change::Update { new, .. } => new,
            _ => &[],
        }
    }
}

#[tokio::test]
async fn typed_errors() -> anyhow::Result<()> {
    let cluster = postgres::cluster().await;
    // Publication missing.
    let bare = cluster.fresh_database().await?;
    let l = start(config(&bare.url, "nopub"));
    let err = tokio::time::timeout(wal_common::WAIT, l.task)
        .await??
        .unwrap_err();
    assert!(
        matches!(err, Error::PublicationMissing { ref publication } if publication == "supabase_realtime"),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    // Missing REPLICATION attribute.
    let (db, c) = db().await?;
    c.batch_execute("CREATE ROLE plain_user LOGIN PASSWORD 'pw'")
        .await?;
    let l = start(config(
        &cluster.url_for("plain_user", "pw", &db.name),
        "nopriv",
    ));
    let err = tokio::time::timeout(wal_common::WAIT, l.task)
        .await??
        .unwrap_err();
    assert!(
        matches!(err, Error::MissingReplicationPrivilege { ref user } if user == "plain_user"),
        "{err:?}"
    );

    // A slot of another plugin.
    c.batch_execute("SELECT pg_create_logical_replication_slot('decoding', 'test_decoding')")
        .await?;
    let l = start(config(&db.url, "decoding"));
    let err = tokio::time::timeout(wal_common::WAIT, l.task)
        .await??
        .unwrap_err();
    assert!(matches!(err, Error::SlotMismatch { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn slot_held_by_another_connection_waits_then_proceeds() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let mut first = start_ready(config(&db.url, "shared")).await?;
    c.batch_execute("INSERT INTO t VALUES (1)").await?;
    first.next().await?;

    let mut second = start(config(&db.url, "shared"));
    // The second listener cannot get the slot while the first streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(second.rx.try_recv().is_err());
    assert!(
        !second.task.is_finished(),
        "second listener gave up instead of waiting"
    );

    first.stop().await?;
    wait_slot_inactive(&c, "shared").await.ok();
    c.batch_execute("INSERT INTO t VALUES (2)").await?;
    let t = second.next().await?;
    let Change::Insert { new, .. } = &t.changes[0] else {
        panic!()
    };
    assert_eq!(
        text(new, 0),
        Some("2"),
        "the acked first transaction is not redelivered"
    );
    second.stop().await
}

#[tokio::test]
async fn slot_busy_timeout_gives_a_typed_error() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let mut first = start_ready(config(&db.url, "busy")).await?;
    c.batch_execute("INSERT INTO t VALUES (1)").await?;
    first.next().await?;
    let mut cfg = config(&db.url, "busy");
    cfg.slot_busy_timeout = Some(Duration::from_millis(300));
    let second = start(cfg);
    let err = tokio::time::timeout(wal_common::WAIT, second.task)
        .await??
        .unwrap_err();
    assert!(matches!(err, Error::SlotActive { .. }), "{err:?}");
    first.stop().await
}

#[tokio::test]
async fn backpressure_stops_reading_and_drops_nothing() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let mut cfg = config(&db.url, "backpressure");
    cfg.queue_capacity = 2;
    let mut l = start_ready(cfg).await?;
    for i in 0..200 {
        c.execute("INSERT INTO t VALUES ($1)", &[&i]).await?;
    }
    // Nobody reads for a while: the queue holds 2, the rest waits in Postgres.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lag = l.lag.lag();
    assert!(lag.bytes > 0, "{lag:?}");
    for i in 0..200 {
        let t = l.next().await?;
        let Change::Insert { new, .. } = &t.changes[0] else {
            panic!()
        };
        assert_eq!(text(new, 0), Some(i.to_string().as_str()));
    }
    l.stop().await
}

#[tokio::test]
async fn logical_messages_with_the_messages_option() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    let mut cfg = config(&db.url, "messages");
    cfg.messages = true;
    let mut l = start_ready(cfg).await?;
    c.batch_execute("SELECT pg_logical_emit_message(false, 'realtime', 'outside')")
        .await?;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         BEGIN; INSERT INTO t VALUES (1);
         SELECT pg_logical_emit_message(true, 'realtime', 'inside'); COMMIT;",
    )
    .await?;
    let outside = l.next().await?;
    assert_eq!(outside.xid, 0);
    assert_eq!(outside.commit_lsn, outside.end_lsn);
    let Change::Message {
        transactional,
        prefix,
        content,
    } = &outside.changes[0]
    else {
        panic!("{outside:?}")
    };
    assert!(!transactional);
    assert_eq!(
        (prefix.as_str(), &content[..]),
        ("realtime", &b"outside"[..])
    );
    let inside = l.next().await?;
    assert!(inside.commit_lsn > outside.commit_lsn);
    assert!(matches!(inside.changes[0], Change::Insert { .. }));
    let Change::Message {
        transactional,
        content,
        ..
    } = &inside.changes[1]
    else {
        panic!("{inside:?}")
    };
    assert!(*transactional);
    assert_eq!(&content[..], b"inside");
    l.stop().await
}
