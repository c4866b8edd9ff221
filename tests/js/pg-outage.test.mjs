// Postgres Changes across interruptions: the gateway's logical slot is durable, so a cut replication
// stream loses nothing committed meanwhile; when the database is down a join is still answered and the
// system message says why (issue 5 "Ready means ready"; protocol.md §4.5: database errors are retried),
// and once the database is back, existing and new subscriptions get changes again.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'
import { pgChannel, pgJoined, startPostgres } from './lib/postgres.mjs'

let db
let gw

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create table public.events (id int primary key, note text);
    grant select on public.events to anon, authenticated;
    alter publication supabase_realtime add table public.events;
  `)
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_outage' } })
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const room = (label) => `pgo-${label}-${randomUUID()}`
const BINDING = { event: 'INSERT', schema: 'public', table: 'events' }

/** Inserts probe rows until one reaches `inbox` (the stream is back), at most `ms`. */
async function untilFlowing(inbox, firstId, ms) {
  const deadline = Date.now() + ms
  for (let id = firstId; Date.now() < deadline; id++) {
    try {
      await db.sql(`insert into public.events values ($1, 'probe')`, [id])
    } catch {
      await new Promise((r) => setTimeout(r, 200)) // database not accepting yet
      continue
    }
    const got = await inbox.find((e) => e.new.id === id, 1000, `probe ${id}`).then(
      () => true,
      () => false,
    )
    if (got) return id
  }
  throw new Error(`no change arrived within ${ms} ms`)
}

test('a cut replication stream loses nothing: rows committed while it reconnects all arrive, in order', async () => {
  const sub = await pgJoined(supabaseClient(gw), room('cut'), [BINDING])
  await db.sql(`insert into public.events values (1, 'before')`)
  await sub.events[0].find((e) => e.new.id === 1, 5000, 'row 1')
  const [{ cut }] = await db.sql(
    `select count(pg_terminate_backend(pid))::int as cut from pg_stat_replication`,
  )
  assert.ok(cut >= 1, 'the gateway had a replication connection to cut')
  for (let id = 2; id <= 21; id++) await db.sql(`insert into public.events values ($1, 'during')`, [id])
  const events = await sub.events[0].until(
    (items) => items.some((e) => e.new.id === 21) && items,
    30_000,
    'rows 2..21 after the reconnect',
  )
  const ids = events.map((e) => e.new.id)
  const all = Array.from({ length: 21 }, (_, i) => i + 1)
  assert.deepEqual([...new Set(ids)], all, 'every row, in commit order')
  assert.deepEqual(ids, all, 'no row delivered twice (the gateway knows what it already routed before the cut)')
})

test('database down: a join is answered and the system message says why; after restart old and new channels get changes', async () => {
  const client = supabaseClient(gw)
  const before = await pgJoined(client, room('before'), [BINDING])
  await db.halt()
  let halted = true
  try {
    const sub = pgChannel(client, room('during'), [BINDING], { config: { broadcast: { self: true } }, timeoutMs: 20_000 })
    const pings = new Inbox('broadcasts')
    sub.channel.on('broadcast', { event: 'ping' }, (m) => pings.push(m))
    await sub.subscribed
    const sys = await sub.system.find((m) => m.extension === 'postgres_changes', 20_000, 'a postgres_changes system message')
    assert.equal(sys.status, 'error', JSON.stringify(sys))
    assert.ok(sys.message.length > 0)
    assert.equal(await sub.channel.send({ type: 'broadcast', event: 'ping', payload: {} }), 'ok')
    await pings.count(1, 5000, 'broadcast while the database is down')

    await db.resume()
    halted = false
    await untilFlowing(before.events[0], 1000, 20_000)
    // the channel that joined during the outage is subscribed once the database is back (retried)
    await sub.system.find(
      (m) => m.extension === 'postgres_changes' && m.status === 'ok' && m.message === 'Subscribed to PostgreSQL',
      15_000,
      '"Subscribed to PostgreSQL" after the restart (database errors are retried every 5–10 s, §4.5)',
    )
    await db.sql(`insert into public.events values (2000, 'after')`)
    await sub.events[0].find((e) => e.new.id === 2000, 5000, 'a change on the channel that joined during the outage')
    await before.events[0].find((e) => e.new.id === 2000, 5000, 'the same change on the channel from before')
  } finally {
    if (halted) await db.resume().catch(() => {})
  }
})
