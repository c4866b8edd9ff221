#!/usr/bin/env bash
# Runs the whole stack for local development with one command:
#   - with DATABASE_URL set: the gateway on that database;
#   - without it: a throwaway PostgreSQL (wal_level=logical) from the Postgres binaries on this
#     machine, with supabase/ applied (roles, auth helpers, the app tables, seed data), removed
#     again when the gateway stops;
#   - without Postgres binaries: the gateway alone (Broadcast and Presence), after saying how to
#     install them.
# The gateway listens on HOST:PORT (default 0.0.0.0:4000). Without API_JWT_SECRET it generates one
# and prints an anon key and a service_role key to use with createClient(url, key).
# Extra arguments are passed to the gateway (see `realtime-gateway --help`).
#
# CLUSTER_NODES=N (N >= 2) starts N gateway nodes instead, on PORT, PORT+1, … (4000, 4001, …), and
# a nats-server on 127.0.0.1:${NATS_PORT:-4222} that they share Broadcast and Presence through
# (Debian: apt-get install nats-server). They sign tokens with one secret (generated and printed
# when API_JWT_SECRET is unset). Each node reads the WAL from a slot of its own
# (`realtime_gateway_<n>`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# GATEWAY_BIN runs that binary instead of building the release one (the tests do).
if [ -n "${GATEWAY_BIN:-}" ]; then
  gateway="$GATEWAY_BIN"
else
  cargo build --release -p realtime-gateway
  gateway="$repo/target/release/realtime-gateway"
fi
nodes="${CLUSTER_NODES:-1}"
nats_pid=""

# Runs the gateway, or the cluster's nodes and nats-server, until a signal or the first exit.
serve() {
  if [ "$nodes" -le 1 ]; then
    "$gateway" "$@" &
    pids=($!)
  else
    nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
    if [ ! -x "$nats_bin" ]; then
      echo "run: CLUSTER_NODES=$nodes needs nats-server (Debian/Ubuntu: apt-get install nats-server)" >&2
      exit 1
    fi
    nats_port="${NATS_PORT:-4222}"
    grep -v '^http_port' "$repo/docker/nats.conf" >"${TMPDIR:-/tmp}/realtime-dev-nats.conf"
    "$nats_bin" -a 127.0.0.1 -p "$nats_port" -c "${TMPDIR:-/tmp}/realtime-dev-nats.conf" >/dev/null 2>&1 &
    nats_pid=$!
    # Refuse to go on with another server's port (a nats-server left running, say).
    for _ in $(seq 1 100); do
      if ! kill -0 "$nats_pid" 2>/dev/null; then
        echo "run: nats-server could not start on 127.0.0.1:$nats_port (in use? set NATS_PORT)" >&2
        exit 1
      fi
      (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
      sleep 0.1
    done
    pids=()
    if [ -z "${API_JWT_SECRET:-}" ]; then
      API_JWT_SECRET="$(head -c 30 /dev/urandom | base64 | tr '+/' '-_')"
      export API_JWT_SECRET
      echo "run: no API_JWT_SECRET set: generated a secret for this run only"
      python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def key(role):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"iss": "supabase", "role": role, "exp": int(time.time()) + 10 * 365 * 86400}).encode())
    sig = hmac.new(os.environ["API_JWT_SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"
print("anon key:         " + key("anon"))
print("service_role key: " + key("service_role"))
PY
    fi
    base="${PORT:-4000}"
    for n in $(seq 1 "$nodes"); do
      PORT=$((base + n - 1)) NODE_NAME="node-$n" CLUSTER_NATS_URL="nats://127.0.0.1:$nats_port" \
        SLOT_NAME="${SLOT_NAME:-realtime_gateway}_$n" "$gateway" "$@" &
      pids+=($!)
      echo "run: node-$n on port $((base + n - 1))"
    done
  fi
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
  # A signal interrupts `wait`; keep waiting until every process has exited, so Postgres is
  # stopped only after the gateways released their replication connections.
  wait -n "${pids[@]}" 2>/dev/null || true
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  done
  # nats-server last: the nodes' leaving heartbeats go out through it.
  if [ -n "${nats_pid:-}" ]; then
    kill -TERM "$nats_pid" 2>/dev/null || true
    wait "$nats_pid" 2>/dev/null || true
  fi
}

if [ -n "${DATABASE_URL:-}" ]; then
  if [ "$nodes" -le 1 ]; then
    exec "$gateway" "$@"
  fi
  serve "$@"
  exit 0
fi

pgbin=""
if command -v initdb >/dev/null 2>&1; then
  pgbin="$(dirname "$(command -v initdb)")"
else
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && pgbin="$d"
  done
fi
if [ -z "$pgbin" ]; then
  cat >&2 <<MSG
run: no PostgreSQL binaries (initdb) found, so Postgres Changes are off; serving Broadcast and
     Presence only. For the whole stack install them (Debian/Ubuntu: apt-get install postgresql)
     or set DATABASE_URL to a database with wal_level=logical.
MSG
  serve "$@"
  exit 0
fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/realtime-dev-pg.XXXXXX")"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses to run as root: run the server as the unprivileged postgres user.
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cleanup() {
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

"${as_pg[@]}" "$pgbin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -o \
  "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10" \
  start >/dev/null

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
for f in supabase/migrations/*.sql supabase/seed.sql; do
  psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -f "$f" >/dev/null 2>"$dir/psql.log" \
    || { cat "$dir/psql.log" >&2; exit 1; }
done
echo "run: throwaway PostgreSQL at $DATABASE_URL (supabase/ applied; removed when the gateway stops)"

serve "$@"
