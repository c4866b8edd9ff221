// Measurement, not a test: joins per second on private channels whose read policy looks the user up in a
// membership table (protocol.md §8.3: every private join inserts a probe row, switches to the JWT role and
// selects it back under RLS, then rolls back).
//
// Setup: a throwaway cluster (lib/postgres.mjs) with public.room_members padded to PAD rows, and the policy
//   exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid())
// on realtime.messages for select to authenticated. SOCKETS raw V2 sockets (one user each) join
// JOINS / SOCKETS rooms each, all pipelined at once; the figure is replies / wall time from the first
// join sent to the last reply received. A second pass joins one at a time per socket for latency.
// Clients, gateway and Postgres share this machine, so it is a rough single run.
//
// Run: cd tests/js && node bench/private-joins.mjs [joins=500] [sockets=5] [pad=100000]
//      (needs target/debug/realtime-gateway or GATEWAY_BIN)

import { randomUUID } from 'node:crypto'
import { startGateway } from '../lib/gateway.mjs'
import { startPostgres } from '../lib/postgres.mjs'
import { rawSocket } from '../lib/raw.mjs'

const JOINS = Number(process.argv[2] ?? 500)
const SOCKETS = Number(process.argv[3] ?? 5)
const PAD = Number(process.argv[4] ?? 100_000)
const perSocket = Math.ceil(JOINS / SOCKETS)

const db = await startPostgres()
const gw = await startGateway({
  env: { DATABASE_URL: db.url, SLOT_NAME: 'bench_private_joins', MAX_CHANNELS_PER_CLIENT: String(perSocket * 2 + 10) },
})

try {
  await db.sql(`
    create table public.room_members (room text not null, user_id uuid not null, primary key (room, user_id));
    grant select on public.room_members to authenticated;
    create policy "members read their rooms" on realtime.messages for select to authenticated
      using (exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid()));
  `)
  await db.sql(
    `insert into public.room_members (room, user_id) select 'pad-' || g, gen_random_uuid() from generate_series(1, $1::int) g`,
    [PAD],
  )
  const users = Array.from({ length: SOCKETS }, () => randomUUID())
  const rooms = (pass, s) => Array.from({ length: perSocket }, (_, i) => `member:${pass}-${s}-${i}`)
  for (const pass of ['pipelined', 'sequential']) {
    for (const [s, user] of users.entries()) {
      await db.sql(`insert into public.room_members (room, user_id) select unnest($1::text[]), $2`, [rooms(pass, s), user])
    }
  }
  await db.sql('analyze public.room_members')

  const sockets = await Promise.all(users.map(() => rawSocket(gw)))
  const tokens = users.map((sub) => gw.sign({ role: 'authenticated', sub, aud: 'authenticated' }))

  const join = (sock, token, name) => {
    const ref = sock.nextRef()
    sock.send({
      join_ref: ref,
      ref,
      topic: `realtime:${name}`,
      event: 'phx_join',
      payload: {
        config: { broadcast: { ack: false, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: true },
        access_token: token,
      },
    })
    return sock.frames
      .find((f) => f.event === 'phx_reply' && f.ref === ref, 60_000, `reply to join ${ref}`)
      .then((f) => f.payload.status)
  }

  // pass 1: everything at once
  let started = performance.now()
  const statuses = (
    await Promise.all(sockets.map((sock, s) => Promise.all(rooms('pipelined', s).map((name) => join(sock, tokens[s], name)))))
  ).flat()
  const pipelinedMs = performance.now() - started
  const ok = statuses.filter((s) => s === 'ok').length

  // pass 2: one join at a time per socket (sockets in parallel)
  const latencies = []
  started = performance.now()
  await Promise.all(
    sockets.map(async (sock, s) => {
      for (const name of rooms('sequential', s)) {
        const t0 = performance.now()
        const status = await join(sock, tokens[s], name)
        latencies.push(performance.now() - t0)
        if (status !== 'ok') throw new Error(`join ${name}: ${status}`)
      }
    }),
  )
  const sequentialMs = performance.now() - started
  latencies.sort((a, b) => a - b)
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))].toFixed(1)

  console.log(`private joins with a membership-table policy (room_members: ${PAD + 2 * SOCKETS * perSocket} rows)`)
  console.log(
    `  pipelined:  ${statuses.length} joins over ${SOCKETS} sockets, ${ok} ok, ${pipelinedMs.toFixed(0)} ms → ${(
      (statuses.length / pipelinedMs) *
      1000
    ).toFixed(0)} joins/s`,
  )
  console.log(
    `  sequential: ${latencies.length} joins (one in flight per socket, ${SOCKETS} sockets), ${sequentialMs.toFixed(0)} ms → ${(
      (latencies.length / sequentialMs) *
      1000
    ).toFixed(0)} joins/s; latency p50 ${pct(50)} ms, p99 ${pct(99)} ms`,
  )
  await Promise.all(sockets.map((sock) => sock.close()))
} finally {
  await gw.stop()
  await db.stop()
}
