// Delivery that holds under load (issue 12): one large transaction reaches every subscriber whole,
// nobody is closed as a slow consumer because the stream outran them, and a replication stream cut
// in the middle of it delivers every row once (the transaction comes again in the same parts).
// The stalled client is in pg-stalled.test.mjs.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgJoined, startPostgres } from './lib/postgres.mjs'

let db
let gw

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create table public.bulk (id int primary key, note text not null);
    grant select on public.bulk to anon, authenticated;
    alter publication supabase_realtime add table public.bulk;
  `)
  gw = await startGateway({
    env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_bulk' },
  })
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const BINDING = { event: 'INSERT', schema: 'public', table: 'bulk' }

const closedAsSlow = () => gw.metric('realtime_socket_closes_total{reason="slow_consumer"}')

test('a 100,000-row transaction reaches 10 supabase-js subscribers whole; none is closed', async (t) => {
  const ROWS = 100_000
  const before = await closedAsSlow()
  const subs = await Promise.all(
    Array.from({ length: 10 }, () => pgJoined(supabaseClient(gw), `bulk-${randomUUID()}`, [BINDING])),
  )
  const started = Date.now()
  await db.sql(`insert into public.bulk select g, 'row ' || g from generate_series(1, ${ROWS}) g`)
  for (const [i, sub] of subs.entries()) {
    const events = await sub.events[0].until((items) => items.length >= ROWS && items, 50_000, `subscriber ${i}: ${ROWS} rows`)
    const ids = events.map((e) => e.new.id)
    assert.equal(new Set(ids).size, ROWS, `subscriber ${i}: no row missing or twice`)
    assert.deepEqual(ids.slice(0, 3), [1, 2, 3], 'in commit order')
    assert.equal(ids[ROWS - 1], ROWS)
    assert.deepEqual(sub.statuses.items.map((s) => s.status), ['SUBSCRIBED'], `subscriber ${i} stayed subscribed`)
  }
  assert.equal(await closedAsSlow(), before, 'nobody was closed as a slow consumer')
  t.diagnostic(`${ROWS} rows x 10 subscribers delivered in ${Date.now() - started} ms`)
  await db.sql(`delete from public.bulk`)
})

test('the replication stream cut in the middle of a 100,000-row transaction: every row once, in order', async (t) => {
  const ROWS = 100_000
  await db.sql(`delete from public.bulk`)
  const subs = await Promise.all(
    Array.from({ length: 2 }, () => pgJoined(supabaseClient(gw), `cut-${randomUUID()}`, [BINDING])),
  )
  await db.sql(`insert into public.bulk select g, 'row ' || g from generate_series(200001, ${200000 + ROWS}) g`)
  await subs[0].events[0].until((items) => items.length >= 1, 20_000, 'the first rows of the transaction')
  const [{ cut }] = await db.sql(`select count(pg_terminate_backend(pid))::int as cut from pg_stat_replication`)
  const atCut = subs[0].events[0].items.length
  assert.ok(cut >= 1, 'the gateway had a replication connection to cut')
  for (const [i, sub] of subs.entries()) {
    const events = await sub.events[0].until((items) => items.length >= ROWS && items, 50_000, `subscriber ${i}: ${ROWS} rows`)
    await new Promise((r) => setTimeout(r, 500)) // anything delivered twice would arrive by now
    const ids = sub.events[0].items.map((e) => e.new.id)
    const seen = new Set()
    const twice = ids.filter((id) => seen.has(id) || !seen.add(id))
    assert.equal(
      ids.length,
      ROWS,
      `subscriber ${i}: ${ids.length - ROWS} extra rows (${twice.length} twice, ids ${twice[0]}..${twice.at(-1)}; ` +
        `outside the range: ${ids.filter((id) => id <= 200000 || id > 200000 + ROWS).length}; cut after ${atCut})`,
    )
    assert.ok(ids.every((id, k) => id === 200001 + k), `subscriber ${i}: every row once, in commit order`)
    assert.ok(events.length >= ROWS)
  }
  t.diagnostic(`cut after ${atCut} of ${ROWS} rows had arrived`)
})
