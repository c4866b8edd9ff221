//! `realtime-bench`: each scenario is a subcommand that runs against the gateway and the limit
//! server in turn (started as child processes unless their addresses are given), prints one JSON
//! document on stdout and one summary line per step on stderr.

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use realtime_bench::scenario::{self, broadcast, idle, presence, ratio};
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

#[derive(Subcommand, Debug)]
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
    /// A Markdown table (figures of both servers and their ratios) from the JSON the other
    /// commands printed; also written under `--out` (default `bench/results/`, ignored by git).
    Report {
        /// JSON documents printed by the scenario commands.
        #[arg(required = true)]
        files: Vec<PathBuf>,
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
    if let Command::Report { files, out } = &cli.command {
        return report(files, out);
    }
    let targets = targets(&cli.servers)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (name, params, steps) = match cli.command {
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
        Command::Report { .. } => unreachable!("handled above"),
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

fn report(files: &[PathBuf], out: &std::path::Path) -> anyhow::Result<()> {
    let mut md = String::from(
        "| scenario | step | figure | gateway | limit server | ratio |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    let mut noisy = 0;
    for file in files {
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
                .filter(|r| !r["cpu"]["warning"].is_null())
                .count();
            let find = |name: &str| results.iter().find(|r| r["server"] == name);
            for (path, label) in report_fields(scenario) {
                let get = |name: &str| find(name).and_then(|r| field(r, path)?.as_f64());
                let (g, l) = (get("gateway"), get("limit-server"));
                let show = |x: Option<f64>| x.map_or("–".into(), number);
                let r = g
                    .zip(l)
                    .and_then(|(g, l)| ratio(g, l))
                    .map_or("–".into(), |r| format!("{r:.2}"));
                md.push_str(&format!(
                    "| {scenario}{vsn} | {} | {label} | {} | {} | {r} |\n",
                    step["step"],
                    show(g),
                    show(l),
                ));
            }
        }
    }
    md.push_str(&format!(
        "\n{noisy} measurement(s) warned that other processes used much CPU meanwhile.\n"
    ));
    print!("{md}");
    std::fs::create_dir_all(out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = out.join(format!("report-{stamp}.md"));
    std::fs::write(&path, md)?;
    eprintln!("summary: report written to {}", path.display());
    Ok(())
}
