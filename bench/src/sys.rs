//! What the machine says: the open-file limit, and CPU and memory from `/proc`.
//!
//! Every run samples the server's CPU time, this process's, and the whole machine's busy time, so
//! the report can say how much CPU *other* processes used meanwhile (the machine is shared).

use serde::Serialize;
use std::time::Instant;

/// Sockets one process keeps back for itself (stdio, the listener, files).
const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns how many sockets this process
/// can hold (the new soft limit minus a small reserve).
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum
        && limit.current != Some(hard)
    {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    now.saturating_sub(FD_RESERVE)
}

/// Resident set size of a process, in KiB (`VmRSS`), and its peak (`VmHWM`).
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:").unwrap_or(0)))
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // In `rest`, utime is field index 11 and stime 12 (fields 14 and 15 of the full line).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Machine-wide (busy, steal) ticks from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, *v.get(7).unwrap_or(&0)))
}

fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// A CPU measurement in progress.
#[derive(Debug)]
pub struct CpuSampler {
    server: Option<u32>,
    started: Instant,
    server_ticks: u64,
    self_ticks: u64,
    machine: (u64, u64),
}

/// CPU use over a run, in percent of one core (200 = both cores of a 2-core machine).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuReport {
    pub seconds: f64,
    /// CPU time the server used, seconds.
    pub server_cpu_s: f64,
    /// CPU time this process (the load generator) used, seconds.
    pub bench_cpu_s: f64,
    pub server_cpu_pct: f64,
    pub bench_cpu_pct: f64,
    pub others_cpu_pct: f64,
    pub steal_pct: f64,
    /// Server RSS at the end, KiB.
    pub server_rss_kib: u64,
    /// Server peak RSS, KiB.
    pub server_hwm_kib: u64,
    /// Set when other processes used much CPU meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Other processes using more than this (percent of one core) make a run noisy.
const NOISY_PCT: f64 = 25.0;

impl CpuSampler {
    pub fn start(server: Option<u32>) -> CpuSampler {
        CpuSampler {
            server,
            started: Instant::now(),
            server_ticks: server.and_then(proc_ticks).unwrap_or(0),
            self_ticks: proc_ticks(std::process::id()).unwrap_or(0),
            machine: machine_ticks().unwrap_or((0, 0)),
        }
    }

    /// CPU seconds the process used since the start, alone (no noise check: with several
    /// servers measured at once, the others are not noise).
    pub fn server_cpu_s(&self) -> f64 {
        let ticks = self
            .server
            .and_then(proc_ticks)
            .unwrap_or(0)
            .saturating_sub(self.server_ticks);
        ticks as f64 / ticks_per_second()
    }

    pub fn finish(&self) -> CpuReport {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let hz = ticks_per_second();
        let pct = |ticks: u64| ticks as f64 / hz / seconds * 100.0;
        let server = self
            .server
            .and_then(proc_ticks)
            .unwrap_or(0)
            .saturating_sub(self.server_ticks);
        let me = proc_ticks(std::process::id())
            .unwrap_or(0)
            .saturating_sub(self.self_ticks);
        let (busy, steal) = machine_ticks().unwrap_or(self.machine);
        let busy = busy.saturating_sub(self.machine.0);
        let others = busy.saturating_sub(server + me);
        let (rss, hwm) = self.server.and_then(rss_kib).unwrap_or((0, 0));
        let others_pct = pct(others);
        let steal_pct = pct(steal.saturating_sub(self.machine.1));
        let warning = (others_pct > NOISY_PCT || steal_pct > NOISY_PCT).then(|| {
            format!(
                "noisy: other processes used {others_pct:.0}% of a core (steal {steal_pct:.0}%) during this run"
            )
        });
        if let Some(w) = &warning {
            eprintln!("warning: {w}");
        }
        CpuReport {
            seconds,
            server_cpu_s: server as f64 / hz,
            bench_cpu_s: me as f64 / hz,
            server_cpu_pct: pct(server),
            bench_cpu_pct: pct(me),
            others_cpu_pct: others_pct,
            steal_pct,
            server_rss_kib: rss,
            server_hwm_kib: hwm,
            warning,
        }
    }
}

/// A process held to `cpus` of one core by a cgroup-v1 CPU quota (root only), released when
/// dropped: the process goes back to the root group and the group is removed.
pub struct CpuCap {
    dir: std::path::PathBuf,
    pid: u32,
}

impl CpuCap {
    pub fn new(name: &str, pid: u32, cpus: f64) -> anyhow::Result<CpuCap> {
        use anyhow::Context;
        let dir = std::path::Path::new("/sys/fs/cgroup/cpu").join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {} (cgroup v1, as root)", dir.display()))?;
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
        std::fs::write(
            dir.join("cpu.cfs_quota_us"),
            format!("{}", (cpus * 100_000.0).round() as u64),
        )?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(CpuCap { dir, pid })
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}
