#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ on the stable toolchain, each for a while, and fails on a crash.
#
#   scripts/fuzz.sh                  every target for 10 s
#   scripts/fuzz.sh 120 filter       one target for 120 s
#
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the stable compiler accept them, and
# `--sanitizer none` avoids the sanitizer runtimes a stable toolchain does not ship. Installs
# cargo-fuzz from crates.io when it is missing. Each run prints libFuzzer's last status line
# (`#N ... exec/s`), the number of executions.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-10}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(v1_text v2_text binary_push join_payload pgoutput filter policy wal_wire)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer none
for target in "${targets[@]}"; do
  corpus="$(mktemp -d)"
  log="$(mktemp)"
  if ! cargo fuzz run --sanitizer none "$target" "$corpus" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target crashed" >&2
    exit 1
  fi
  runs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
  echo "fuzz: $target: ${runs:-?} executions in ${seconds} s, no crash"
  rm -rf "$corpus" "$log"
done
