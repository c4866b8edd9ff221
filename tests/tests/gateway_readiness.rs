//! The readiness probe (`GET /ready`) tells whether changes can progress: it fails when the
//! database has been unreachable past the grace time or the stream stopped for good, recovers
//! when the database is back, and never fails for lag; `/healthcheck` stays the liveness probe.

use realtime_tests::gateway::ITEMS;
use realtime_tests::gateway::{HttpResponse, TestGateway};
use realtime_tests::postgres::{cluster, connect, wait_for};
use std::time::Duration;

async fn ready(gw: &TestGateway) -> anyhow::Result<HttpResponse> {
    gw.request("GET", "/ready", &[], b"").await
}

/// Waits until `/ready` answers `status`; returns the body.
async fn until_ready_is(
    gw: &TestGateway,
    status: u16,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    wait_for(limit, &format!("/ready answering {status}"), || async {
        let r = ready(gw).await?;
        (r.status == status).then(|| r.json()).transpose()
    })
    .await
}

#[tokio::test]
async fn without_a_database_the_gateway_is_ready() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let r = ready(&gw).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["postgres"], "off");
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn readiness_fails_while_the_database_is_unreachable_and_recovers() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, "").await?;
    assert_eq!(
        until_ready_is(&gw, 200, Duration::from_secs(5)).await?["postgres"],
        "streaming"
    );
    let admin = connect(&cluster().await.url("postgres")).await?;
    admin
        .batch_execute(&format!(
            "alter database {name} allow_connections false;
             select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}';",
            name = db.name
        ))
        .await?;
    // Not at once: a reconnect is no reason. Past the grace time (10 s), the probe fails.
    let r = ready(&gw).await?;
    assert_eq!(
        r.status,
        200,
        "a blip does not fail readiness: {}",
        r.text()
    );
    let body = until_ready_is(&gw, 503, Duration::from_secs(20)).await?;
    assert!(
        body["reason"].as_str().unwrap_or("").contains("not live"),
        "{body}"
    );
    let health = gw.request("GET", "/healthcheck", &[], b"").await?;
    assert_eq!(
        (health.status, health.text()),
        (200, "ok".to_owned()),
        "liveness is unaffected"
    );
    admin
        .batch_execute(&format!(
            "alter database {} allow_connections true",
            db.name
        ))
        .await?;
    until_ready_is(&gw, 200, Duration::from_secs(20)).await?;
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn a_stream_that_stops_for_good_fails_readiness() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, "").await?;
    until_ready_is(&gw, 200, Duration::from_secs(5)).await?;
    // The publication is gone: the stream cannot go on, and says so.
    let client = db.client().await?;
    client
        .batch_execute(
            "drop publication supabase_realtime;
             select pg_terminate_backend(active_pid) from pg_replication_slots
              where database = current_database() and active_pid is not null;",
        )
        .await?;
    let body = until_ready_is(&gw, 503, Duration::from_secs(20)).await?;
    assert!(
        body["reason"].as_str().unwrap_or("").contains("halted"),
        "{body}"
    );
    assert_eq!(gw.metric("realtime_wal_halted").await?, 1.0);
    let health = gw.request("GET", "/healthcheck", &[], b"").await?;
    assert_eq!(health.status, 200);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}

/// A slot dropped behind the gateway's back is recreated, and every channel subscribed to
/// Postgres Changes gets one `system` message saying that changes were lost (status `error`,
/// the reason first), then changes again. A channel parked meanwhile (its socket gone) cannot
/// resume from a position the new slot does not have: its client's rejoin is told
/// `ResumeGap: position_lost`.
#[tokio::test]
async fn a_lost_slot_is_recreated_and_subscribers_are_told() -> anyhow::Result<()> {
    use realtime_protocol::Vsn;
    use realtime_tests::gateway::Received;
    let db = cluster().await.fresh_database().await?;
    let gw = TestGateway::on_database(&db, ITEMS).await?;
    let mut client = gw.connect(Vsn::V2).await?;
    let config = serde_json::json!({"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items"}]});
    client.join_ok("realtime:lost", config.clone()).await?;
    // The parked client reconnects with its one token, as a client does (a token minted per
    // connection would differ once the second ticks over, and not be the same client).
    let token = gw.tokens().anon();
    let mut away = gw.connect_with_key(Vsn::V2, &token).await?;
    away.join_ok("realtime:parked", config.clone()).await?;
    away.close().await?;
    let own = db.client().await?;
    let own_pid: i32 = own.query_one("select pg_backend_pid()", &[]).await?.get(0);
    let admin = connect(&cluster().await.url("postgres")).await?;
    // Keep the gateway out while the slot is dropped, then let it back in.
    admin
        .batch_execute(&format!(
            "alter database {name} allow_connections false;
             select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}' and pid <> {own_pid};",
            name = db.name
        ))
        .await?;
    let slot = format!("gw_{}", db.name);
    wait_for(
        Duration::from_secs(10),
        "the slot to be dropped",
        || async {
            Ok(own
                .execute("select pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok()
                .then_some(()))
        },
    )
    .await?;
    admin
        .batch_execute(&format!(
            "alter database {} allow_connections true",
            db.name
        ))
        .await?;
    let told = loop {
        match client.recv_within(Duration::from_secs(20)).await? {
            Received::Text(t) if t.event == "system" && t.payload["status"] != "ok" => break t,
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    };
    assert_eq!(told.payload["status"], "error", "{}", told.raw);
    assert_eq!(told.payload["extension"], "postgres_changes");
    assert!(
        told.payload["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("ChangesLost: slot_dropped"),
        "{}",
        told.raw
    );
    assert_eq!(gw.metric("realtime_wal_gaps_total").await?, 1.0);
    gw.wait_for_metric("realtime_wal_streaming", Duration::from_secs(10), |v| {
        v == 1.0
    })
    .await?;
    own.execute("insert into public.items (v) values (7)", &[])
        .await?;
    loop {
        match client.recv_within(Duration::from_secs(10)).await {
            Ok(Received::Text(t)) if t.event == "postgres_changes" => {
                assert_eq!(t.payload["data"]["record"]["v"], 7);
                break;
            }
            Ok(Received::Text(_)) => {}
            Ok(other) => anyhow::bail!("unexpected frame {other:?}"),
            // Say where the change stopped: the stream, the router or the socket.
            Err(e) => {
                let metrics = gw.metrics().await?;
                let wal: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with("realtime_wal") || l.starts_with("realtime_postgres"))
                    .collect();
                anyhow::bail!("the change after the new slot: {e}; {}", wal.join("; "))
            }
        }
    }
    let mut back = gw.connect_with_key(Vsn::V2, &token).await?;
    back.join_ok("realtime:parked", config).await?;
    let gap = loop {
        match back.recv_within(Duration::from_secs(10)).await? {
            Received::Text(t)
                if t.event == "system"
                    && t.payload["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("ResumeGap")) =>
            {
                break t;
            }
            Received::Text(_) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    };
    assert!(
        gap.payload["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("ResumeGap: position_lost: "),
        "{}",
        gap.raw
    );
    assert_eq!(gap.payload["status"], "ok", "{}", gap.raw);
    assert_eq!(gw.metric("realtime_resume_gaps_total").await?, 1.0);
    gw.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
