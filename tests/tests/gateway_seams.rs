//! The seams of the data path against a real database: the socket's loop never waits on the
//! database, a join reply always precedes its channel's first change, and a token refresh that
//! cannot reach the database keeps the subscription that works.

use realtime_protocol::Vsn;
use realtime_tests::gateway::ITEMS;
use realtime_tests::gateway::{Client, Received, TestGateway, now_secs};
use realtime_tests::postgres::cluster;
use serde_json::json;
use std::time::{Duration, Instant};

fn pg_changes(table: &str) -> serde_json::Value {
    json!({"broadcast": {"ack": false, "self": false}, "presence": {"enabled": false}, "private": false,
           "postgres_changes": [{"event": "INSERT", "schema": "public", "table": table}]})
}

#[tokio::test]
async fn heartbeats_are_answered_while_a_join_waits_on_the_database() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, "").await?;
    // A read policy that takes 5 s for the topic `slow`.
    db.client()
        .await?
        .batch_execute(
            "create function public.slow_true() returns boolean language sql volatile as
               'select pg_sleep(5); select true';
             grant execute on function public.slow_true() to authenticated;
             create policy slow_read on realtime.messages for select to authenticated
               using (realtime.topic() = 'slow' and public.slow_true());",
        )
        .await?;
    let token = gw.tokens().custom(&json!({"role": "authenticated", "sub": "7e0fa5d2-5e27-4a55-9e1c-0b6c2f3f7f11", "exp": now_secs() + 600}));
    let mut client = gw.connect_with_key(Vsn::V2, &token).await?;
    let started = Instant::now();
    let join_ref = client
        .join(
            "realtime:slow",
            &json!({"config": {"private": true, "broadcast": {"self": false}, "presence": {"enabled": false}}}),
        )
        .await?;
    let mut worst = Duration::ZERO;
    let mut answered = 0;
    let joined = loop {
        let sent = Instant::now();
        let hb = client.heartbeat().await?;
        // Read until this heartbeat's reply; the join reply may come first.
        let mut join_reply = None;
        loop {
            match client.recv_within(Duration::from_secs(2)).await? {
                Received::Text(t) if t.topic == "phoenix" && t.msg_ref == json!(hb) => break,
                Received::Text(t) if t.topic == "realtime:slow" && t.msg_ref == json!(join_ref) => {
                    join_reply = Some((t, started.elapsed()));
                }
                other => anyhow::bail!("unexpected frame {other:?}"),
            }
        }
        worst = worst.max(sent.elapsed());
        answered += 1;
        if let Some(reply) = join_reply {
            break reply;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the join never finished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (reply, after) = joined;
    assert_eq!(reply.status(), Some("ok"), "{}", reply.raw);
    assert!(
        after >= Duration::from_millis(4_500),
        "the join did wait on the database: {after:?}"
    );
    assert!(
        answered >= 10,
        "heartbeats answered during the join: {answered}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "slowest heartbeat reply during the join: {worst:?}"
    );
    client.close().await?;
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn the_join_reply_precedes_the_first_change_under_load() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, ITEMS).await?;
    // A writer commits rows throughout.
    let writer_db = db.client().await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        let mut n = 0u64;
        while !writer_stop.is_cancelled() {
            writer_db
                .execute(
                    "insert into public.items (v) select g from generate_series(1, 20) g",
                    &[],
                )
                .await?;
            n += 20;
        }
        anyhow::Ok(n)
    });
    let mut client = gw.connect(Vsn::V2).await?;
    let mut first_changes = 0;
    for round in 0..40 {
        let topic = format!("realtime:load-{round}");
        let join_ref = client
            .join(&topic, &json!({ "config": pg_changes("items") }))
            .await?;
        // Every frame of this topic, in order: the reply first, then `system`, then changes.
        let mut events = Vec::new();
        while events.len() < 4 {
            match client.recv().await? {
                Received::Text(t) if t.topic == topic => {
                    events.push((t.event.clone(), t.msg_ref.clone()));
                }
                Received::Text(_) => {}
                other => anyhow::bail!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(
            events[0],
            ("phx_reply".to_owned(), json!(join_ref)),
            "round {round}: {events:?}"
        );
        assert!(
            events[1..].iter().any(|(e, _)| e == "postgres_changes"),
            "{events:?}"
        );
        first_changes += 1;
        client
            .push(Some(&join_ref), &topic, "phx_leave", &json!({}))
            .await?;
    }
    stop.cancel();
    let written = writer.await??;
    assert!(written > 0);
    assert_eq!(first_changes, 40);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn a_refresh_during_a_database_outage_keeps_delivering() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, ITEMS).await?;
    let admin = db.client().await?;
    let mut client: Client = gw.connect(Vsn::V2).await?;
    let topic = "realtime:outage";
    let (join_ref, _) = client.join_ok(topic, pg_changes("items")).await?;
    expect_system(&mut client, topic, "ok").await?;
    admin
        .execute("insert into public.items (v) values (0)", &[])
        .await?;
    expect_rows(&mut client, topic, &[0]).await?;

    // The outage: no new connections to this database, and the gateway's are cut (the
    // test's own connection stays).
    let own_pid: i32 = admin
        .query_one("select pg_backend_pid()", &[])
        .await?
        .get(0);
    let cluster_admin = realtime_tests::postgres::connect(&cluster().await.url("postgres")).await?;
    cluster_admin
        .batch_execute(&format!(
            "alter database {name} allow_connections false;
             select pg_terminate_backend(pid) from pg_stat_activity
              where datname = '{name}' and pid <> {own_pid};",
            name = db.name
        ))
        .await?;
    // A refresh that cannot reach the database: the channel says so and keeps its subscription.
    let fresh = gw
        .tokens()
        .custom(&json!({"role": "anon", "exp": now_secs() + 3_600, "n": 1}));
    client
        .push(
            Some(&join_ref),
            topic,
            "access_token",
            &json!({ "access_token": fresh }),
        )
        .await?;
    expect_system(&mut client, topic, "error").await?;
    cluster_admin
        .batch_execute(&format!(
            "alter database {} allow_connections true",
            db.name
        ))
        .await?;
    // Rows committed right after the database is back arrive: the subscription was kept.
    admin
        .execute(
            "insert into public.items (v) select g from generate_series(1, 20) g",
            &[],
        )
        .await?;
    let wanted: Vec<i64> = (1..=20).collect();
    expect_rows(&mut client, topic, &wanted).await?;
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// The next `system` message of `topic` has this status.
async fn expect_system(client: &mut Client, topic: &str, status: &str) -> anyhow::Result<()> {
    loop {
        match client.recv_within(Duration::from_secs(15)).await? {
            Received::Text(t) if t.topic == topic && t.event == "system" => {
                anyhow::ensure!(t.payload["status"] == status, "system message: {}", t.raw);
                return Ok(());
            }
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
}

/// Exactly these `v` values arrive as inserts on `topic`, in order, each once.
async fn expect_rows(client: &mut Client, topic: &str, wanted: &[i64]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    while seen.len() < wanted.len() {
        match client.recv_within(Duration::from_secs(30)).await? {
            Received::Text(t) if t.topic == topic && t.event == "postgres_changes" => {
                seen.push(t.payload["data"]["record"]["v"].as_i64().unwrap_or(-1));
            }
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(seen, wanted);
    Ok(())
}
