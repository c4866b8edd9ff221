//! The readiness probe (`GET /ready`) tells whether changes can progress: it fails when the
//! database has been unreachable past the grace time or the stream stopped for good, recovers
//! when the database is back, and never fails for lag; `/healthcheck` stays the liveness probe.

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
        Ok((r.status == status).then(|| r.json()).transpose()?)
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
             select pg_terminate_backend(pid) from pg_stat_replication;",
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
