#!/usr/bin/env bash
# Runs the JavaScript conformance suite (tests/js/) against the realtime-gateway binary.
#
#   scripts/test-js.sh                       build the gateway (debug) and run every *.test.mjs
#   scripts/test-js.sh broadcast rest        run only tests/js/broadcast.test.mjs and rest.test.mjs
#   GATEWAY_BIN=/path/to/realtime-gateway scripts/test-js.sh    use that binary, build nothing
#   GATEWAY_LOG=1 scripts/test-js.sh         show the gateway's own output
#
# Needs node >= 20 and npm, and python3 with venv. npm packages are installed from
# tests/js/package-lock.json with `npm ci` whenever node_modules is missing or older than the
# lockfile; the Python SDK from tests/py/requirements.txt into tests/py/.venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
js="$repo/tests/js"

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "test-js: node >= 20 is required (found $(node --version))" >&2
  exit 1
fi

marker="$js/node_modules/.package-lock.json"
if [ ! -f "$marker" ] || [ "$js/package-lock.json" -nt "$marker" ] || [ "$js/package.json" -nt "$marker" ]; then
  echo "test-js: installing npm packages (npm ci)" >&2
  (cd "$js" && npm ci --no-audit --no-fund)
fi

# The Python SDK (realtime-py) for the drills that run it: a venv of its own, made once.
venv="$repo/tests/py/.venv"
requirements="$repo/tests/py/requirements.txt"
if [ ! -x "$venv/bin/python" ] || [ "$requirements" -nt "$venv/.installed" ]; then
  echo "test-js: installing the Python SDK (tests/py/requirements.txt)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  touch "$venv/.installed"
fi
export PYTHON_SDK="$venv/bin/python"

if [ -z "${GATEWAY_BIN:-}" ]; then
  echo "test-js: building realtime-gateway" >&2
  (cd "$repo" && cargo build -p realtime-gateway)
  export GATEWAY_BIN="$repo/target/debug/realtime-gateway"
fi
if [ ! -x "$GATEWAY_BIN" ]; then
  echo "test-js: gateway binary not found or not executable: $GATEWAY_BIN" >&2
  exit 1
fi

files=()
if [ "$#" -gt 0 ]; then
  for name in "$@"; do files+=("${name%.test.mjs}.test.mjs"); done
else
  for file in "$js"/*.test.mjs; do files+=("$(basename "$file")"); done
fi

# --test-force-exit: realtime-js's disconnect() leaves a 10 s timer behind; without this flag every
# file would idle that long after its last test. --test-timeout bounds any single test.
cd "$js"
exec node --test --test-concurrency=1 --test-force-exit --test-timeout=60000 "${files[@]}"
