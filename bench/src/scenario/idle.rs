//! Idle footprint: open `sockets` sockets, each joined to one channel, hold them (reading and
//! heartbeating like realtime-js) and read the server's RSS; the connect + join rate on the way.

use crate::client::HEARTBEAT_INTERVAL;
use crate::scenario::connect_all;
use crate::servers::Target;
use crate::sys::{CpuReport, CpuSampler, rss_kib};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub server: String,
    pub sockets: usize,
    pub channels: usize,
    pub connect_join_s: f64,
    pub connect_joins_per_s: f64,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    /// (held − before) / sockets.
    pub rss_per_socket_bytes: u64,
    pub bench_rss_kib: u64,
    /// Sockets that closed during the hold.
    pub lost: usize,
    /// Server CPU time per socket (connect, join, hold), microseconds.
    pub server_cpu_us_per_socket: f64,
    pub cpu: CpuReport,
}

/// Connects and joins `sockets` sockets (channel `idle-<i % channels>`), holds them `hold`,
/// measures, closes them.
pub async fn run(
    target: &Target,
    sockets: usize,
    channels: usize,
    hold: Duration,
) -> anyhow::Result<Outcome> {
    let rss = || target.pid.and_then(rss_kib).map_or(0, |(rss, _)| rss);
    let rss_before = rss();
    let cpu = CpuSampler::start(target.pid);
    let token = target.endpoint.token.clone();
    let channels = channels.max(1);
    let (clients, secs) = connect_all(&target.endpoint, sockets, |i, mut c| {
        let token = token.clone();
        async move {
            c.join(&format!("idle-{}", i % channels), false, None, &token)
                .await?;
            Ok(c)
        }
    })
    .await?;
    let until = Instant::now() + hold;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut heartbeat = Instant::now() + HEARTBEAT_INTERVAL;
                loop {
                    tokio::select! {
                        msg = c.ws.next() => if !matches!(msg, Some(Ok(_))) { return false },
                        () = sleep_until(heartbeat.min(until)) => {
                            if Instant::now() >= until { break; }
                            let hb = c.heartbeat();
                            if c.ws.send(hb).await.is_err() { return false; }
                            heartbeat += HEARTBEAT_INTERVAL;
                        }
                    }
                }
                true
            })
        })
        .collect();
    // RSS is read just before the hold ends, with every socket open.
    sleep_until(until - Duration::from_millis(200).min(hold)).await;
    let rss_held = rss();
    let bench_rss_kib = rss_kib(std::process::id()).map_or(0, |(r, _)| r);
    let mut lost = 0;
    for t in tasks {
        if !t.await.unwrap_or(false) {
            lost += 1;
        }
    }
    let cpu = cpu.finish();
    Ok(Outcome {
        server: target.name.clone(),
        sockets,
        channels,
        connect_join_s: (secs * 1000.0).round() / 1000.0,
        connect_joins_per_s: (sockets as f64 / secs.max(1e-6)).round(),
        rss_before_kib: rss_before,
        rss_held_kib: rss_held,
        rss_per_socket_bytes: rss_held.saturating_sub(rss_before) * 1024 / sockets.max(1) as u64,
        bench_rss_kib,
        lost,
        server_cpu_us_per_socket: (cpu.server_cpu_s * 1e6 / sockets.max(1) as f64).round(),
        cpu,
    })
}
