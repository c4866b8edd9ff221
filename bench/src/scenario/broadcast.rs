//! The broadcast engine behind `fanout`, `payload`, `broadcast` (Supabase's shape) and
//! `large-fanout`: a plan says which channels each client joins and at what rate it publishes on
//! which; every client is one socket driven by one task that reads deliveries, publishes on
//! schedule (binary kind-3 pushes) and heartbeats.
//!
//! Deliveries are counted per receiver; a delivery's latency is its receive time minus the send
//! stamp in its payload (same process, same clock). `deliveries_per_s` counts what arrived within
//! the publishing window; late arrivals (within the drain time after it) still count in
//! `delivered` and in the latency percentiles, so a server that falls behind shows both a rate
//! below `expected` and a high p99.

use crate::client::{self, Client, HEARTBEAT_INTERVAL, Received, now_us};
use crate::scenario::{Latency, connect_all_on};
use crate::servers::Target;
use crate::sys::{CpuReport, CpuSampler};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};

/// What one client does.
#[derive(Clone, Debug, Default)]
pub struct ClientPlan {
    /// Channel names (without `realtime:`), joined in order.
    pub joins: Vec<String>,
    /// (index into `joins`, messages per second).
    pub publish: Vec<(usize, f64)>,
}

/// A whole broadcast run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub clients: Vec<ClientPlan>,
    /// Deliver a sender's own broadcasts back to it (`config.broadcast.self`).
    pub self_broadcast: bool,
    pub payload_bytes: usize,
    pub seconds: f64,
    /// How long to keep reading after publishing stops.
    pub drain: Duration,
    /// Join private channels (`config.private`: RLS on `realtime.messages`, gateway only).
    pub private: bool,
    /// Each client's join token (`access_token`), by index; empty: the target's key.
    pub tokens: Vec<String>,
    /// The node each client connects to, by index (into the targets of [`run_on`]); empty:
    /// the first.
    pub nodes: Vec<usize>,
}

impl Plan {
    /// Deliveries the plan should produce.
    pub fn expected(&self) -> f64 {
        let mut members: HashMap<&str, f64> = HashMap::new();
        for c in &self.clients {
            for j in &c.joins {
                *members.entry(j).or_default() += 1.0;
            }
        }
        let own = if self.self_broadcast { 0.0 } else { 1.0 };
        self.clients
            .iter()
            .flat_map(|c| c.publish.iter().map(|(j, rate)| (&c.joins[*j], rate)))
            .map(|(topic, rate)| rate * self.seconds * (members[topic.as_str()] - own))
            .sum()
    }

