#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, property, in-process gateway, real PostgreSQL), every
# fuzz target briefly (stable toolchain, scripts/fuzz.sh) and the supabase-js conformance suite
# against the gateway binary. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# The gateway's binary first: the bench's cluster smoke test starts it as separate nodes.
cargo build -p realtime-gateway --locked
cargo test --workspace --locked
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
scripts/test-js.sh
