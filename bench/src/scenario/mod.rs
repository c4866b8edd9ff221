//! The scenarios. Each runs against one [`Target`] at a time and returns a serializable result;
//! the command line runs it against every target in turn and prints ratios.

pub mod broadcast;
pub mod cluster;
pub mod database;
pub mod idle;
pub mod presence;

use crate::client::{Client, Endpoint};
use crate::servers::Target;
use futures_util::StreamExt;
use serde::Serialize;
use std::future::Future;
use std::time::Instant;

/// Connections opened at once while a scenario connects its clients.
pub const CONNECT_CONCURRENCY: usize = 128;

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From samples in microseconds (sorted in place).
    pub fn from_us(samples: &mut [u32]) -> Latency {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            f64::from(samples[i]) / 1000.0
        };
        Latency {
            samples: samples.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// Connects `count` clients and runs `setup` on each (joins), `CONNECT_CONCURRENCY` at a time.
/// Returns the clients in index order and the seconds it took.
pub async fn connect_all<F, Fut>(
    endpoint: &Endpoint,
    count: usize,
    setup: F,
) -> anyhow::Result<(Vec<Client>, f64)>
where
    F: Fn(usize, Client) -> Fut,
    Fut: Future<Output = anyhow::Result<Client>>,
{
    connect_all_on(&[endpoint], |_| 0, count, setup).await
}

/// [`connect_all`] over several servers: client `i` connects to `endpoints[node_of(i)]`.
pub async fn connect_all_on<F, Fut>(
    endpoints: &[&Endpoint],
    node_of: impl Fn(usize) -> usize,
    count: usize,
    setup: F,
) -> anyhow::Result<(Vec<Client>, f64)>
where
    F: Fn(usize, Client) -> Fut,
    Fut: Future<Output = anyhow::Result<Client>>,
{
    let started = Instant::now();
    let setup = &setup;
    let node_of = &node_of;
    let mut results: Vec<(usize, Client)> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let client = Client::connect(endpoints[node_of(i)]).await?;
            Ok::<_, anyhow::Error>((i, setup(i, client).await?))
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    results.sort_by_key(|(i, _)| *i);
    Ok((
        results.into_iter().map(|(_, c)| c).collect(),
        started.elapsed().as_secs_f64(),
    ))
}

/// `gateway / limit-server` for a figure, when both are there and the divisor is not zero.
pub fn ratio(gateway: f64, limit: f64) -> Option<f64> {
    (limit > 0.0).then(|| (gateway / limit * 1000.0).round() / 1000.0)
}

/// Name of a target for output.
pub fn name(target: &Target) -> &str {
    &target.name
}
