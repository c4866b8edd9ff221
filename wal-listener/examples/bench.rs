//! Benchmark (not a test): changes per second through the WAL listener next to `pg_recvlogical`, on
//! the same throwaway cluster, the same WAL, and the same slot type (pgoutput, proto_version 1).
//!
//! For each workload — one 200k-row transaction, and 20k single-row transactions — two slots are
//! created first, the workload is written, then each consumer drains the same WAL from its own slot:
//! the listener (counting changes and acknowledging every transaction) and `pg_recvlogical --endpos`.
//! The server's decoding work is identical for both, so the ratio compares the clients.
//!
//! Run: `cargo run --release -p realtime-wal-listener --example bench` (ROUNDS=n to change the round
//! count, RUNTIME=multi for the multi-thread runtime). It starts its own throwaway cluster with the
//! test harness of `tests/src/postgres.rs`, included by path so that this example does not depend on
//! the tests crate (and the gateway).
//!
//! The CPU columns (user + system time per change, from /proc) are the fairer comparison on a busy
//! machine, where wall-clock rates move with whatever else runs.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
#[path = "../../tests/src/postgres.rs"]
#[allow(dead_code, unreachable_pub)]
mod postgres;

use postgres::{PgCluster, TestDb};
use realtime_wal_listener::{ConnectConfig, Listener, ListenerConfig};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    // RUNTIME=multi runs on the multi-thread runtime the gateway uses; the default, one thread,
    // keeps the consumer and the listener off each other's cores on a busy 2-core machine.
    let runtime = match std::env::var("RUNTIME").as_deref() {
        Ok("multi") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let cluster = postgres::cluster().await;
    let db = cluster.fresh_database().await?;
    let c = db.client().await?;
    c.batch_execute(
        "CREATE TABLE bench (id int8 PRIMARY KEY, title text, n int, at timestamptz DEFAULT now());
         CREATE PUBLICATION supabase_realtime FOR ALL TABLES;",
    )
    .await?;
    println!(
        "workload                       | listener changes/s | pg_recvlogical changes/s | ratio \
         | listener cpu µs/change | pg_recvlogical cpu µs/change"
    );
    println!(
        "-------------------------------|--------------------|--------------------------|------ \
         |------------------------|-----------------------------"
    );
    let mut next_id = 0i64;
    for (label, big) in [
        ("one 200k-row transaction", true),
        ("20k single-row transactions", false),
    ] {
        let mut ours_all = Vec::new();
        let mut theirs_all = Vec::new();
        let (mut ours_cpu, mut theirs_cpu, mut total) = (0.0, 0.0, 0u64);
        for round in 0..rounds {
            let ours_slot = format!("bench_ours_{}_{round}", u8::from(big));
            let theirs_slot = format!("bench_recv_{}_{round}", u8::from(big));
            for slot in [&ours_slot, &theirs_slot] {
                c.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await?;
            }
            let changes = write_workload(&db, big, &mut next_id).await?;
            let end: String = c
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get(0);
            // Alternate the order so caching favours neither.
            let (ours, theirs) = if round % 2 == 0 {
                let o = run_listener(&db, &ours_slot, changes).await?;
                (o, run_recvlogical(cluster, &db, &theirs_slot, &end)?)
            } else {
                let t = run_recvlogical(cluster, &db, &theirs_slot, &end)?;
                (run_listener(&db, &ours_slot, changes).await?, t)
            };
            ours_all.push(changes as f64 / ours.0.as_secs_f64());
            theirs_all.push(changes as f64 / theirs.0.as_secs_f64());
            ours_cpu += ours.1;
            theirs_cpu += theirs.1;
            total += changes;
            for slot in [&ours_slot, &theirs_slot] {
                drop_slot(&c, slot).await?;
            }
        }
        let (o, t) = (median(&mut ours_all), median(&mut theirs_all));
        let per = |cpu: f64| cpu * 1e6 / total as f64;
        println!(
            "{label:<31}| {o:>18.0} | {t:>24.0} | {:>5.2} | {:>22.2} | {:>27.2}",
            o / t,
            per(ours_cpu),
            per(theirs_cpu)
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn write_workload(db: &TestDb, big: bool, next_id: &mut i64) -> anyhow::Result<u64> {
    let first = *next_id;
    if big {
        let c = db.client().await?;
        c.execute(
            "INSERT INTO bench (id, title, n) SELECT i, 'title ' || i, i % 1000 \
             FROM generate_series($1::int8, $1::int8 + 199999) i",
            &[&first],
        )
        .await?;
        *next_id += 200_000;
        return Ok(200_000);
    }
    // 20k single-row transactions from 8 connections.
    let mut tasks = Vec::new();
    for w in 0..8i64 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let c = postgres::connect(&url).await?;
            let stmt = c
                .prepare("INSERT INTO bench (id, title, n) VALUES ($1, $2, $3)")
                .await?;
            for k in 0..2500i64 {
                let id = first + w * 2500 + k;
                c.execute(&stmt, &[&id, &format!("title {id}"), &((id % 1000) as i32)])
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    *next_id += 20_000;
    Ok(20_000)
}

/// Wall time and CPU seconds (user + system) of the listener draining `changes` changes.
async fn run_listener(db: &TestDb, slot: &str, changes: u64) -> anyhow::Result<(Duration, f64)> {
    let mut cfg = ListenerConfig::new(ConnectConfig::from_url(&db.url)?, slot);
    cfg.queue_capacity = 4096;
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let (listener, mut rx) = Listener::new(cfg);
    let ack = listener.ack_handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listener.run(shutdown.clone()));
    let mut seen = 0u64;
    let mut batch = Vec::with_capacity(256);
    while seen < changes {
        // recv_many: one wake-up for everything queued, as a throughput-minded consumer should.
        let n = tokio::time::timeout(Duration::from_secs(120), rx.recv_many(&mut batch, 256))
            .await
            .context("listener stalled")?;
        if n == 0 {
            bail!("listener ended");
        }
        for tx in batch.drain(..) {
            seen += tx.changes.len() as u64;
            ack.ack(tx.commit_lsn);
        }
    }
    let elapsed = started.elapsed();
    let cpu = own_cpu_seconds() - cpu_before;
    shutdown.cancel();
    task.await??;
    Ok((elapsed, cpu))
}

/// utime + stime of this process from /proc (clock ticks of 10 ms).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    cpu_fields(&stat, 14)
}

/// Sums two consecutive tick fields of a /proc/PID/stat line, starting at field `first` (1-based, as in
/// proc(5): 14 utime, 15 stime, 16 cutime, 17 cstime).
fn cpu_fields(stat: &str, first: usize) -> f64 {
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N (1-based) is at index N - 3.
    let get = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get(first) + get(first + 1)) / 100.0
}

/// Wall time and CPU seconds of `pg_recvlogical` draining the slot up to `end`. The CPU time is read
/// from the wrapping shell's children times once pg_recvlogical has exited.
fn run_recvlogical(
    cluster: &PgCluster,
    db: &TestDb,
    slot: &str,
    end: &str,
) -> anyhow::Result<(Duration, f64)> {
    let bin = cluster.bin_dir().join("pg_recvlogical");
    let script = format!(
        "'{}' -d '{}' --slot '{slot}' --start --endpos '{end}' --no-loop \
         -o proto_version=1 -o publication_names=supabase_realtime -f /dev/null || exit 1; \
         cat /proc/$$/stat",
        bin.display(),
        db.url
    );
    let started = Instant::now();
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .context("run pg_recvlogical")?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // cutime and cstime are fields 16 and 17.
    let cpu = cpu_fields(&String::from_utf8_lossy(&out.stdout), 16);
    Ok((elapsed, cpu))
}

async fn drop_slot(c: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    // A slot stays active until its walsender exits.
    for _ in 0..500 {
        let r = c
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        if r.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("could not drop slot {slot}")
}
