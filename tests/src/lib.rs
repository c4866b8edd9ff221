//! End-to-end test harness: gateway on port 0, WebSocket clients, token minting.

pub mod gateway;
pub mod postgres;
