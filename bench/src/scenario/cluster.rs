//! Several gateway nodes on one nats-server (issue 14), measured side by side in one run:
//!
//! - **latency**: one publisher, `subscribers` receivers on one topic: all on a gateway that is
//!   not in a cluster (the baseline), all on one node of a cluster (the bus's cost on the local
//!   path), the publisher on node 1 and the receivers on node 2 (cross-node). Latency
//!   percentiles, and CPU per delivery on each node and on nats-server.
//! - **scaling**: 1, 2 and 3 nodes, each capped to `cpus` of a core (cgroup v1 quota) so that
//!   adding a node adds CPU on this 2-core machine; groups of `group_size` members, one
//!   publisher each, all members of a group on one node (`local`: no bus fan-out) or spread over
//!   the nodes (`spread`: every publish crosses). Offered load is the same for every node count;
//!   deliveries/s show what the capped nodes sustain.

use crate::scenario::broadcast::{self, ClientPlan, Plan};
use crate::servers::Target;
use crate::sys::CpuCap;
use anyhow::Context;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server started for the run (Debian's binary), killed when dropped.
pub struct Nats {
    child: Child,
    pub url: String,
    pub pid: u32,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nats {
    pub fn start() -> anyhow::Result<Nats> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // As docker/nats.conf: room for the gateway's largest broadcast (3 MB by default).
        let config = std::env::temp_dir().join(format!("rtbench-nats-{port}.conf"));
        std::fs::write(&config, "max_payload: 8MB\n")?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin} (apt-get install nats-server)"))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&config);
        Ok(Nats {
            pid: child.id(),
            child,
            url: format!("nats://{addr}"),
        })
    }
}

/// `n` gateway nodes on `nats`.
pub fn nodes(bin: &Path, nats: &Nats, n: usize) -> anyhow::Result<Vec<Target>> {
    (0..n)
        .map(|i| {
            Target::spawn(
                &format!("node-{}", i + 1),
                bin,
                &[
                    ("CLUSTER_NATS_URL", nats.url.clone()),
                    ("NODE_NAME", format!("node-{}", i + 1)),
                ],
            )
        })
        .collect()
}

fn fanout(subscribers: usize, rate: f64, payload: usize, seconds: f64, nodes: Vec<usize>) -> Plan {
    Plan {
        nodes,
        ..Plan::fanout(subscribers, rate, payload, seconds)
    }
}

fn row(
    label: &str,
    round: usize,
    outcome: &broadcast::Outcome,
    cpu: &[f64],
    names: &[&str],
) -> Value {
    let per = |s: f64| (s * 1e9 / outcome.delivered.max(1) as f64).round();
    let cpu_ns: serde_json::Map<String, Value> = names
        .iter()
        .zip(cpu)
        .map(|(n, s)| ((*n).to_owned(), json!(per(*s))))
        .collect();
    json!({
        "path": label,
        "round": round,
        "delivered": outcome.delivered,
        "expected": outcome.expected,
        "deliveries_per_s": outcome.deliveries_per_s,
        "latency": outcome.latency,
        "cpu_ns_per_delivery": cpu_ns,
    })
}