    /// One topic, `subscribers` receivers and one publisher at `rate` messages/s.
    pub fn fanout(subscribers: usize, rate: f64, payload_bytes: usize, seconds: f64) -> Plan {
        let mut clients = vec![ClientPlan {
            joins: vec!["fanout".into()],
            publish: vec![(0, rate)],
        }];
        clients.extend((0..subscribers).map(|_| ClientPlan {
            joins: vec!["fanout".into()],
            publish: vec![],
        }));
        Plan {
            clients,
            self_broadcast: false,
            payload_bytes,
            seconds,
            drain: Duration::from_secs(1),
            private: false,
            tokens: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// Supabase's broadcast shape: every client in its own 1-member echo channel and in a
    /// 6-member group channel, one message per second per channel, `self` on.
    pub fn echo_and_groups(clients: usize, payload_bytes: usize, seconds: f64) -> Plan {
        let clients = (0..clients)
            .map(|i| ClientPlan {
                joins: vec![format!("echo-{i}"), format!("group-{}", i / 6)],
                publish: vec![(0, 1.0), (1, 1.0)],
            })
            .collect();
        Plan {
            clients,
            self_broadcast: true,
            payload_bytes,
            seconds,
            drain: Duration::from_secs(1),
            private: false,
            tokens: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// Large fan-out: channels of `members` members, each client in 2 channels, one publisher
    /// per channel at `rate` messages/s, `self` on.
    pub fn large_fanout(
        clients: usize,
        members: usize,
        rate: f64,
        payload_bytes: usize,
        seconds: f64,
    ) -> Plan {
        let half = (members / 2).max(1);
        let channels = (clients / half).max(1);
        let mut plans: Vec<ClientPlan> = (0..clients)
            .map(|i| {
                let a = i % channels;
                let mut b = (i / half) % channels;
                if a == b && channels > 1 {
                    b = (b + 1) % channels;
                }
                let mut joins = vec![format!("large-{a}")];
                if b != a {
                    joins.push(format!("large-{b}"));
                }
                ClientPlan {
                    joins,
                    publish: vec![],
                }
            })
            .collect();
        // Client c (< channels) is in channel c through its first join: it publishes there.
        for plan in plans.iter_mut().take(channels) {
            plan.publish.push((0, rate));
        }
        Plan {
            clients: plans,
            self_broadcast: true,
            payload_bytes,
            seconds,
            drain: Duration::from_secs(1),
            private: false,
            tokens: Vec::new(),
            nodes: Vec::new(),
        }
    }

    pub fn channel_count(&self) -> usize {
        let mut names: Vec<&str> = self
            .clients
            .iter()
            .flat_map(|c| c.joins.iter().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

/// The outcome of one plan against one server.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub server: String,
    pub clients: usize,
    pub channels: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub connect_join_s: f64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub delivered_in_window: u64,
    pub deliveries_per_s: f64,
    /// At least 97% of the expected deliveries arrived and p99 stayed under a second.
    pub keeping_up: bool,
    pub latency: Latency,
    /// Server CPU time per delivery, nanoseconds: the figure least disturbed by a noisy machine.
    pub server_cpu_ns_per_delivery: f64,
    pub cpu: CpuReport,
    pub errors: u64,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    delivered: u64,
    in_window: u64,
    latencies_us: Vec<u32>,
    errors: u64,
}

/// Runs `plan` against `target`.
pub async fn run(target: &Target, plan: &Plan) -> anyhow::Result<Outcome> {
    Ok(run_on(&[target], &[], plan).await?.0)
}

/// Runs `plan` against several nodes (client `i` on `targets[plan.nodes[i]]`); the outcome's
/// server CPU is the first node's; the CPU seconds of every node, then of `others` (pids:
/// nats-server), come beside it.
pub async fn run_on(
    targets: &[&Target],
    others: &[u32],
    plan: &Plan,
) -> anyhow::Result<(Outcome, Vec<f64>)> {
    let target = targets[0];
    let self_b = plan.self_broadcast;
    let endpoints: Vec<_> = targets.iter().map(|t| &t.endpoint).collect();
    let node_of = |i: usize| plan.nodes.get(i).copied().unwrap_or(0) % targets.len();
    let (clients, connect_join_s) =
        connect_all_on(&endpoints, node_of, plan.clients.len(), |i, mut c| {
            let token = plan
                .tokens
                .get(i)
                .unwrap_or(&targets[node_of(i)].endpoint.token)
                .clone();
            let joins = plan.clients[i].joins.clone();
            async move {
                for j in &joins {
                    let payload =
                        client::join_payload_with(self_b, None, &token, plan.private, "[]");
                    c.join_with(j, &payload).await?;
                }
                Ok(c)
            }
        })
        .await?;
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(plan.seconds);
    let stop = end + plan.drain;
    // The first node's sampler is the outcome's server CPU.
    let samplers: Vec<CpuSampler> = targets
        .iter()
        .map(|t| t.pid)
        .chain(others.iter().map(|p| Some(*p)))
        .map(CpuSampler::start)
        .collect();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(&plan.clients)
        .enumerate()
        .map(|(i, (client, cp))| {
            let publish = cp
                .publish
                .iter()
                .map(|(j, rate)| {
                    let (topic, join_ref) = client.topics[*j].clone();
                    (topic, join_ref, Duration::from_secs_f64(1.0 / rate))
                })
                .collect();
            // Spread periodic publishers over their period (golden-ratio phases).
            let phase = (i as f64 * 0.618_033_988_75).fract();
            tokio::spawn(drive(
                client,
                publish,
                plan.payload_bytes,
                phase,
                (start, end, stop),
            ))
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        let t = t.await?;
        tally.sent += t.sent;
        tally.delivered += t.delivered;
        tally.in_window += t.in_window;
        tally.errors += t.errors;
        tally.latencies_us.extend(t.latencies_us);
    }
    let cpu = samplers[0].finish();
    let cpu_each: Vec<f64> = samplers.iter().map(CpuSampler::server_cpu_s).collect();
    let expected = plan.expected();
    let latency = Latency::from_us(&mut tally.latencies_us);
    let outcome = Outcome {
        server: target.name.clone(),
        clients: plan.clients.len(),
        channels: plan.channel_count(),
        payload_bytes: plan.payload_bytes,
        seconds: plan.seconds,
        connect_join_s: round3(connect_join_s),
        sent: tally.sent,
        expected: expected as u64,
        delivered: tally.delivered,
        delivered_in_window: tally.in_window,
        deliveries_per_s: (tally.in_window as f64 / plan.seconds).round(),
        keeping_up: tally.delivered as f64 >= 0.97 * expected && latency.p99_ms < 1000.0,
        latency,
        server_cpu_ns_per_delivery: (cpu.server_cpu_s * 1e9 / tally.delivered.max(1) as f64)
            .round(),
        cpu,
        errors: tally.errors,
    };
    Ok((outcome, cpu_each))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One client's life during the run.
async fn drive(
    mut c: Client,
    publish: Vec<(String, u64, Duration)>,
    payload_bytes: usize,
    phase: f64,
    (start, end, stop): (Instant, Instant, Instant),
) -> Tally {
    let mut tally = Tally::default();
    let mut next: Vec<Instant> = publish
        .iter()
        .map(|(_, _, every)| start + every.mul_f64(phase))
        .collect();
    let mut heartbeat = Instant::now() + HEARTBEAT_INTERVAL;
    loop {
        let due = next.iter().copied().filter(|t| *t < end).min();
        let wake = due.unwrap_or(stop).min(stop).min(heartbeat);
        tokio::select! {
            msg = c.ws.next() => match msg {
                Some(Ok(msg)) => {
                    if let Received::Broadcast(stamp) = client::classify(&msg) {
                        tally.delivered += 1;
                        if Instant::now() < end {
                            tally.in_window += 1;
                        }
                        if let Some(t) = stamp {
                            let us = now_us().saturating_sub(t);
                            tally.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                    }
                }
                _ => {
                    tally.errors += 1;
                    break;
                }
            },
            () = sleep_until(wake) => {}
        }
        let now = Instant::now();
        if now >= stop {
            break;
        }
        let mut fed = 0;
        if now >= heartbeat {
            let hb = c.heartbeat();
            fed += usize::from(c.ws.feed(hb).await.is_ok());
            heartbeat += HEARTBEAT_INTERVAL;
        }
        for (i, (topic, join_ref, every)) in publish.iter().enumerate() {
            // Catch up on what is due, a bounded batch at a time.
            let mut batch = 0;
            while next[i] <= now && next[i] < end && batch < 256 {
                let r = c.next_ref();
                let frame = client::broadcast_push(
                    c.vsn,
                    *join_ref,
                    r,
                    topic,
                    "bench",
                    client::stamped_payload(payload_bytes),
                );
                if c.ws.feed(frame).await.is_err() {
                    tally.errors += 1;
                }
                tally.sent += 1;
                next[i] += *every;
                batch += 1;
            }
            fed += batch;
        }
        if fed > 0 && c.ws.flush().await.is_err() {
            tally.errors += 1;
        }
    }
    let _ = c.ws.close(None).await;
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_deliveries_follow_the_plan_shapes() {
        // One publisher at 10/s for 2 s to 100 others.
        assert_eq!(Plan::fanout(100, 10.0, 100, 2.0).expected(), 2000.0);
        // 12 clients: 12 echo channels (1 member) and 2 groups of 6, self on, 1/s each.
        let p = Plan::echo_and_groups(12, 100, 1.0);
        assert_eq!(p.channel_count(), 14);
        assert_eq!(p.expected(), 12.0 + 12.0 * 6.0);
        // Every large channel has `members` members and each client is in 2.
        let p = Plan::large_fanout(1000, 100, 1.0, 100, 1.0);
        assert_eq!(p.channel_count(), 20);
        assert!(p.clients.iter().all(|c| c.joins.len() == 2));
        assert_eq!(p.expected(), 20.0 * 100.0);
    }
}
