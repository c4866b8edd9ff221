// Measurement, not a test: one large transaction fanned out to many subscribers (issue 12).
//
// A throwaway cluster and the gateway; N raw V2 sockets (default 100), each its own channel with
// one INSERT binding on an RLS table (policy `auth.uid() is not null`, decided in process; every
// subscriber its own user), then one INSERT … SELECT of R rows (default 100,000) in a single
// transaction. Prints the time from the commit to the last row at the last subscriber, the rows
// each got, sockets closed, and the gateway's peak RSS (VmHWM) before and after. The clients count
// frames without parsing them, so the load generator stays light.
//
// Run: cd tests/js && GATEWAY_BIN=../../target/release/realtime-gateway node bench/bulk.mjs [subscribers] [rows]

import { readFileSync } from 'node:fs'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { startGateway } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'

const N = Number(process.argv[2] ?? 100)
const ROWS = Number(process.argv[3] ?? 100_000)

const kib = (pid, field) => {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith(field))
  return Number(line.split(/\s+/)[1])
}

const db = await startPostgres()
await db.sql(`
  create table public.bulk (id int primary key, body text not null);
  alter table public.bulk enable row level security;
  create policy "signed-in users read" on public.bulk for select to authenticated using (auth.uid() is not null);
  grant select on public.bulk to authenticated;
  alter publication supabase_realtime add table public.bulk;
`)
const gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'bench_bulk' } })
const counts = new Array(N).fill(0)
let closed = 0
let lastAt = 0
const sockets = []
for (let i = 0; i < N; i++) {
  const token = gw.sign({ role: 'authenticated', sub: randomUUID() })
  const ws = new WebSocket(`${gw.wsUrl}/realtime/v1/websocket?apikey=${token}&vsn=2.0.0`)
  await new Promise((resolve, reject) => {
    ws.once('open', resolve)
    ws.once('error', reject)
  })
  const topic = `realtime:bulk-${i}`
  const joined = new Promise((resolve) => {
    ws.on('message', (data) => {
      const text = data.toString()
      if (text.includes('"postgres_changes",{"ids"')) {
        counts[i]++
        lastAt = Date.now()
      } else if (text.includes('Subscribed to PostgreSQL')) {
        resolve()
      }
    })
  })
  ws.on('close', () => closed++)
  ws.send(JSON.stringify(['1', '1', topic, 'phx_join', {
    config: { postgres_changes: [{ event: 'INSERT', schema: 'public', table: 'bulk' }] },
    access_token: token,
  }]))
  await joined
  sockets.push(ws)
}
const heartbeat = setInterval(() => {
  for (const ws of sockets) ws.send(JSON.stringify([null, 'hb', 'phoenix', 'heartbeat', {}]))
}, 20_000)
const before = kib(gw.pid, 'VmHWM')
const started = Date.now()
await db.sql(`insert into public.bulk select g, 'row ' || g || ' ' || repeat('x', 60) from generate_series(1, ${ROWS}) g`)
const committed = Date.now()
const deadline = Date.now() + 600_000
while (counts.some((c) => c < ROWS) && closed === 0 && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 200))
}
const after = kib(gw.pid, 'VmHWM')
const complete = counts.filter((c) => c === ROWS).length
console.log(JSON.stringify({
  subscribers: N,
  rows: ROWS,
  deliveries: counts.reduce((a, b) => a + b, 0),
  subscribers_complete: complete,
  sockets_closed: closed,
  insert_ms: committed - started,
  commit_to_last_row_ms: lastAt - committed,
  deliveries_per_s: Math.round(counts.reduce((a, b) => a + b, 0) / ((lastAt - committed) / 1000)),
  gateway_peak_rss_mib_before: Math.round(before / 1024),
  gateway_peak_rss_mib_after: Math.round(after / 1024),
}))
clearInterval(heartbeat)
for (const ws of sockets) ws.terminate()
await gw.stop()
await db.stop()
