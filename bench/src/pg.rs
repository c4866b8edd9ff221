//! Postgres for scenarios 4–6: the test harness's throwaway cluster (`tests/src/postgres.rs`,
//! included by path as the wal-listener bench does, so this crate does not depend on the tests
//! crate), the app SQL every database gets (roles, `auth.uid()`), and a gateway started against it.

#[path = "../../tests/src/postgres.rs"]
#[allow(dead_code, unreachable_pub, clippy::all)]
pub mod harness;

pub use harness::{PgCluster, TestDb, connect};

use crate::servers::{self, DEV_SECRET, Target};
use anyhow::{Context, bail};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// Roles `anon` / `authenticated` / `service_role`, `auth.uid()` and friends, the
/// `supabase_realtime` publication: what a plain Postgres lacks (supabase/migrations/0001).
pub const ROLES_AND_AUTH: &str = include_str!("../../supabase/migrations/0001_roles_and_auth.sql");

/// Whether `initdb` can be found (the cluster can be started).
pub fn available() -> bool {
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.iter().any(|d| d.join("initdb").is_file())
}

/// A fresh database on the process's throwaway cluster (started on first use), with the app SQL.
pub async fn fresh_database() -> anyhow::Result<(&'static PgCluster, TestDb)> {
    let cluster = harness::cluster().await;
    let db = cluster.fresh_database().await?;
    db.client()
        .await?
        .batch_execute(ROLES_AND_AUTH)
        .await
        .context("apply supabase/migrations/0001_roles_and_auth.sql")?;
    Ok((cluster, db))
}

/// Starts the `realtime-gateway` binary against `db` with its own slot, and waits until its
/// `realtime` schema is there.
pub async fn spawn_gateway(
    binary: &Path,
    db: &TestDb,
    slot: &str,
    env: &[(&str, String)],
) -> anyhow::Result<Target> {
    let mut all = vec![
        ("DATABASE_URL", db.url.clone()),
        ("SLOT_NAME", slot.to_owned()),
    ];
    all.extend(env.iter().cloned());
    let target = Target::spawn("gateway", binary, &all)?;
    wait_for_schema(db).await?;
    Ok(target)
}

/// Waits until the gateway's migrations created `realtime.messages` (up to 30 s).
pub async fn wait_for_schema(db: &TestDb) -> anyhow::Result<()> {
    let c = db.client().await?;
    harness::wait_for(Duration::from_secs(30), "the realtime schema", || async {
        let row = c
            .query_one(
                "select to_regclass('realtime.messages') is not null and \
                 to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null",
                &[],
            )
            .await?;
        Ok(row.get::<_, bool>(0).then_some(()))
    })
    .await
}

/// A user token (`role: authenticated`, distinct `sub`) for the bench's gateway secret.
pub fn user_token(secret: &str, sub: &uuid::Uuid) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400;
    realtime_gateway::auth::sign_hs256(
        secret,
        &json!({"role": "authenticated", "aud": "authenticated", "sub": sub.to_string(), "exp": exp}),
    )
}

/// The default secret's user token.
pub fn dev_user_token(sub: &uuid::Uuid) -> String {
    user_token(DEV_SECRET, sub)
}

/// Drops a replication slot, waiting for its walsender to go away.
pub async fn drop_slot(c: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    for _ in 0..250 {
        if c.execute("select pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("could not drop slot {slot}")
}

/// Runs `pg_recvlogical` on `slot` (pgoutput, publication `publication`) until `end_lsn`, writing
/// to /dev/null; returns the wall seconds it took. This is the ceiling of the change stream: the
/// server decodes the same WAL for it as for the gateway's slot, and the client does nothing.
pub fn recvlogical(
    cluster: &PgCluster,
    db: &TestDb,
    slot: &str,
    publication: &str,
    end_lsn: &str,
) -> anyhow::Result<f64> {
    let bin = cluster.bin_dir().join("pg_recvlogical");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(&bin)
        .args([
            "-d", &db.url, "--slot", slot, "--start", "--endpos", end_lsn,
        ])
        .args(["--no-loop", "-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .args(["-f", "/dev/null"])
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// The gateway binary next to this one (or in `dir`).
pub fn gateway_binary(dir: Option<&Path>) -> anyhow::Result<std::path::PathBuf> {
    servers::sibling_binary(dir, "realtime-gateway")
}
