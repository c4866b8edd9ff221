//! The gateway against a real database: migrations applied once, and the janitor that keeps
//! `realtime.messages` to its retention window.

use realtime_gateway::Secret;
use realtime_tests::gateway::TestGateway;
use realtime_tests::postgres::{cluster, wait_for};
use std::time::Duration;

#[tokio::test]
async fn migrations_are_recorded_and_the_janitor_drops_expired_messages() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let url = db.url.clone();
    let slot = format!("gw_{}", db.name);
    let gw = TestGateway::start_with(|c| {
        c.database_url = Some(Secret::new(url.clone()));
        c.slot_name = slot.clone();
    })
    .await?;
    let client = db.client().await?;
    // `run` applies the migrations before it serves: wait for them.
    let versions = wait_for(Duration::from_secs(10), "the migrations", || async {
        let rows = client
            .query(
                "select version from realtime.schema_migrations order by version",
                &[],
            )
            .await;
        let versions: Vec<String> = match rows {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(_) => Vec::new(),
        };
        Ok((versions.len() >= 2).then_some(versions))
    })
    .await?;
    assert_eq!(versions, ["0001_realtime_schema", "0002_visibility"]);
    gw.shutdown(Duration::from_secs(10)).await?;

    // An old message and a fresh one; a gateway starting up cleans the old one at once.
    client
        .batch_execute(
            "insert into realtime.messages (topic, extension, event, payload, inserted_at)
             values ('old', 'broadcast', 'e', '{}', now()::timestamp - interval '73 hours'),
                    ('new', 'broadcast', 'e', '{}', now()::timestamp)",
        )
        .await?;
    let url = db.url.clone();
    let slot = format!("gw2_{}", db.name);
    let gw = TestGateway::start_with(|c| {
        c.database_url = Some(Secret::new(url.clone()));
        c.slot_name = slot.clone();
    })
    .await?;
    let topics = wait_for(Duration::from_secs(10), "the janitor", || async {
        let topics: Vec<String> = client
            .query("select topic from realtime.messages order by topic", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok((topics.len() == 1).then_some(topics))
    })
    .await?;
    assert_eq!(topics, ["new"]);
    // Applying again is a no-op: still one row per version.
    let count: i64 = client
        .query_one("select count(*) from realtime.schema_migrations", &[])
        .await?
        .get(0);
    assert_eq!(count, 2);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// Nodes of a cluster start together on one database: every one of them comes up, and the
/// migrations run once (they serialise on the advisory lock, the schema's creation included).
#[tokio::test]
async fn gateways_starting_at_once_on_a_fresh_database_all_come_up() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gateways = futures_util::future::try_join_all((0..4).map(|i| {
        let url = db.url.clone();
        let slot = format!("gw{i}_{}", db.name);
        TestGateway::start_with(move |c| {
            c.database_url = Some(Secret::new(url));
            c.slot_name = slot;
        })
    }))
    .await?;
    let client = db.client().await?;
    wait_for(Duration::from_secs(10), "the migrations", || async {
        let rows = client
            .query("select version from realtime.schema_migrations", &[])
            .await;
        Ok(rows.is_ok_and(|r| r.len() >= 2).then_some(()))
    })
    .await?;
    // Every node is still serving: its join reply comes back.
    for gw in gateways {
        let serving = async {
            let mut socket = gw.connect(realtime_protocol::Vsn::V2).await?;
            socket
                .join_ok("realtime:started-together", serde_json::json!({}))
                .await
        }
        .await;
        // A node that stopped says why here.
        let stopped = gw.shutdown(Duration::from_secs(10)).await;
        if let Err(e) = serving {
            anyhow::bail!("a node does not serve ({e:#}); it stopped with {stopped:?}");
        }
        stopped?;
    }
    let versions: i64 = client
        .query_one("select count(*) from realtime.schema_migrations", &[])
        .await?
        .get(0);
    assert_eq!(versions, 2, "each migration recorded once");
    Ok(())
}
