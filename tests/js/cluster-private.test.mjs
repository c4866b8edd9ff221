// Private channels and the database across two gateway nodes on one nats-server and one Postgres:
// a private broadcast is authorized where it is sent and read where it is received (RLS on
// realtime.messages, each node on its own connections), a public channel of the same name is another
// topic, a broadcast from the database (`realtime.send`) reaches subscribers on both nodes exactly
// once, and replay works on whichever node the joiner is on.
//
// Each node reads the WAL from a slot of its own here (SLOT_NAME): one shared slot and the leader
// that streams it are the next issue's.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { startNats } from './lib/nats.mjs'
import { startPostgres } from './lib/postgres.mjs'

let db
let nats
let a
let b

const POLICIES = `
  create policy "rw: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'rw');
  create policy "rw: write" on realtime.messages for insert to authenticated
    with check (split_part(realtime.topic(), ':', 1) = 'rw');
  create policy "ro: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'ro');
`

before(async () => {
  db = await startPostgres()
  nats = await startNats()
  const env = (name) => ({
    DATABASE_URL: db.url,
    SLOT_NAME: `cluster_${name}`,
    CLUSTER_NATS_URL: nats.url,
    NODE_NAME: name,
    NODE_HEARTBEAT_MS: '250',
    NODE_DOWN_AFTER_MS: '2000',
  })
  a = await startGateway({ env: env('a') })
  b = await startGateway({ env: env('b'), secret: a.secret })
  await db.sql(POLICIES)
})

after(async () => {
  await closeClients()
  await a?.stop()
  await b?.stop()
  await nats?.stop()
  await db?.stop()
})

const PRIVATE = { private: true }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function user(gw, sub = randomUUID()) {
  const token = gw.sign({ role: 'authenticated', sub, aud: 'authenticated' })
  const client = supabaseClient(gw, { accessToken: async () => token, realtime: { timeout: 5000 } })
  await client.realtime.setAuth()
  return client
}

test('a private broadcast crosses nodes to readers, never to the public channel of the same name', async () => {
  const name = `rw:room-${randomUUID()}`
  const sender = await joined(await user(a), name, { config: PRIVATE })
  const reader = await joined(await user(b), name, { config: PRIVATE })
  const outsider = await joined(supabaseClient(b, { realtime: { timeout: 5000 } }), name, {})
  assert.equal(await sender.channel.send({ type: 'broadcast', event: 'secret', payload: { n: 1 } }), 'ok')
  const got = await reader.broadcasts.find((m) => m.event === 'secret', 5000, 'the private message on b')
  assert.deepEqual(got.payload, { n: 1 })
  await outsider.channel.send({ type: 'broadcast', event: 'marker', payload: {} })
  await sleep(300)
  assert.deepEqual(outsider.broadcasts.items.map((m) => m.event), [], 'self is off: the public channel got nothing')
  assert.equal(reader.broadcasts.length, 1)
})

test('a write refused on the sending node reaches no node', async () => {
  const name = `ro:room-${randomUUID()}`
  const sender = await joined(await user(a), name, { config: { ...PRIVATE, broadcast: { ack: true } } })
  const reader = await joined(await user(b), name, { config: PRIVATE })
  // no write policy on ro:*: the reference drops the message and does not answer the ack
  const status = await sender.channel.send({ type: 'broadcast', event: 'nope', payload: {} })
  assert.notEqual(status, 'ok')
  const res = await fetch(`${a.url}/api/broadcast`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', apikey: a.serviceKey, authorization: `Bearer ${a.serviceKey}` },
    body: JSON.stringify({ messages: [{ topic: name, event: 'barrier', payload: {}, private: true }] }),
  })
  assert.equal(res.status, 202)
  await reader.broadcasts.find((m) => m.event === 'barrier', 5000, 'the barrier on b')
  assert.deepEqual(reader.broadcasts.items.map((m) => m.event), ['barrier'])
})

test('realtime.send reaches subscribers on both nodes once; replay works on either node', async () => {
  const name = `rw:db-${randomUUID()}`
  const onA = await joined(await user(a), name, { config: PRIVATE })
  const onB = await joined(await user(b), name, { config: PRIVATE })
  const [{ since }] = await db.sql(`select floor(extract(epoch from clock_timestamp()) * 1000)::bigint as since`)
  for (let i = 1; i <= 3; i++) {
    await db.sql(`select realtime.send(jsonb_build_object('i', $1::int), 'stored', $2, true)`, [i, name])
  }
  for (const [label, sub] of [['a', onA], ['b', onB]]) {
    await sub.broadcasts.until((items) => items.length >= 3, 10_000, `3 stored messages on ${label}`)
  }
  await sleep(300)
  assert.deepEqual(onA.broadcasts.items.map((m) => m.payload.i), [1, 2, 3])
  assert.deepEqual(onB.broadcasts.items.map((m) => m.payload.i), [1, 2, 3])
  for (const gw of [a, b]) {
    const late = await joined(await user(gw), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: Number(since), limit: 10 } } },
    })
    const replayed = await late.broadcasts.until((items) => items.length >= 3 && items, 5000, 'the replay')
    assert.deepEqual(replayed.map((m) => [m.payload.i, m.meta?.replayed]), [[1, true], [2, true], [3, true]])
  }
})
