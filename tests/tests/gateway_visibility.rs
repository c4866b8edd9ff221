//! Who sees a change of an RLS table, against a real database: policies decided in process only
//! where their semantics equal Postgres's.

use realtime_protocol::Vsn;
use realtime_tests::gateway::{Client, Received, TestGateway, now_secs};
use realtime_tests::postgres::cluster;
use serde_json::json;
use std::time::Duration;

/// A policy comparing a claim with a column under a case-insensitive (non-deterministic)
/// collation: Postgres finds `A@X.ORG` equal to `a@x.org`, a byte-wise comparison would not. The
/// gateway leaves such a table to the SQL check, so the row arrives, and the in-process path
/// still decides the table next to it.
#[tokio::test]
async fn a_non_deterministic_collation_goes_to_the_sql_check() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(
        &db,
        "create collation public.nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         create table public.notes (id bigserial primary key, email text collate public.nocase not null, body text);
         create table public.plain (id bigserial primary key, email text not null);
         alter table public.notes enable row level security;
         alter table public.plain enable row level security;
         create policy mine on public.notes for select to authenticated using ((auth.jwt() ->> 'email') = email);
         create policy mine on public.plain for select to authenticated using ((auth.jwt() ->> 'email') = email);
         grant select on public.notes, public.plain to authenticated;
         alter publication supabase_realtime add table public.notes, public.plain;",
    )
    .await?;
    let token = gw.tokens().custom(&json!({
        "role": "authenticated", "sub": "2f0e6a3c-8d59-4c66-9a63-1f7b2b1f0c01",
        "email": "a@x.org", "exp": now_secs() + 600
    }));
    let mut client = gw.connect_with_key(Vsn::V2, &token).await?;
    let config = json!({"private": false, "postgres_changes": [
        {"event": "INSERT", "schema": "public", "table": "notes"},
        {"event": "INSERT", "schema": "public", "table": "plain"}]});
    client.join_ok("realtime:mail", config).await?;
    let admin = db.client().await?;
    admin
        .batch_execute(
            "insert into public.notes (email, body) values ('b@x.org', 'not mine'), ('A@X.ORG', 'mine, other case');
             insert into public.plain (email) values ('A@X.ORG'), ('a@x.org');",
        )
        .await?;
    let mut got = Vec::new();
    while got.len() < 2 {
        match client.recv_within(Duration::from_secs(15)).await? {
            Received::Text(t) if t.event == "postgres_changes" => {
                let record = &t.payload["data"]["record"];
                got.push((
                    t.payload["data"]["table"].as_str().unwrap_or("").to_owned(),
                    record["email"].clone(),
                ));
            }
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("notes".to_owned(), json!("A@X.ORG")),
            ("plain".to_owned(), json!("a@x.org"))
        ]
    );
    expect_no_more_changes(&mut client).await?;
    let sql_checks = gw.metric("realtime_visibility_queries_total").await?;
    let in_process = gw
        .metric("realtime_visibility_policy_decisions_total")
        .await?;
    assert!(
        sql_checks >= 1.0,
        "the collated table went to SQL: {sql_checks}"
    );
    assert!(
        in_process >= 2.0,
        "the plain table was decided in process: {in_process}"
    );
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// Nothing else arrives within a second.
async fn expect_no_more_changes(client: &mut Client) -> anyhow::Result<()> {
    match client.recv_within(Duration::from_secs(1)).await {
        Err(_) => Ok(()),
        Ok(Received::Text(t)) if t.event != "postgres_changes" => Ok(()),
        Ok(other) => anyhow::bail!("unexpected: {other:?}"),
    }
}

/// DELETEs of a table whose policy reads a membership table (the SQL check): judged in SQL on
/// the old row, rebuilt from the WAL (`REPLICA IDENTITY FULL`) or from the gateway's memory
/// (default identity). Each member gets the deletes of its own room only, with the old record.
#[tokio::test]
async fn deletes_under_a_membership_policy_reach_the_members_only() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(
        &db,
        "create table public.members (room int not null, user_id uuid not null, primary key (room, user_id));
         create table public.chats (id int primary key, room int not null, body text);
         create table public.chats_full (id int primary key, room int not null, body text);
         alter table public.chats_full replica identity full;
         alter table public.chats enable row level security;
         alter table public.chats_full enable row level security;
         create policy member_reads on public.chats for select to authenticated using
           (exists (select 1 from public.members m where m.room = chats.room and m.user_id = auth.uid()));
         create policy member_reads on public.chats_full for select to authenticated using
           (exists (select 1 from public.members m where m.room = chats_full.room and m.user_id = auth.uid()));
         grant select on public.members, public.chats, public.chats_full to authenticated;
         alter publication supabase_realtime add table public.chats, public.chats_full;",
    )
    .await?;
    let users = [
        "5b1d2a7e-0000-4000-8000-000000000001",
        "5b1d2a7e-0000-4000-8000-000000000002",
    ];
    let admin = db.client().await?;
    for (room, user) in users.iter().enumerate() {
        admin
            .execute(
                "insert into public.members values ($1, $2::text::uuid)",
                &[&(room as i32 + 1), user],
            )
            .await?;
    }
    let mut clients = Vec::new();
    for user in users {
        let token = gw
            .tokens()
            .custom(&json!({"role": "authenticated", "sub": user, "exp": now_secs() + 600}));
        let mut client = gw.connect_with_key(Vsn::V2, &token).await?;
        let config = json!({"postgres_changes": [
            {"event": "DELETE", "schema": "public", "table": "chats"},
            {"event": "DELETE", "schema": "public", "table": "chats_full"}]});
        client.join_ok(&format!("realtime:{user}"), config).await?;
        clients.push(client);
    }
    // Rows 1 (room 1) and 2 (room 2) in both tables, inserted while subscribed, then deleted.
    admin
        .batch_execute(
            "insert into public.chats values (1, 1, 'one'), (2, 2, 'two');
             insert into public.chats_full values (1, 1, 'one'), (2, 2, 'two');
             delete from public.chats;
             delete from public.chats_full;",
        )
        .await?;
    for (n, client) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 2 {
            match client.recv_within(Duration::from_secs(15)).await? {
                Received::Text(t) if t.event == "postgres_changes" => {
                    let data = &t.payload["data"];
                    got.push((
                        data["table"].as_str().unwrap_or("").to_owned(),
                        data["old_record"].clone(),
                    ));
                }
                Received::Text(_) => {}
                other => anyhow::bail!("unexpected frame {other:?}"),
            }
        }
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let room = n as i64 + 1;
        let body = if room == 1 { "one" } else { "two" };
        let old = json!({"id": room, "room": room, "body": body});
        assert_eq!(
            got,
            vec![
                ("chats".to_owned(), old.clone()),
                ("chats_full".to_owned(), old)
            ],
            "user {n}"
        );
        expect_no_more_changes(client).await?;
    }
    assert_eq!(gw.metric("realtime_deletes_unknown_total").await?, 0.0);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