/// The latency comparison: `rounds` rounds, each running the three paths one after the other
/// (alternated, so noise on the shared machine falls on all three), and the ratios of the
/// medians.
pub async fn latency(
    bin: &Path,
    subscribers: usize,
    rate: f64,
    payload: usize,
    seconds: f64,
    rounds: usize,
) -> anyhow::Result<Value> {
    const PATHS: [&str; 3] = [
        "single node (no cluster)",
        "cluster, publisher and receivers on node 1",
        "cluster, publisher on node 1, receivers on node 2",
    ];
    let mut rows = Vec::new();
    let nats = Nats::start()?;
    let cluster = nodes(bin, &nats, 2)?;
    let targets: Vec<&Target> = cluster.iter().collect();
    let single = Target::spawn("single", bin, &[])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut cross_nodes = vec![0];
    cross_nodes.extend(std::iter::repeat_n(1, subscribers));
    for round in 0..rounds {
        let plan = fanout(subscribers, rate, payload, seconds, Vec::new());
        let (o, cpu) = broadcast::run_on(&[&single], &[], &plan).await?;
        rows.push(row(PATHS[0], round, &o, &cpu, &["node-1"]));
        let names = ["node-1", "node-2", "nats-server"];
        let (o, cpu) = broadcast::run_on(&targets, &[nats.pid], &plan).await?;
        rows.push(row(PATHS[1], round, &o, &cpu, &names));
        let plan = fanout(subscribers, rate, payload, seconds, cross_nodes.clone());
        let (o, cpu) = broadcast::run_on(&targets, &[nats.pid], &plan).await?;
        rows.push(row(PATHS[2], round, &o, &cpu, &names));
    }
    let median = |path: &str, key: &str| {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r["path"] == path)
            .filter_map(|r| r["latency"][key].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let medians: serde_json::Map<String, Value> = PATHS
        .iter()
        .map(|p| {
            (
                (*p).to_owned(),
                json!({"p50_ms": median(p, "p50_ms"), "p99_ms": median(p, "p99_ms")}),
            )
        })
        .collect();
    let ratio =
        |path: &str, key: &str| crate::scenario::ratio(median(path, key), median(PATHS[0], key));
    Ok(json!({
        "subscribers": subscribers,
        "rate": rate,
        "payload_bytes": payload,
        "seconds": seconds,
        "rounds": rounds,
        "rows": rows,
        "medians": medians,
        "cross_over_single": {"p50": ratio(PATHS[2], "p50_ms"), "p99": ratio(PATHS[2], "p99_ms")},
        "local_over_single": {"p50": ratio(PATHS[1], "p50_ms"), "p99": ratio(PATHS[1], "p99_ms")},
    }))
}

/// Groups of `size` members, one publisher per group at `rate`, `self` on: members of group
/// `g` on node `g % n` (local) or member `m` of group `g` on node `(g + m) % n` (spread: the
/// publishers as spread as the members).
fn groups(groups: usize, size: usize, rate: f64, seconds: f64, n: usize, spread: bool) -> Plan {
    let mut clients = Vec::new();
    let mut nodes = Vec::new();
    for g in 0..groups {
        for m in 0..size {
            clients.push(ClientPlan {
                joins: vec![format!("group-{g}")],
                publish: if m == 0 { vec![(0, rate)] } else { vec![] },
            });
            nodes.push(if spread { (g + m) % n } else { g % n });
        }
    }
    Plan {
        clients,
        self_broadcast: true,
        payload_bytes: 128,
        seconds,
        drain: Duration::from_secs(1),
        private: false,
        tokens: Vec::new(),
        nodes,
    }
}

/// The scaling curve under per-node CPU caps.
pub async fn scaling(
    bin: &Path,
    cpus: f64,
    group_count: usize,
    size: usize,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for spread in [false, true] {
        for n in 1..=3usize {
            if spread && n == 1 {
                continue;
            }
            let nats = Nats::start()?;
            let cluster = nodes(bin, &nats, n)?;
            let caps = cluster
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    CpuCap::new(
                        &format!("rtbench-node-{i}"),
                        t.pid.context("node pid")?,
                        cpus,
                    )
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let targets: Vec<&Target> = cluster.iter().collect();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let plan = groups(group_count, size, rate, seconds, n, spread);
            let (o, cpu) = broadcast::run_on(&targets, &[nats.pid], &plan).await?;
            let node_cpu: f64 = cpu[..n].iter().sum();
            rows.push(json!({
                "nodes": n,
                "groups": if spread { "spread" } else { "local" },
                "cpu_cap_per_node": cpus,
                "expected": o.expected,
                "delivered": o.delivered,
                "deliveries_per_s": o.deliveries_per_s,
                "latency": o.latency,
                "node_cpu_s": (node_cpu * 1000.0).round() / 1000.0,
                "nats_cpu_s": (cpu[n] * 1000.0).round() / 1000.0,
                "deliveries_per_node_cpu_s": (o.delivered as f64 / node_cpu.max(1e-3)).round(),
            }));
            drop(caps);
        }
    }
    let base = rows[0]["deliveries_per_s"].as_f64().unwrap_or(0.0);
    for r in &mut rows {
        let d = r["deliveries_per_s"].as_f64().unwrap_or(0.0);
        r["over_one_node"] = json!(crate::scenario::ratio(d, base));
    }
    Ok(json!({
        "cpu_cap_per_node": cpus,
        "groups": group_count,
        "group_size": size,
        "rate_per_group": rate,
        "offered_deliveries_per_s": group_count as f64 * size as f64 * rate,
        "seconds": seconds,
        "rows": rows,
    }))
}
