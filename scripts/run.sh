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
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

cargo build --release -p realtime-gateway
gateway="$repo/target/release/realtime-gateway"

if [ -n "${DATABASE_URL:-}" ]; then
  exec "$gateway" "$@"
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
  exec "$gateway" "$@"
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

"$gateway" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' INT TERM
# A signal interrupts `wait`; keep waiting until the gateway has really exited, so Postgres is
# stopped only after the gateway released its replication connection.
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
done
