// Measurement, not a test: Postgres Changes fan-out to N (default 500) subscribers, RLS off and RLS on.
//
// A throwaway cluster (lib/postgres.mjs) and the gateway; N raw V2 sockets (one per subscriber, each its
// own channel with one INSERT binding, as N browser tabs would be) join and wait for "Subscribed to
// PostgreSQL". Scenarios:
//   - rls off:            table without RLS, subscribers with the anon key;
//   - rls on, N users:    RLS table (policy: any signed-in user sees every row), N authenticated tokens
//                         with distinct `sub` (N distinct claims sets → N visibility queries per batch);
//   - rls on, 1 claims:   same table, all subscribers with the same token (one query per batch).
// For each: single-row transactions at a paced rate in steps (10, 30, 60, 120, 250, 500, 1000 changes/s,
// 3 s each) while the gateway keeps up (p95 commit→client < 5 s, no socket closed, over half delivered);
// prints every step, the highest rate with p95 < 1 s, and the highest rate delivered at all. Deliveries
// that never came (RLS rows withheld, see pg-rls.test.mjs) are printed as MISSING, not held against a step. Latency is commit→client:
// commit_timestamp (ms) against the receive time on this machine, over every delivery.
// Clients, gateway and Postgres share this machine; prints, asserts nothing.
//
// Run: cd tests/js && node bench/pg-changes.mjs [subscribers] [rates, e.g. 30,60,120]
//      GATEWAY_BIN=../../target/release/realtime-gateway node bench/pg-changes.mjs   (default: debug build)

import { randomUUID } from 'node:crypto'
import { cpus } from 'node:os'
import { startGateway, gatewayBinary } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'
import { rawSocket } from '../lib/raw.mjs'

const N = Number(process.argv[2] ?? 500)
const RATES = (process.argv[3] ?? '10,30,60,120,250,500,1000').split(',').map(Number)
const STEP_SECONDS = 3
const QUIET_MS = 15_000
const WRITERS = 8

const db = await startPostgres()
await db.sql(`
  create table public.bench (id bigserial primary key, body text not null, sent_at timestamptz not null default clock_timestamp());
  create table public.bench_rls (like public.bench including all);
  create table public.bench_rls1 (like public.bench including all);
  alter table public.bench_rls enable row level security;
  alter table public.bench_rls1 enable row level security;
  create policy "signed-in users read" on public.bench_rls for select to authenticated using (auth.uid() is not null);
  create policy "signed-in users read" on public.bench_rls1 for select to authenticated using (auth.uid() is not null);
  grant select on public.bench, public.bench_rls, public.bench_rls1 to anon, authenticated;
  alter publication supabase_realtime add table public.bench, public.bench_rls, public.bench_rls1;
`)
const gw = await startGateway({
  env: { DATABASE_URL: db.url, SLOT_NAME: 'pg_bench', RUST_LOG: process.env.RUST_LOG || 'warn', OUTBOX_MAX_FRAMES: '16384' },
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
        const sub = { sock, topic, count: 0, latencies: [], lastAt: Date.now() }
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
              sub.lastAt = now
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
        // heartbeats, as every client sends them (the gateway closes silent sockets)
        const beat = setInterval(() => sock.send({ ref: sock.nextRef(), topic: 'phoenix', event: 'heartbeat', payload: {} }), 20_000)
        sock.closed.then(() => clearInterval(beat))
        return sub
      }),
    )
    subs.push(...wave)
  }
  return subs
}

/**
 * Waits until every subscriber has `target` messages in total, or nothing has arrived for `quietMs`
 * (changes withheld or lost). Resolves with `{ last, missing }`: the time of the last delivery and the
 * number of deliveries short of the target over all subscribers.
 */
async function allReceived(subs, target, quietMs = 3000) {
  for (;;) {
    const before = subs.reduce((n, s) => n + s.count, 0)
    if (subs.every((s) => s.count >= target)) break
    await sleep(Math.min(quietMs, 50))
    const after = subs.reduce((n, s) => n + s.count, 0)
    if (after === before) {
      const quietSince = Math.max(...subs.map((s) => s.lastAt))
      if (Date.now() - quietSince >= quietMs) break
    }
  }
  return {
    last: Math.max(...subs.map((s) => s.lastAt)),
    missing: subs.reduce((n, s) => n + Math.max(0, target - s.count), 0),
  }
}

