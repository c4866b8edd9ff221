//! The edge: the listener, WebSocket upgrades with connect-time auth (`accept`), and the REST
//! routes (`rest`): broadcast, health, metrics.

pub(crate) mod accept;
mod query;
mod rest;
