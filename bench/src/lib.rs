//! Load generator, limit server and benchmark scenarios for the realtime gateway.
//!
//! Modules, and what each owns:
//! - [`chart`]: the report's PNG (deliveries/s and p99 per step, gateway and reference).
//! - [`client`]: a V2 client that speaks like supabase-js (joins, heartbeats, kind-3 pushes,
//!   kind-4 and text deliveries) and the send stamp carried in every broadcast payload.
//! - [`limit`]: the limit server, the smallest fan-out relay on the same stack.
//! - [`servers`]: the servers under test, started as child processes or attached to.
//! - [`scenario`]: the scenarios (`broadcast` engine, `idle`, `presence`).
//! - [`pg`]: the throwaway Postgres cluster of scenarios 4–6 (the test harness, by path).
//! - [`sys`]: the open-file limit and CPU / RSS sampling from `/proc`.
//!
//! The binaries are `realtime-bench` (the scenarios as subcommands) and `limit-server`.

pub mod chart;
pub mod client;
pub mod limit;
pub mod pg;
pub mod scenario;
pub mod servers;
pub mod sys;