/** Inserts `rate` rows/s for `seconds` s (single-row transactions over the writer connections). */
async function paced(table, rate, seconds) {
  const total = Math.round(rate * seconds)
  const start = Date.now()
  const chains = writers.map(() => Promise.resolve()) // one query at a time per connection
  for (let k = 0; k < total; k++) {
    const wait = start + (k * 1000) / rate - Date.now()
    if (wait > 0) await sleep(wait)
    const w = k % WRITERS
    chains[w] = chains[w].then(() => writers[w].query(`insert into public.${table} (body) values ('x')`))
  }
  await Promise.all(chains)
  return { total, start, writeMs: Date.now() - start }
}

async function scenario(label, table, tokenFor) {
  const joinStart = Date.now()
  const subs = await subscribers(table, tokenFor)
  const joinMs = Date.now() - joinStart
  let closed = 0
  for (const s of subs) s.sock.closed.then(() => closed++)
  console.log(`${label}: ${N} subscribers joined in ${joinMs} ms`)

  let expected = 0
  let missingBefore = 0
  let sustained = 0
  let p95AtSustained = null
  let kept = 0
  let p95AtKept = null
  const rate_before = (rate) => RATES[RATES.indexOf(rate) - 1] ?? 0
  for (const rate of RATES) {
    for (const s of subs) s.latencies = []
    const { total, start, writeMs } = await paced(table, rate, STEP_SECONDS)
    expected += total
    const { last, missing: missingSoFar } = await allReceived(subs, expected, QUIET_MS)
    const missing = missingSoFar - missingBefore
    missingBefore = missingSoFar
    const lat = subs.flatMap((s) => s.latencies).sort((x, y) => x - y)
    const delivered = missing <= total * N * 0.5 && closed === 0
    const ok = delivered && pct(lat, 95) < 1000
    console.log(
      `  ${String(rate).padStart(5)} changes/s for ${STEP_SECONDS} s (${total} rows, written in ${writeMs} ms): ` +
        `commit→client p50 ${pct(lat, 50)} ms, p95 ${pct(lat, 95)} ms, max ${lat.at(-1)} ms; ` +
        `${lat.length} deliveries in ${last - start} ms = ${Math.round((lat.length * 1000) / Math.max(1, last - start))} messages/s` +
        `${missing ? `; MISSING ${missing}` : ''}${closed ? `; ${closed} sockets closed` : ''}${ok ? '' : '  ← over the line'}`,
    )
    if (closed) {
      const status = await Promise.race([gw.exited, sleep(100).then(() => 'running')])
      console.log(`    gateway: ${JSON.stringify(status)}; last log lines:\n${gw.logs().slice(-15).join('\n')}`)
    }
    if (ok && sustained === rate_before(rate)) {
      sustained = rate
      p95AtSustained = pct(lat, 95)
    }
    if (delivered) {
      kept = rate
      p95AtKept = pct(lat, 95)
    }
    // go on while the gateway keeps up at all (latency under 5 s); stop once it falls behind
    if (!delivered || pct(lat, 95) >= 5000) break
  }
  console.log(
    `  → ${label}: ${sustained} changes/s to ${N} subscribers with p95 < 1 s (p95 ${p95AtSustained} ms); ` +
      `highest rate delivered at any latency: ${kept} changes/s (p95 ${p95AtKept} ms)`,
  )
  await Promise.all(subs.map((s) => s.sock.close()))
}

console.log(
  `pg-changes bench: ${N} subscribers, gateway ${gatewayBinary()}, ${cpus().length} CPUs shared by Postgres, gateway and clients`,
)
const only = process.env.BENCH_ONLY // 'off', 'users' or 'shared'
try {
  if (!only || only === 'off') await scenario('rls off', 'bench', () => gw.anonKey)
  if (!only || only === 'users') {
    await scenario(`rls on, ${N} users`, 'bench_rls', () => gw.sign({ role: 'authenticated', sub: randomUUID() }))
  }
  const shared = gw.sign({ role: 'authenticated', sub: randomUUID() })
  if (!only || only === 'shared') await scenario('rls on, 1 claims set', 'bench_rls1', () => shared)
  const metrics = await fetch(`${gw.url}/metrics`).then((r) => r.text()).catch(() => '')
  const line = metrics.split('\n').find((l) => /visibility_queries/.test(l) && !l.startsWith('#'))
  if (line) console.log(`gateway ${line}`)
} finally {
  await gw.stop()
  await db.stop()
}
process.exit(0)
