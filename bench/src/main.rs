//! `realtime-bench`: each scenario is a subcommand that runs against the gateway and the limit
//! server in turn (started as child processes unless their addresses are given), prints one JSON
//! document on stdout and one summary line per step on stderr.

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use realtime_bench::pg;
use realtime_bench::scenario::{self, broadcast, database, idle, presence, ratio};
use realtime_bench::servers::{self, Target};
use realtime_protocol::Vsn;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

/// Longest single measurement a step may take, in seconds (the machine is shared).
const MAX_SECONDS: f64 = 30.0;

#[derive(Parser, Debug)]
#[command(
    name = "realtime-bench",
    about = "Load scenarios: gateway vs limit server"
)]
struct Cli {
    #[command(flatten)]
    servers: ServerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// Which servers to measure, in order.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "gateway,limit"
    )]
    servers: Vec<String>,
    /// A running gateway (`host:port`) instead of starting one.
    #[arg(long, global = true)]
    gateway: Option<String>,
    /// Its pid, for CPU and RSS.
    #[arg(long, global = true)]
    gateway_pid: Option<u32>,
    /// A running limit server (`host:port`) instead of starting one.
    #[arg(long, global = true)]
    limit: Option<String>,
    #[arg(long, global = true)]
    limit_pid: Option<u32>,
    /// JWT secret of a running gateway.
    #[arg(long, global = true, env = "API_JWT_SECRET", hide_env_values = true,
          default_value = servers::DEV_SECRET)]
    secret: String,
    /// Serializer the clients use: 2 (supabase-js today: JSON arrays + binary broadcasts) or 1
    /// (realtime-js 2.11: JSON objects).
    #[arg(long, global = true, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    vsn: u8,
    /// Where `realtime-gateway` and `limit-server` are (default: next to this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// One topic, N subscribers, one publisher; publish rates step up until deliveries stop
    /// keeping up.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publish rates (messages/s) to step through.
        #[arg(
            long,
            alias = "rate",
            value_delimiter = ',',
            default_value = "50,100,200"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// Payload sizes at a fixed subscriber count and rate (issue 7 scenario 2).
    Payload {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, value_delimiter = ',', default_value = "1024,10240,51200")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Supabase's broadcast shape: each client in a 1-member echo channel and a 6-member group,
    /// one message per second per channel; client counts step up (scenario 1).
    Broadcast {
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000")]
        clients: Vec<usize>,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// Large fan-out: channels of 100 members, 2 channels per client, one publisher per channel
    /// (scenario 3).
    LargeFanout {
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Messages/s per channel.
        #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// Idle footprint: N joined idle sockets; server RSS per socket; connect + join rate
    /// (scenario 8).
    Idle {
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
        /// Distinct channels the sockets join (round robin).
        #[arg(long, default_value_t = 100)]
        channels: usize,
        /// Seconds to hold the sockets.
        #[arg(long, default_value_t = 3.0)]
        hold: f64,
    },
    /// Presence rooms: time until every member's state shows every member (scenario 7).
    Presence {
        #[arg(long, value_delimiter = ',', default_value = "200")]
        members: Vec<usize>,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Private channels (scenario 4, gateway only: the limit server has no RLS): distinct users,
    /// rooms of `members` (2 per user) whose read and write policy on `realtime.messages` reads a
    /// membership table; joins/s and deliveries, next to the same plan on public channels.
    Private {
        #[arg(long, value_delimiter = ',', default_value = "500,2000")]
        clients: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        members: usize,
        /// Messages/s per room.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Rows of other members in the membership table.
        #[arg(long, default_value_t = 100_000)]
        pad: usize,
    },
    /// Broadcast from the database (scenario 5, gateway only): a trigger calls `realtime.send`
    /// on each insert; insert rates step up; deliveries/s and insert→client latency to N
    /// subscribers, next to the same fan-out published over a socket.
    DbBroadcast {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, value_delimiter = ',', default_value = "100,300,1000,3000")]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Postgres Changes grid (scenario 6, gateway only): subscribers × RLS × filter; the commit
    /// rate steps up until p95 > 1 s or the backlog grows; `pg_recvlogical` on its own slot
    /// drains the same inserts (the stream's ceiling).
    PgChanges {
        #[arg(long, value_delimiter = ',', default_value = "100,500,2000")]
        subscribers: Vec<usize>,
        /// RLS settings to run: off, on (`auth.uid() is not null`, decided in process), member
        /// (a membership-table subquery, checked in SQL).
        #[arg(long, value_delimiter = ',', default_value = "off,on")]
        rls: Vec<String>,
        /// Filters to run: none, eq.
        #[arg(long, value_delimiter = ',', default_value = "none,eq")]
        filter: Vec<String>,
        /// Channel names to run: distinct (each subscriber its own, a frame per subscriber),
        /// shared (all the same name, one frame per change).
        #[arg(long, value_delimiter = ',', default_value = "distinct")]
        topics: Vec<String>,
        /// Commit rates (changes/s) to step through.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10,50,200,500,1000,2000,4000"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Skip the `pg_recvlogical` reference.
        #[arg(long)]
        no_recvlogical: bool,
    },
    /// Several gateway nodes on one nats-server (started here): cross-node broadcast latency
    /// and CPU per delivery against a single node, then deliveries/s from 1 to 3 nodes with
    /// each node capped to `--cpus` of a core (cgroup v1, root). Ignores `--servers`.
    Cluster {
        #[arg(long, default_value_t = 500)]
        subscribers: usize,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 256)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Rounds of the latency part (the three paths alternated in each).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// CPU quota per node for the scaling part, in cores.
        #[arg(long, default_value_t = 0.1)]
        cpus: f64,
        /// Scaling part: groups, their size, and each group's publish rate.
        #[arg(long, default_value_t = 60)]
        groups: usize,
        #[arg(long, default_value_t = 10)]
        group_size: usize,
        #[arg(long, default_value_t = 300.0)]
        group_rate: f64,
        /// Skip the scaling part (no cgroup needed).
        #[arg(long)]
        no_scaling: bool,
    },
    /// A Markdown table (figures of both servers and their ratios) and a PNG chart, from the
    /// JSON the other commands printed or from scenarios run now (`--run`); written under
    /// `--out` (default `bench/results/`, ignored by git).
    Report {
        /// JSON documents printed by the scenario commands.
        files: Vec<PathBuf>,
        /// Scenarios to run now with small default sizes, e.g. `fanout,idle,presence,pg-changes`.
        #[arg(long, value_delimiter = ',')]
        run: Vec<String>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ceiling = realtime_bench::sys::raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli, ceiling))
}

