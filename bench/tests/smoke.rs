//! A CI-sized run of every scenario against the limit server (a child process) and the gateway
//! (in-process on 127.0.0.1:0): tiny sizes, well under a second each, no timing assertions.

use realtime_bench::pg;
use realtime_bench::scenario::{broadcast, database, idle, presence};
use realtime_bench::servers::{DEV_SECRET, Target};
use realtime_protocol::Vsn;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn gateway(stop: &CancellationToken) -> Target {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = realtime_gateway::Config::for_tests(DEV_SECRET);
    let stop = stop.clone();
    tokio::spawn(async move {
        realtime_gateway::run(config, listener, stop.cancelled_owned())
            .await
            .unwrap();
    });
    Target::attach("gateway", &addr, Some(std::process::id()), DEV_SECRET)
}

fn limit_server() -> Target {
    Target::spawn(
        "limit-server",
        Path::new(env!("CARGO_BIN_EXE_limit-server")),
        &[],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_both_servers() {
    let stop = CancellationToken::new();
    let targets = [gateway(&stop).await, limit_server()];
    for target in &targets {
        let name = &target.name;
        let plans = [
            broadcast::Plan::fanout(5, 20.0, 100, 0.2),
            broadcast::Plan::fanout(3, 10.0, 10_240, 0.2),
            // Client 0's phase is 0: it publishes at the start on both of its channels.
            broadcast::Plan::echo_and_groups(12, 100, 0.2),
            broadcast::Plan::large_fanout(20, 10, 10.0, 100, 0.2),
        ];
        for mut plan in plans {
            plan.drain = Duration::from_millis(150);
            let o = broadcast::run(target, &plan).await.unwrap();
            assert!(o.sent > 0, "{name}: nothing sent: {o:?}");
            assert!(o.delivered > 0, "{name}: nothing delivered: {o:?}");
            assert_eq!(o.errors, 0, "{name}: {o:?}");
        }
        let o = idle::run(target, 20, 3, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(o.lost, 0, "{name}: {o:?}");
        let o = presence::run(target, 10, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(o.converged_members, 10, "{name}: {o:?}");
        assert_eq!(o.track_errors, 0, "{name}: {o:?}");
    }
    // The V1 serializer (realtime-js 2.11), against both.
    for mut target in targets {
        target.endpoint.vsn = Vsn::V1;
        let mut plan = broadcast::Plan::fanout(5, 20.0, 100, 0.3);
        plan.drain = Duration::from_millis(150);
        let o = broadcast::run(&target, &plan).await.unwrap();
        assert!(
            o.delivered > 0,
            "{}: nothing delivered over V1: {o:?}",
            target.name
        );
        let o = presence::run(&target, 5, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(o.converged_members, 5, "{}: {o:?}", target.name);
    }
    stop.cancel();
}

/// Scenarios 4–6 at tiny sizes against an in-process gateway on a throwaway cluster (the test
/// harness's). Skipped, saying so, only when `initdb` is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_scenarios_run_against_the_gateway() {
    if !pg::available() {
        eprintln!("SKIPPED: initdb not found (apt-get install postgresql); scenarios 4-6 not run");
        return;
    }
    let (cluster, db) = pg::fresh_database().await.unwrap();
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = realtime_gateway::Config::for_tests(DEV_SECRET);
    config.database_url = Some(realtime_gateway::Secret::new(db.url.clone()));
    config.slot_name = "bench_smoke".into();
    let stopped = stop.clone();
    tokio::spawn(async move {
        realtime_gateway::run(config, listener, stopped.cancelled_owned())
            .await
            .unwrap();
    });
    pg::wait_for_schema(&db).await.unwrap();
    let gw = Target::attach("gateway", &addr, Some(std::process::id()), DEV_SECRET);

    // 4: private channels with a membership policy, and the same plan public.
    database::private_schema(&db, 100).await.unwrap();
    let mut plan = broadcast::Plan::large_fanout(12, 6, 10.0, 100, 0.3);
    plan.drain = Duration::from_millis(300);
    let private = database::private_members(&db, DEV_SECRET, plan)
        .await
        .unwrap();
    let o = broadcast::run(&gw, &private).await.unwrap();
    assert!(o.delivered > 0, "private: nothing delivered: {o:?}");
    assert!(database::joins_per_s(&private, &o) > 0.0);
    assert_eq!(o.errors, 0, "{o:?}");

    // 5: a trigger calling realtime.send on each insert.
    let (_, steps) = database::db_broadcast(&gw, &db, 3, &[20.0], 0.3)
        .await
        .unwrap();
    assert!(steps[0].inserted > 0 && steps[0].delivered > 0, "{steps:?}");

    // 6: one small cell with RLS and a filter, next to pg_recvlogical.
    db.client()
        .await
        .unwrap()
        .batch_execute(database::PG_CHANGES_SQL)
        .await
        .unwrap();
    for shared_topic in [false, true] {
        let cell = database::Cell {
            subscribers: 3,
            rls: true,
            member_policy: shared_topic,
            filter: true,
            shared_topic,
        };
        let o = database::pg_changes_cell(&gw, cluster, &db, DEV_SECRET, cell, &[20.0], 0.3, true)
            .await
            .unwrap();
        assert!(o.steps[0].delivered > 0, "{o:?}");
        assert!(
            o.recvlogical.as_ref().is_some_and(|r| r.changes > 0),
            "{o:?}"
        );
    }
    stop.cancel();
}

/// Runs the bench binary with `args`; it must succeed and print one JSON document.
fn bench(args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_realtime-bench"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = serde_json::from_slice(&out.stdout).unwrap();
    (out, doc)
}

#[test]
fn the_command_line_prints_json() {
    let bin = Path::new(env!("CARGO_BIN_EXE_realtime-bench"));
    let (out, doc) = bench(&[
        "--servers",
        "limit",
        "fanout",
        "--subscribers",
        "3",
        "--rates",
        "10",
        "--seconds",
        "0.3",
    ]);
    assert_eq!(doc["scenario"], "fanout");
    assert!(doc["steps"][0]["results"][0]["delivered"].as_u64() > Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("summary: fanout"));

    // The report command turns that JSON into a Markdown table.
    let dir = std::env::temp_dir().join(format!("realtime-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("fanout.json");
    std::fs::write(&json, &out.stdout).unwrap();
    let report = std::process::Command::new(bin)
        .args(["report", "--out"])
        .arg(&dir)
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let md = String::from_utf8_lossy(&report.stdout);
    assert!(md.contains("| fanout (V2) |"), "{md}");
    let png = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "png"))
        .expect("a PNG chart");
    assert!(std::fs::read(png.path()).unwrap().starts_with(b"\x89PNG"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The cluster scenario's latency part at a tiny size: a nats-server and two gateway nodes
/// (the `realtime-gateway` binary next to this one), every path delivering.
#[test]
fn the_cluster_scenario_runs_on_nats() {
    assert!(
        ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .iter()
            .any(|p| Path::new(p).exists()),
        "nats-server is missing (scripts/install-deps.sh installs it)"
    );
    let (out, doc) = bench(&[
        "cluster",
        "--subscribers",
        "3",
        "--rate",
        "20",
        "--seconds",
        "0.5",
        "--rounds",
        "1",
        "--no-scaling",
    ]);
    assert_eq!(doc["scenario"], "cluster");
    let rows = doc["steps"][0]["results"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["delivered"], row["expected"], "{row}");
        assert!(row["delivered"].as_u64() > Some(0), "{row}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("summary: cluster latency"));
}
