//! Resume from positions with a raw client and the in-process gateway: a channel whose socket
//! went away gets what it missed when its client joins again (once, in order, then live), and a
//! parked channel that held more WAL than `RESUME_MAX_RETAINED_BYTES` is told of the gap instead.
//! (The drills with supabase-js and realtime-py, kill -9 included, are in tests/js/resume*.)

use realtime_protocol::Vsn;
use realtime_tests::gateway::{Client, ITEMS, Received, TestGateway};
use realtime_tests::postgres::cluster;
use serde_json::{Value, json};
use std::time::Duration;

fn binding() -> Value {
    json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items"}]})
}

/// The `v` of every INSERT `client` gets until one with `last`, and the `system` messages.
async fn collect_until(client: &mut Client, last: i64) -> anyhow::Result<(Vec<i64>, Vec<Value>)> {
    let (mut values, mut system) = (Vec::new(), Vec::new());
    loop {
        match client.recv_within(Duration::from_secs(10)).await? {
            Received::Text(t) if t.event == "postgres_changes" => {
                let v = t.payload["data"]["record"]["v"].as_i64().unwrap_or(-1);
                values.push(v);
                if v == last {
                    return Ok((values, system));
                }
            }
            Received::Text(t) if t.event == "system" => system.push(t.payload.clone()),
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_rejoin_gets_the_rows_it_missed_once_in_order_then_live_ones() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, ITEMS).await?;
    let own = db.client().await?;
    // One token for both connections, as a client keeps its token across a reconnect (a token
    // minted per connection would differ once the second ticks over, and not match).
    let token = gw.tokens().anon();
    let mut first = gw.connect_with_key(Vsn::V2, &token).await?;
    first.join_ok("realtime:resume", binding()).await?;
    own.execute("insert into public.items (v) values (1)", &[])
        .await?;
    assert_eq!(collect_until(&mut first, 1).await?.0, vec![1]);
    first.close().await?;
    gw.wait_for_metric("realtime_resume_parked", Duration::from_secs(5), |v| {
        v == 1.0
    })
    .await?;
    for v in 2..=21 {
        own.execute("insert into public.items (v) values ($1)", &[&v])
            .await?;
    }
    let mut again = gw.connect_with_key(Vsn::V2, &token).await?;
    again.join_ok("realtime:resume", binding()).await?;
    let (missed, system) = collect_until(&mut again, 21).await?;
    assert_eq!(
        missed,
        (2..=21).collect::<Vec<_>>(),
        "the gap, once, in order"
    );
    assert!(
        system
            .iter()
            .all(|m| !m["message"].as_str().unwrap_or("").starts_with("ResumeGap")),
        "no gap: {system:?}"
    );
    own.execute("insert into public.items (v) values (22)", &[])
        .await?;
    assert_eq!(
        collect_until(&mut again, 22).await?.0,
        vec![22],
        "then live"
    );
    assert_eq!(gw.metric("realtime_resumes_total").await?, 1.0);
    assert_eq!(gw.metric("realtime_replayed_changes_total").await?, 20.0);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn a_parked_channel_past_the_retention_cap_is_told_of_the_gap() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let setup = format!("{ITEMS} alter table public.items add column pad text;");
    let gw = TestGateway::on_database_with(&db, &setup, |c| {
        c.resume_max_retained_bytes = 200_000;
    })
    .await?;
    let own = db.client().await?;
    // One token for both connections, as a client keeps its token across a reconnect (a token
    // minted per connection would differ once the second ticks over, and not match).
    let token = gw.tokens().anon();
    let mut first = gw.connect_with_key(Vsn::V2, &token).await?;
    first.join_ok("realtime:capped", binding()).await?;
    first.close().await?;
    gw.wait_for_metric("realtime_resume_parked", Duration::from_secs(5), |v| {
        v == 1.0
    })
    .await?;
    // About 1 MB of WAL: five times the cap.
    own.execute(
        "insert into public.items (v, pad) select g, repeat('x', 1000) from generate_series(1, 1000) g",
        &[],
    )
    .await?;
    gw.wait_for_metric("realtime_resume_parked", Duration::from_secs(10), |v| {
        v == 0.0
    })
    .await?;
    let mut again = gw.connect_with_key(Vsn::V2, &token).await?;
    again.join_ok("realtime:capped", binding()).await?;
    own.execute("insert into public.items (v) values (5000)", &[])
        .await?;
    let (values, system) = collect_until(&mut again, 5000).await?;
    assert_eq!(values, vec![5000], "nothing of the gap, then live rows");
    let gaps: Vec<&str> = system
        .iter()
        .filter_map(|m| m["message"].as_str())
        .filter(|m| m.starts_with("ResumeGap"))
        .collect();
    assert_eq!(gaps.len(), 1, "told once: {system:?}");
    assert!(
        gaps[0].starts_with("ResumeGap: retention_cap: "),
        "{}",
        gaps[0]
    );
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