fn targets(args: &ServerArgs) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for name in &args.servers {
        let target = match name.as_str() {
            "gateway" => match &args.gateway {
                Some(addr) => Target::attach("gateway", addr, args.gateway_pid, &args.secret),
                None => Target::spawn(
                    "gateway",
                    &servers::sibling_binary(args.bin_dir.as_deref(), "realtime-gateway")?,
                    &[],
                )?,
            },
            "limit" | "limit-server" => match &args.limit {
                Some(addr) => Target::attach("limit-server", addr, args.limit_pid, &args.secret),
                None => Target::spawn(
                    "limit-server",
                    &servers::sibling_binary(args.bin_dir.as_deref(), "limit-server")?,
                    &[],
                )?,
            },
            other => bail!("unknown server {other:?} (gateway, limit)"),
        };
        let mut target = target;
        target.endpoint.vsn = if args.vsn == 1 { Vsn::V1 } else { Vsn::V2 };
        out.push(target);
    }
    Ok(out)
}

fn machine(ceiling: u64) -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    json!({"cores": cores, "cpu": model, "socket_ceiling": ceiling})
}

fn check_seconds(seconds: f64) -> anyhow::Result<()> {
    if !(seconds > 0.0 && seconds <= MAX_SECONDS) {
        bail!("--seconds must be in (0, {MAX_SECONDS}]");
    }
    Ok(())
}

fn check_sockets(n: usize, ceiling: u64) -> anyhow::Result<()> {
    if n as u64 > ceiling {
        bail!(
            "{n} sockets exceed this process's ceiling of {ceiling} (open-file limit); use several processes"
        );
    }
    Ok(())
}

