// Measurement, not a test: Postgres Changes fan-out to N (default 500) subscribers, RLS off and RLS on.
//
// A throwaway cluster (lib/postgres.mjs) and the gateway; N raw V2 sockets (one per subscriber, each its
// own channel with one INSERT binding, as N browser tabs would be) join and wait for "Subscribed to
// PostgreSQL". Scenarios:
//   - rls off:            table without RLS, subscribers with the anon key;
//   - rls on, N users:    RLS table (policy: any signed-in user sees every row), N authenticated tokens
//                         with distinct `sub` (N distinct claims sets → N visibility queries per batch);
//   - rls on, 1 claims:   same table, all subscribers with the same token (one query per batch).
// For each: (1) latency at a steady 30 changes/s for 5 s: commit→client, commit_timestamp (ms) against
// the receive time on this machine, p50/p95/max over every delivery; (2) throughput: a burst of single-row
// transactions from 8 connections, changes/s = rows / (first insert → last delivery at every subscriber).
// Clients, gateway and Postgres share this machine; prints, asserts nothing.
//
// Run: cd tests/js && node bench/pg-changes.mjs [subscribers] [burst rows]
//      GATEWAY_BIN=../../target/release/realtime-gateway node bench/pg-changes.mjs   (default: debug build)

import { randomUUID } from 'node:crypto'
import { cpus } from 'node:os'
import { startGateway, gatewayBinary } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'
import { rawSocket } from '../lib/raw.mjs'

const N = Number(process.argv[2] ?? 500)
const BURST = Number(process.argv[3] ?? 2000)
const STEADY_RATE = 30
const STEADY_SECONDS = 5
const WRITERS = 8

const db = await startPostgres()
await db.sql(`
  create table public.bench (id bigserial primary key, body text not null, sent_at timestamptz not null default clock_timestamp());
  create table public.bench_rls (id bigserial primary key, body text not null, sent_at timestamptz not null default clock_timestamp());
  alter table public.bench_rls enable row level security;
  create policy "signed-in users read" on public.bench_rls for select to authenticated using (auth.uid() is not null);
  grant select on public.bench, public.bench_rls to anon, authenticated;
  alter publication supabase_realtime add table public.bench, public.bench_rls;
`)
const gw = await startGateway({
  env: { DATABASE_URL: db.url, SLOT_NAME: 'pg_bench', RUST_LOG: 'error', OUTBOX_MAX_FRAMES: String(Math.max(4096, BURST * 2)) },
})
const writers = await Promise.all(Array.from({ length: WRITERS }, () => db.connect()))

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function subscribers(table, tokenFor) {
  const subs = []
  const batch = 50 // join in waves so the join storm itself is not what is measured
  for (let start = 0; start < N; start += batch) {
    const wave = await Promise.all(
      Array.from({ length: Math.min(batch, N - start) }, async (_, k) => {
        const i = start + k
        const sock = await rawSocket(gw, { key: gw.anonKey })
        const topic = `realtime:bench-${table}-${i}-${randomUUID()}`
        const sub = { sock, topic, count: 0, latencies: [], target: 0, done: null }
        sock.ws.removeAllListeners('message')
        const ready = new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`subscriber ${i} not ready`)), 30_000)
          sock.ws.on('message', (data) => {
            const text = data.toString('utf8')
            if (text.includes('"postgres_changes",{"ids"')) {
              const now = Date.now()
              const ts = /"commit_timestamp":"([^"]+)"/.exec(text)
              if (ts) sub.latencies.push(now - Date.parse(ts[1]))
              sub.count++
              if (sub.done && sub.count >= sub.target) {
                sub.done(now)
                sub.done = null
              }
            } else if (text.includes('Subscribed to PostgreSQL')) {
              clearTimeout(timer)
              resolve()
            } else if (text.includes('"status":"error"')) {
              clearTimeout(timer)
              reject(new Error(`subscriber ${i}: ${text}`))
            }
          })
        })
        sock.send({
          join_ref: '1',
          ref: '1',
          topic,
          event: 'phx_join',
          payload: {
            config: {
              broadcast: { ack: false, self: false },
              presence: { key: '', enabled: false },
              postgres_changes: [{ event: 'INSERT', schema: 'public', table }],
              private: false,
            },
            access_token: tokenFor(i),
          },
        })
        await ready
        return sub
      }),
    )
    subs.push(...wave)
  }
  return subs
}

