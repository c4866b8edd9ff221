#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, property, in-process gateway, real PostgreSQL) and
# the supabase-js conformance suite against the gateway binary. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo test --workspace --locked
scripts/test-js.sh