/// Ratios gateway / limit-server of the figures that have them.
fn ratios(results: &[Value], fields: &[&str]) -> Value {
    let find = |name: &str| results.iter().find(|r| r["server"] == name);
    let (Some(g), Some(l)) = (find("gateway"), find("limit-server")) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for f in fields {
        let get = |v: &Value| {
            f.split('.')
                .try_fold(v, |v, k| v.get(k))
                .and_then(Value::as_f64)
        };
        if let (Some(a), Some(b)) = (get(g), get(l)) {
            out.insert((*f).to_owned(), json!(ratio(a, b)));
        }
    }
    Value::Object(out)
}

async fn broadcast_steps(
    targets: &[Target],
    plans: Vec<(Value, broadcast::Plan)>,
    label: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut steps = Vec::new();
    for (param, plan) in plans {
        let mut results = Vec::new();
        let mut anyone_kept_up = false;
        for t in targets {
            let o = broadcast::run(t, &plan).await?;
            eprintln!(
                "summary: {label} {param} {}: {} deliveries/s of {} expected/s, p50 {:.1} ms p99 {:.1} ms, server cpu {:.0}% ({} ns/delivery) rss {} MiB{}",
                scenario::name(t),
                o.deliveries_per_s,
                (o.expected as f64 / o.seconds).round(),
                o.latency.p50_ms,
                o.latency.p99_ms,
                o.cpu.server_cpu_pct,
                o.server_cpu_ns_per_delivery,
                o.cpu.server_rss_kib / 1024,
                if o.keeping_up {
                    ""
                } else {
                    " (not keeping up)"
                },
            );
            anyone_kept_up |= o.keeping_up;
            results.push(serde_json::to_value(o)?);
        }
        let r = ratios(
            &results,
            &[
                "deliveries_per_s",
                "latency.p50_ms",
                "latency.p99_ms",
                "server_cpu_ns_per_delivery",
            ],
        );
        if !r.is_null() {
            eprintln!("summary: {label} {param} gateway/limit-server: {r}");
        }
        steps.push(json!({"step": param, "results": results, "ratios": r}));
        if !anyone_kept_up {
            break;
        }
    }
    Ok(steps)
}

