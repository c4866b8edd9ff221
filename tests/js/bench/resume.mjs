// Measurement, not a test: what resuming costs (issue 13).
//
// A throwaway cluster and the gateway; L live raw V2 sockets and R resuming ones, each its own
// channel with an INSERT binding on one table. The R sockets close; GAP rows are committed (in
// transactions of 1,000); the WAL the parked channels hold is read from /metrics; then the R
// clients connect again and rejoin with the same token, topic and bindings. Meanwhile a probe row
// is committed every 20 ms and the live sockets measure its latency (receipt − commit_timestamp).
// Prints: WAL held by the parked channels, the time until every resumer has its whole gap (and the
// rate), and the live latency before and while the gap is replayed.
//
// Run: cd tests/js && GATEWAY_BIN=../../target/release/realtime-gateway node bench/resume.mjs [live] [resumers] [gap rows]

import { randomUUID } from 'node:crypto'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { startGateway } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'

const L = Number(process.argv[2] ?? 10)
const R = Number(process.argv[3] ?? 10)
const GAP = Number(process.argv[4] ?? 50_000)

const db = await startPostgres()
await db.sql(`
  create table public.gapfeed (id bigserial primary key, kind text not null, n int not null, pad text);
  grant select on public.gapfeed to anon;
  alter publication supabase_realtime add table public.gapfeed;
`)
const gw = await startGateway({
  env: {
    DATABASE_URL: db.url,
    SLOT_NAME: 'bench_resume',
    RESUME_WINDOW_MS: '600000',
    RESUME_STATE_PATH: join(tmpdir(), `bench-resume-${randomUUID()}.state`),
  },
})
const token = gw.sign({ role: 'anon' })

/** Joins `realtime:<name>` on a new socket; calls `onChange(text)` per postgres_changes frame. */
async function join_(name, onChange) {
  const ws = new WebSocket(`${gw.wsUrl}/realtime/v1/websocket?apikey=${token}&vsn=2.0.0`)
  await new Promise((resolve, reject) => {
    ws.once('open', resolve)
    ws.once('error', reject)
  })
  const subscribed = new Promise((resolve) => {
    ws.on('message', (data) => {
      const text = data.toString()
      if (text.includes('"postgres_changes",{"ids"')) onChange(text)
      else if (text.includes('Subscribed to PostgreSQL')) resolve()
    })
  })
  ws.send(
    JSON.stringify(['1', '1', `realtime:${name}`, 'phx_join', {
      config: { postgres_changes: [{ event: 'INSERT', schema: 'public', table: 'gapfeed' }] },
      access_token: token,
    }]),
  )
  await subscribed
  return ws
}

const latencies = [] // [at, ms]
const probe = (text) => {
  if (!text.includes('"kind":"probe"')) return
  const ts = /"commit_timestamp":"([^"]+)"/.exec(text)?.[1]
  if (ts) latencies.push([Date.now(), Date.now() - Date.parse(ts)])
}
for (let i = 0; i < L; i++) await join_(`live-${i}`, probe)
const resumers = []
for (let i = 0; i < R; i++) resumers.push(await join_(`resume-${i}`, () => {}))
for (const ws of resumers) ws.close()
await new Promise((r) => setTimeout(r, 500))

let probing = true
const prober = (async () => {
  while (probing) {
    await db.sql(`insert into public.gapfeed (kind, n) values ('probe', 0)`)
    await new Promise((r) => setTimeout(r, 20))
  }
})()

for (let done = 0; done < GAP; done += 1000) {
  await db.sql(
    `insert into public.gapfeed (kind, n, pad) select 'gap', g, repeat('x', 100) from generate_series($1::int, $2::int) g`,
    [done + 1, Math.min(done + 1000, GAP)],
  )
}
await new Promise((r) => setTimeout(r, 1000))
const held = await gw.metric('realtime_resume_held_bytes')
const parked = await gw.metric('realtime_resume_parked')

const rejoinAt = Date.now()
const gotGap = new Array(R).fill(0)
let lastGapAt = 0
await Promise.all(
  Array.from({ length: R }, (_, i) =>
    join_(`resume-${i}`, (text) => {
      if (text.includes('"kind":"gap"')) {
        gotGap[i]++
        lastGapAt = Date.now()
      }
    }),
  ),
)
const deadline = Date.now() + 120_000
while (gotGap.some((n) => n < GAP) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
const replayMs = lastGapAt - rejoinAt
await new Promise((r) => setTimeout(r, 1000))
probing = false
await prober

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN
}
const before = latencies.filter(([at]) => at < rejoinAt).map(([, ms]) => ms)
const during = latencies.filter(([at]) => at >= rejoinAt && at <= lastGapAt + 200).map(([, ms]) => ms)
console.log(
  JSON.stringify(
    {
      live: L,
      resumers: R,
      gap_rows: GAP,
      parked,
      held_bytes: held,
      held_bytes_per_gap_row: Math.round(held / GAP),
      every_resumer_complete: gotGap.every((n) => n === GAP),
      gap_rows_per_resumer: [Math.min(...gotGap), Math.max(...gotGap)],
      replay_ms: replayMs,
      replayed_rows_per_s: Math.round((GAP * R) / (replayMs / 1000)),
      restreams: await gw.metric('realtime_wal_restreams_total'),
      live_latency_ms_before: { p50: pct(before, 50), p99: pct(before, 99), max: Math.max(...before) },
      live_latency_ms_during_replay: { p50: pct(during, 50), p99: pct(during, 99), max: Math.max(...during), n: during.length },
    },
    null,
    2,
  ),
)
for (const ws of resumers) ws.terminate()
await gw.stop()
await db.stop()
process.exit(0)