/** Resolves with the time the last subscriber has `target` messages in total. */
function allReceived(subs, target, timeoutMs) {
  return Promise.race([
    Promise.all(
      subs.map(
        (sub) =>
          new Promise((resolve) => {
            if (sub.count >= target) resolve(Date.now())
            else {
              sub.target = target
              sub.done = resolve
            }
          }),
      ),
    ).then((times) => Math.max(...times)),
    sleep(timeoutMs).then(() => {
      const short = subs.filter((s) => s.count < target)
      throw new Error(`${short.length} subscribers short after ${timeoutMs} ms (e.g. ${short[0]?.count}/${target})`)
    }),
  ])
}

async function scenario(label, table, tokenFor) {
  const joinStart = Date.now()
  const subs = await subscribers(table, tokenFor)
  const joinMs = Date.now() - joinStart
  await db.sql(`select pg_stat_reset()`).catch(() => {})

  // (1) steady rate: latency
  let sent = 0
  const steadyStart = Date.now()
  for (let k = 0; k < STEADY_RATE * STEADY_SECONDS; k++) {
    const due = steadyStart + (k * 1000) / STEADY_RATE
    const wait = due - Date.now()
    if (wait > 0) await sleep(wait)
    await writers[k % WRITERS].query(`insert into public.${table} (body) values ('steady')`)
    sent++
  }
  await allReceived(subs, sent, 30_000)
  const latencies = subs.flatMap((s) => s.latencies).sort((a, b) => a - b)
  for (const s of subs) s.latencies = []

  // (2) burst: throughput
  const burstStart = Date.now()
  let writeDone = 0
  await Promise.all(
    writers.map(async (w, k) => {
      for (let j = k; j < BURST; j += WRITERS) await w.query(`insert into public.${table} (body) values ('burst')`)
    }),
  ).then(() => (writeDone = Date.now()))
  const last = await allReceived(subs, sent + BURST, 120_000)
  const burstMs = last - burstStart
  const burstLatencies = subs.flatMap((s) => s.latencies).sort((a, b) => a - b)

  console.log(
    `${label.padEnd(22)} join ${N} in ${String(joinMs).padStart(5)} ms | steady ${STEADY_RATE}/s: commit→client p50 ${pct(latencies, 50)} ms, p95 ${pct(latencies, 95)} ms, max ${latencies.at(-1)} ms (${latencies.length} deliveries) | burst ${BURST} rows: written in ${writeDone - burstStart} ms, delivered to all in ${burstMs} ms → ${Math.round((BURST * 1000) / burstMs)} changes/s, ${Math.round((BURST * N * 1000) / burstMs)} messages/s; burst latency p95 ${pct(burstLatencies, 95)} ms`,
  )
  await Promise.all(subs.map((s) => s.sock.close()))
}

console.log(
  `pg-changes bench: ${N} subscribers, gateway ${gatewayBinary()}, ${cpus().length} CPUs shared by Postgres, gateway and clients`,
)
try {
  await scenario('rls off', 'bench', () => gw.anonKey)
  await scenario(`rls on, ${N} users`, 'bench_rls', () => gw.sign({ role: 'authenticated', sub: randomUUID() }))
  const shared = gw.sign({ role: 'authenticated', sub: randomUUID() })
  await scenario('rls on, 1 claims set', 'bench_rls', () => shared)
  const metrics = await fetch(`${gw.url}/metrics`).then((r) => r.text()).catch(() => '')
  const line = metrics.split('\n').find((l) => /visibility_queries/.test(l) && !l.startsWith('#'))
  if (line) console.log(`gateway ${line}`)
} finally {
  await gw.stop()
  await db.stop()
}
process.exit(0)