async fn run(cli: Cli, ceiling: u64) -> anyhow::Result<()> {
    if let Command::Report { files, run, out } = &cli.command {
        return report(files, run, out, &cli.servers);
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (name, params, steps) = if let Command::Cluster {
        subscribers,
        rate,
        payload_bytes,
        seconds,
        rounds,
        cpus,
        groups,
        group_size,
        group_rate,
        no_scaling,
    } = cli.command
    {
        check_seconds(seconds)?;
        check_sockets(subscribers + 1, ceiling)?;
        anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
        let bin = servers::sibling_binary(cli.servers.bin_dir.as_deref(), "realtime-gateway")?;
        let latency =
            scenario::cluster::latency(&bin, subscribers, rate, payload_bytes, seconds, rounds)
                .await?;
        eprintln!(
            "summary: cluster latency (medians of {rounds} rounds) cross-node / single node: {}, same node in a cluster / single node: {}",
            latency["cross_over_single"], latency["local_over_single"]
        );
        let mut steps = vec![json!({"step": "latency", "results": latency})];
        if !no_scaling {
            let scaling =
                scenario::cluster::scaling(&bin, cpus, groups, group_size, group_rate, seconds)
                    .await?;
            for r in scaling["rows"].as_array().into_iter().flatten() {
                eprintln!(
                    "summary: cluster scaling {} nodes, {} groups: {} deliveries/s ({}x one node)",
                    r["nodes"], r["groups"], r["deliveries_per_s"], r["over_one_node"]
                );
            }
            steps.push(json!({"step": "scaling", "results": scaling}));
        }
        ("cluster", json!({}), steps)
    } else if matches!(
        cli.command,
        Command::Private { .. } | Command::DbBroadcast { .. } | Command::PgChanges { .. }
    ) {
        database_command(&cli, ceiling).await?
    } else {
        socket_command(&cli, ceiling).await?
    };
    let doc = json!({
        "scenario": name,
        "vsn": cli.servers.vsn,
        "unix_time": started,
        "machine": machine(ceiling),
        "params": params,
        "steps": steps,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Scenarios 4–6: a throwaway cluster and a gateway started against it (the limit server has no
/// database; each has a reference of its own instead).
async fn database_command(
    cli: &Cli,
    ceiling: u64,
) -> anyhow::Result<(&'static str, Value, Vec<Value>)> {
    if cli.servers.gateway.is_some() {
        bail!("scenarios 4-6 start their own Postgres and gateway; --gateway is not supported");
    }
    let binary = servers::sibling_binary(cli.servers.bin_dir.as_deref(), "realtime-gateway")?;
    let (cluster, db) = pg::fresh_database().await?;
    let secret = servers::DEV_SECRET;
    let env = [("OUTBOX_MAX_FRAMES", "16384".to_owned())];
    let vsn = if cli.servers.vsn == 1 {
        Vsn::V1
    } else {
        Vsn::V2
    };
    let mut gw = pg::spawn_gateway(&binary, &db, "bench_gateway", &env).await?;
    gw.endpoint.vsn = vsn;
    eprintln!(
        "summary: gateway only (the limit server has no database and no RLS); Postgres at 127.0.0.1:{}",
        cluster.port()
    );
    match &cli.command {
        Command::Private {
            clients,
            members,
            rate,
            seconds,
            pad,
        } => {
            check_seconds(*seconds)?;
            database::private_schema(&db, *pad).await?;
            let mut steps = Vec::new();
            for &c in clients {
                check_sockets(c, ceiling)?;
                let plan = broadcast::Plan::large_fanout(c, *members, *rate, 100, *seconds);
                let private = database::private_members(&db, secret, plan).await?;
                let mut public = private.clone();
                public.private = false;
                let mut results = Vec::new();
                for (label, plan) in [("gateway", &private), ("gateway-public", &public)] {
                    let o = broadcast::run(&gw, plan).await?;
                    let joins = database::joins_per_s(plan, &o);
                    eprintln!(
                        "summary: private {c} {label}: {joins} connect+joins/s ({:.2} s for {c} sockets), {} deliveries/s of {} expected/s, p50 {:.1} ms p99 {:.1} ms{}",
                        o.connect_join_s,
                        o.deliveries_per_s,
                        (o.expected as f64 / o.seconds).round(),
                        o.latency.p50_ms,
                        o.latency.p99_ms,
                        if o.keeping_up {
                            ""
                        } else {
                            " (not keeping up)"
                        },
                    );
                    let mut v = serde_json::to_value(&o)?;
                    v["server"] = json!(label);
                    v["joins_per_s"] = json!(joins);
                    results.push(v);
                }
                let r = ratios_between(
                    &results,
                    "gateway-public",
                    &[
                        "joins_per_s",
                        "deliveries_per_s",
                        "latency.p99_ms",
                        "server_cpu_ns_per_delivery",
                    ],
                );
                eprintln!("summary: private {c} private/public: {r}");
                steps.push(json!({"step": {"clients": c}, "results": results, "ratios": r}));
            }
            Ok((
                "private",
                json!({"members": members, "rate_per_room": rate, "seconds": seconds, "pad_rows": pad,
                       "note": "gateway only: the limit server has no RLS; the reference is the same plan on public channels"}),
                steps,
            ))
        }
        Command::DbBroadcast {
            subscribers,
            rates,
            seconds,
        } => {
            check_seconds(*seconds)?;
            check_sockets(subscribers + 1, ceiling)?;
            let (join_s, db_steps) =
                database::db_broadcast(&gw, &db, *subscribers, rates, *seconds).await?;
            let mut steps = Vec::new();
            for s in db_steps {
                eprintln!(
                    "summary: db-broadcast {subscribers} @ {}/s: {} inserts/s, {} deliveries/s ({} of {}), p50 {:.1} ms p99 {:.1} ms{}",
                    s.rate,
                    s.changes_per_s,
                    s.deliveries_per_s,
                    s.delivered,
                    s.expected,
                    s.latency.p50_ms,
                    s.latency.p99_ms,
                    if s.keeping_up {
                        ""
                    } else {
                        " (not keeping up)"
                    },
                );
                // The same fan-out published over a socket.
                let plan = broadcast::Plan::fanout(*subscribers, s.rate, 100, *seconds);
                let o = broadcast::run(&gw, &plan).await?;
                eprintln!(
                    "summary: db-broadcast {subscribers} @ {}/s over a socket: {} deliveries/s, p99 {:.1} ms",
                    s.rate, o.deliveries_per_s, o.latency.p99_ms
                );
                let mut sv = serde_json::to_value(&s)?;
                sv["server"] = json!("gateway");
                let mut ov = serde_json::to_value(&o)?;
                ov["server"] = json!("gateway-socket");
                let results = vec![sv, ov];
                let r = ratios_between(
                    &results,
                    "gateway-socket",
                    &["deliveries_per_s", "latency.p50_ms", "latency.p99_ms"],
                );
                let keep = s.keeping_up;
                steps.push(json!({"step": {"rate": s.rate}, "results": results, "ratios": r}));
                if !keep {
                    break;
                }
            }
            Ok((
                "db-broadcast",
                json!({"subscribers": subscribers, "seconds": seconds, "connect_join_s": join_s,
                       "writers": database::WRITERS,
                       "note": "gateway only; the reference is the same fan-out published over a socket"}),
                steps,
            ))
        }
        Command::PgChanges {
            subscribers,
            rls,
            filter,
            topics,
            rates,
            seconds,
            no_recvlogical,
        } => {
            check_seconds(*seconds)?;
            db.client()
                .await?
                .batch_execute(database::PG_CHANGES_SQL)
                .await?;
            let mut steps = Vec::new();
            let mut cells = 0;
            for &n in subscribers {
                check_sockets(n, ceiling)?;
                for (r, f, t) in rls.iter().flat_map(|r| {
                    filter
                        .iter()
                        .flat_map(move |f| topics.iter().map(move |t| (r, f, t)))
                }) {
                    let (rls, member_policy) = match r.as_str() {
                        "off" => (false, false),
                        "on" => (true, false),
                        "member" => (true, true),
                        other => bail!("{other:?}: expected off, on or member"),
                    };
                    let cell = database::Cell {
                        subscribers: n,
                        rls,
                        member_policy,
                        filter: parse_switch(f, "eq", "none")?,
                        shared_topic: parse_switch(t, "shared", "distinct")?,
                    };
                    // A fresh gateway (and slot) per cell: a cell that ended behind must
                    // not slow the next one down with its backlog.
                    // Its own slot; the previous one is dropped when its walsender has
                    // gone (best effort: the cluster is thrown away anyway).
                    drop(gw);
                    let admin = db.client().await?;
                    let _ = admin
                        .execute(
                            "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                                 where slot_name like 'bench_gateway%' and not active",
                            &[],
                        )
                        .await;
                    cells += 1;
                    let slot = format!("bench_gateway_{cells}");
                    gw = pg::spawn_gateway(&binary, &db, &slot, &env).await?;
                    gw.endpoint.vsn = vsn;
                    let o = database::pg_changes_cell(
                        &gw,
                        cluster,
                        &db,
                        secret,
                        cell,
                        rates,
                        *seconds,
                        !no_recvlogical,
                    )
                    .await?;
                    eprintln!(
                        "summary: pg-changes {}: {} changes/s sustained (p95 < 1 s), {} deliveries/s, p95 {:.0} ms; {} changes/s at any latency (p95 {:.0} ms); pg_recvlogical {} changes/s{}",
                        cell.label(),
                        o.changes_per_s,
                        o.deliveries_per_s,
                        o.latency.p95_ms,
                        o.changes_per_s_any_latency,
                        o.p95_ms_any_latency,
                        o.recvlogical.as_ref().map_or(0.0, |r| r.changes_per_s),
                        o.recvlogical
                            .as_ref()
                            .and_then(|r| ratio(o.changes_per_s, r.changes_per_s))
                            .map_or(String::new(), |x| format!(" (ratio {x})")),
                    );
                    steps.push(database::cell_json(&cell, &o)?);
                }
            }
            Ok((
                "pg-changes",
                json!({"rates": rates, "seconds": seconds, "writers": database::WRITERS,
                       "note": "gateway only; the reference is pg_recvlogical draining the same inserts from its own slot"}),
                steps,
            ))
        }
        _ => unreachable!("only database commands"),
    }
}

fn parse_switch(v: &str, yes: &str, no: &str) -> anyhow::Result<bool> {
    match v {
        x if x == yes => Ok(true),
        x if x == no => Ok(false),
        other => bail!("{other:?}: expected {yes} or {no}"),
    }
}

/// Ratios gateway / `reference` of the figures that have them.
fn ratios_between(results: &[Value], reference: &str, fields: &[&str]) -> Value {
    let find = |name: &str| results.iter().find(|r| r["server"] == name);
    let (Some(g), Some(l)) = (find("gateway"), find(reference)) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for f in fields {
        if let (Some(a), Some(b)) = (
            field(g, f).and_then(Value::as_f64),
            field(l, f).and_then(Value::as_f64),
        ) {
            out.insert((*f).to_owned(), json!(ratio(a, b)));
        }
    }
    Value::Object(out)
}

async fn socket_command(
    cli: &Cli,
    ceiling: u64,
) -> anyhow::Result<(&'static str, Value, Vec<Value>)> {
    let targets = targets(&cli.servers)?;
    let (name, params, steps) = match cli.command.clone() {
        Command::Fanout {
            subscribers,
            rates,
            seconds,
            payload_bytes,
        } => {
            check_seconds(seconds)?;
            check_sockets(subscribers + 1, ceiling)?;
            let plans = rates
                .iter()
                .map(|&r| {
                    let plan = broadcast::Plan::fanout(subscribers, r, payload_bytes, seconds);
                    (json!({"rate": r}), plan)
                })
                .collect();
            let steps = broadcast_steps(&targets, plans, "fanout").await?;
            (
                "fanout",
                json!({"subscribers": subscribers, "seconds": seconds, "payload_bytes": payload_bytes}),
                steps,
            )
        }
        Command::Payload {
            subscribers,
            sizes,
            rate,
            seconds,
        } => {
            check_seconds(seconds)?;
            check_sockets(subscribers + 1, ceiling)?;
            let plans = sizes
                .iter()
                .map(|&s| {
                    let plan = broadcast::Plan::fanout(subscribers, rate, s, seconds);
                    (json!({"payload_bytes": s}), plan)
                })
                .collect();
            let steps = broadcast_steps(&targets, plans, "payload").await?;
            (
                "payload",
                json!({"subscribers": subscribers, "rate": rate, "seconds": seconds}),
                steps,
            )
        }
        Command::Broadcast {
            clients,
            seconds,
            payload_bytes,
        } => {
            check_seconds(seconds)?;
            for &c in &clients {
                check_sockets(c, ceiling)?;
            }
            let plans = clients
                .iter()
                .map(|&c| {
                    let plan = broadcast::Plan::echo_and_groups(c, payload_bytes, seconds);
                    (json!({"clients": c}), plan)
                })
                .collect();
            let steps = broadcast_steps(&targets, plans, "broadcast").await?;
            (
                "broadcast",
                json!({"seconds": seconds, "payload_bytes": payload_bytes}),
                steps,
            )
        }
        Command::LargeFanout {
            clients,
            members,
            rates,
            seconds,
            payload_bytes,
        } => {
            check_seconds(seconds)?;
            check_sockets(clients, ceiling)?;
            let plans = rates
                .iter()
                .map(|&r| {
                    let plan =
                        broadcast::Plan::large_fanout(clients, members, r, payload_bytes, seconds);
                    (json!({"rate_per_channel": r}), plan)
                })
                .collect();
            let steps = broadcast_steps(&targets, plans, "large-fanout").await?;
            (
                "large-fanout",
                json!({"clients": clients, "members": members, "seconds": seconds, "payload_bytes": payload_bytes}),
                steps,
            )
        }
        Command::Idle {
            sockets,
            channels,
            hold,
        } => {
            check_seconds(hold)?;
            check_sockets(sockets, ceiling)?;
            let mut results = Vec::new();
            for t in &targets {
                let o = idle::run(t, sockets, channels, Duration::from_secs_f64(hold)).await?;
                eprintln!(
                    "summary: idle {sockets} {}: rss {} MiB ({} B/socket over {} MiB at start), {} connect+join/s, {} µs server cpu/socket, lost {}",
                    scenario::name(t),
                    o.rss_held_kib / 1024,
                    o.rss_per_socket_bytes,
                    o.rss_before_kib / 1024,
                    o.connect_joins_per_s,
                    o.server_cpu_us_per_socket,
                    o.lost,
                );
                results.push(serde_json::to_value(o)?);
                // Let the closed sockets' TIME_WAIT and the server settle before the next one.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let r = ratios(
                &results,
                &[
                    "rss_per_socket_bytes",
                    "rss_held_kib",
                    "connect_joins_per_s",
                    "server_cpu_us_per_socket",
                ],
            );
            if !r.is_null() {
                eprintln!("summary: idle {sockets} gateway/limit-server: {r}");
            }
            (
                "idle",
                json!({"sockets": sockets, "channels": channels, "hold": hold}),
                vec![json!({"step": {"sockets": sockets}, "results": results, "ratios": r})],
            )
        }
        Command::Report { .. }
        | Command::Cluster { .. }
        | Command::Private { .. }
        | Command::DbBroadcast { .. }
        | Command::PgChanges { .. } => unreachable!("handled above"),
        Command::Presence { members, timeout } => {
            check_seconds(timeout)?;
            let mut steps = Vec::new();
            for &m in &members {
                check_sockets(m, ceiling)?;
                let mut results = Vec::new();
                for t in &targets {
                    let o = presence::run(t, m, Duration::from_secs_f64(timeout)).await?;
                    eprintln!(
                        "summary: presence {m} {}: all converged in {} ms ({}/{m} members, p50 {:.1} ms), {} B received per member join, server cpu {:.0}%",
                        scenario::name(t),
                        o.converge_all_ms,
                        o.converged_members,
                        o.converge.p50_ms,
                        o.bytes_per_member_join,
                        o.cpu.server_cpu_pct,
                    );
                    results.push(serde_json::to_value(o)?);
                }
                let r = ratios(
                    &results,
                    &[
                        "converge_all_ms",
                        "bytes_per_member_join",
                        "cpu.server_cpu_s",
                    ],
                );
                if !r.is_null() {
                    eprintln!("summary: presence {m} gateway/limit-server: {r}");
                }
                steps.push(json!({"step": {"members": m}, "results": results, "ratios": r}));
            }
            ("presence", json!({"timeout": timeout}), steps)
        }
    };
    Ok((name, params, steps))
}

/// The figures shown per scenario: (JSON path, column label).
fn report_fields(scenario: &str) -> &'static [(&'static str, &'static str)] {
    match scenario {
        "idle" => &[
            ("rss_per_socket_bytes", "RSS B/socket"),
            ("connect_joins_per_s", "connect+join/s"),
            ("server_cpu_us_per_socket", "CPU µs/socket"),
        ],
        "presence" => &[
            ("converge_all_ms", "converged ms"),
            ("bytes_per_member_join", "B/member join"),
        ],
        "private" => &[
            ("joins_per_s", "connect+joins/s"),
            ("deliveries_per_s", "deliveries/s"),
            ("latency.p99_ms", "p99 ms"),
        ],
        "db-broadcast" => &[
            ("changes_per_s", "inserts/s"),
            ("deliveries_per_s", "deliveries/s"),
            ("latency.p99_ms", "p99 ms"),
        ],
        "pg-changes" => &[
            ("changes_per_s", "changes/s sustained"),
            ("changes_per_s_any_latency", "changes/s any latency"),
            ("deliveries_per_s", "deliveries/s"),
            ("latency.p95_ms", "p95 ms"),
        ],
        _ => &[
            ("deliveries_per_s", "deliveries/s"),
            ("latency.p99_ms", "p99 ms"),
            ("server_cpu_ns_per_delivery", "CPU ns/delivery"),
        ],
    }
}

/// Whole numbers as integers, others to three significant digits.
fn number(x: f64) -> String {
    if x.fract() == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Default small sizes for `report --run`: a few minutes in all.
fn run_args(scenario: &str) -> anyhow::Result<&'static [&'static str]> {
    Ok(match scenario {
        "fanout" => &[
            "--subscribers",
            "1000",
            "--rates",
            "200,800,1600",
            "--seconds",
            "3",
        ],
        "payload" => &["--subscribers", "100", "--rate", "100", "--seconds", "3"],
        "broadcast" => &["--clients", "2000,5000", "--seconds", "3"],
        "large-fanout" => &["--clients", "2000", "--rates", "5,10,20", "--seconds", "3"],
        "idle" => &["--sockets", "5000", "--hold", "2"],
        "presence" => &["--members", "10,100,200"],
        "private" => &["--clients", "500,2000", "--seconds", "3"],
        "db-broadcast" => &["--subscribers", "100", "--seconds", "3"],
        "pg-changes" => &["--subscribers", "100,500", "--seconds", "2"],
        other => bail!("unknown scenario {other:?}"),
    })
}

/// Runs `scenario` as a child process of this binary (same server options), its JSON to a file
/// under `out`.
fn run_scenario(
    scenario: &str,
    out: &std::path::Path,
    servers: &ServerArgs,
) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = out.join(format!("{scenario}-{stamp}.json"));
    let file = std::fs::File::create(&path)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(scenario)
        .args(run_args(scenario)?)
        .arg("--servers")
        .arg(servers.servers.join(","))
        .arg("--vsn")
        .arg(servers.vsn.to_string())
        .stdout(file);
    if let Some(d) = &servers.bin_dir {
        cmd.arg("--bin-dir").arg(d);
    }
    eprintln!(
        "summary: report: running {scenario} {}",
        run_args(scenario)?.join(" ")
    );
    let status = cmd.status()?;
    if !status.success() {
        bail!(
            "{scenario} failed ({status}); its output so far is in {}",
            path.display()
        );
    }
    Ok(path)
}

/// The result a step's gateway figure is compared with: the limit server, else the scenario's
/// own reference (`pg_recvlogical`, `gateway-public`, `gateway-socket`).
fn reference(results: &[Value]) -> Option<&Value> {
    results
        .iter()
        .find(|r| r["server"] == "limit-server")
        .or_else(|| results.iter().find(|r| r["server"] != "gateway"))
}

fn report(
    files: &[PathBuf],
    run: &[String],
    out: &std::path::Path,
    servers: &ServerArgs,
) -> anyhow::Result<()> {
    if files.is_empty() && run.is_empty() {
        bail!("report needs JSON files or --run scenario,…");
    }
    std::fs::create_dir_all(out)?;
    let mut files = files.to_vec();
    for scenario in run {
        files.push(run_scenario(scenario, out, servers)?);
    }
    let mut md = String::from(
        "| scenario | step | figure | gateway | reference | ratio |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let mut noisy = 0;
    let mut docs = Vec::new();
    for file in &files {
        let doc: Value = serde_json::from_slice(&std::fs::read(file)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let scenario = doc["scenario"].as_str().unwrap_or("?");
        let vsn = doc["vsn"]
            .as_u64()
            .map_or(String::new(), |v| format!(" (V{v})"));
        for step in doc["steps"].as_array().into_iter().flatten() {
            let results = step["results"].as_array().cloned().unwrap_or_default();
            noisy += results
                .iter()
                .flat_map(|r| {
                    // pg-changes cells keep the CPU report per rate step.
                    let nested = r["steps"].as_array().cloned().unwrap_or_default();
                    std::iter::once(r.clone()).chain(nested)
                })
                .filter(|r| !r["cpu"]["warning"].is_null())
                .count();
            let gateway = results.iter().find(|r| r["server"] == "gateway");
            let reference = reference(&results);
            let ref_name =
                reference
                    .and_then(|r| r["server"].as_str())
                    .map_or(String::new(), |n| {
                        if n == "limit-server" {
                            String::new()
                        } else {
                            format!(" ({n})")
                        }
                    });
            for (path, label) in report_fields(scenario) {
                let get = |r: Option<&Value>| r.and_then(|r| field(r, path)?.as_f64());
                let (g, l) = (get(gateway), get(reference));
                let show = |x: Option<f64>| x.map_or("–".into(), number);
                let r = g
                    .zip(l)
                    .and_then(|(g, l)| ratio(g, l))
                    .map_or("–".into(), |r| format!("{r:.2}"));
                md.push_str(&format!(
                    "| {scenario}{vsn} | {} | {label} | {} | {}{} | {r} |\n",
                    step["step"],
                    show(g),
                    show(l),
                    if l.is_some() { ref_name.as_str() } else { "" },
                ));
            }
        }
        docs.push(doc);
    }
    md.push_str(&format!(
        "\nReference: the limit server; for scenarios 4–6 (gateway only) the scenario's own, named in the cell.\n\
         {noisy} measurement(s) warned that other processes used much CPU meanwhile.\n"
    ));
    print!("{md}");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = out.join(format!("report-{stamp}.md"));
    std::fs::write(&path, md)?;
    eprintln!("summary: report written to {}", path.display());
    let png = out.join(format!("report-{stamp}.png"));
    realtime_bench::chart::write(&docs, &png)?;
    eprintln!("summary: chart written to {}", png.display());
    Ok(())
}
