// A client that stops reading (issue 12): the change stream waits for its full outbox at most
// SLOW_CONSUMER_MS, then closes it as a slow consumer; the other 99 subscribers get every row.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { within } from './lib/inbox.mjs'
import { pgJoined, rawPgJoin, startPostgres } from './lib/postgres.mjs'
import { rawSocket } from './lib/raw.mjs'

// Long enough that the healthy clients, 99 in this one busy Node process, are never the slow ones.
const SLOW_CONSUMER_MS = 4000

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
    env: {
      DATABASE_URL: db.url,
      SLOT_NAME: 'pgc_stalled',
      SLOW_CONSUMER_MS: String(SLOW_CONSUMER_MS),
    },
  })
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const BINDING = { event: 'INSERT', schema: 'public', table: 'bulk' }

const closedAsSlow = () => gw.metric('realtime_socket_closes_total{reason="slow_consumer"}')

test('one client of 100 stops reading: it is closed after SLOW_CONSUMER_MS; the other 99 get every row', async (t) => {
  const ROWS = 6_000
  const before = await closedAsSlow()
  const healthy = await Promise.all(
    Array.from({ length: 99 }, () => pgJoined(supabaseClient(gw), `stall-${randomUUID()}`, [BINDING])),
  )
  const slow = await rawSocket(gw, { vsn: '2.0.0' })
  await rawPgJoin(slow, `stall-${randomUUID()}`, [BINDING])
  slow.ws._socket.pause() // stop reading: the kernel buffers fill, then the gateway's outbox
  const started = Date.now()
  // 3 kB rows: more than the stalled socket's kernel buffers and its outbox hold.
  await db.sql(
    `insert into public.bulk select g, repeat('x', 3000) from generate_series(100001, ${100000 + ROWS}) g`,
  )
  for (const [i, sub] of healthy.entries()) {
    const events = await sub.events[0].until((items) => items.length >= ROWS && items, 50_000, `subscriber ${i}: ${ROWS} rows`)
    assert.equal(new Set(events.map((e) => e.new.id)).size, ROWS, `subscriber ${i}: every row once`)
    assert.deepEqual(sub.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  }
  const took = Date.now() - started
  slow.ws._socket.resume()
  const close = await within(slow.closed, 10_000, 'the server to close the stalled socket')
  // 1008 "slow consumer" when the close frame still fits, else the connection is dropped (1006).
  assert.ok([1006, 1008].includes(close.code), `close code ${close.code} ${close.reason}`)
  assert.equal(await closedAsSlow(), before + 1, 'exactly the stalled socket was closed')
  t.diagnostic(`${ROWS} rows to 99 healthy subscribers in ${took} ms with one stalled socket (bound ${SLOW_CONSUMER_MS} ms)`)
})
