// Broadcast between supabase-js clients (V2 serializer, so every send is a binary kind-3 push and every
// delivery a kind-4 frame, protocol.md §2.3–§2.4 and §5): self false/true, ack, topic isolation,
// ordering, and payload fidelity.
//
// Absence is proved without sleeping: after the message that must NOT arrive, a marker is sent on the
// same path; the marker arriving first-and-alone shows the other message was never delivered.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { UNICODE_PAYLOAD } from './lib/payloads.mjs'

const CAP_KB = 1000

let gw
before(async () => {
  gw = await startGateway({ env: { MAX_PAYLOAD_SIZE_IN_KB: String(CAP_KB) } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

const room = (label) => `bc-${label}-${randomUUID()}`
const client = () => supabaseClient(gw, { realtime: { timeout: 4000 } })

test('self: false — the other client gets the message, the sender does not', async () => {
  const name = room('self-false')
  const a = await joined(client(), name, { config: { broadcast: { self: false } } })
  const b = await joined(client(), name, { config: { broadcast: { self: false } } })

  assert.equal(await a.channel.send({ type: 'broadcast', event: 'greet', payload: { from: 'a' } }), 'ok')
  const got = await b.broadcasts.find((m) => m.event === 'greet', 3000, "a's message on b")
  assert.deepEqual(got, { type: 'broadcast', event: 'greet', payload: { from: 'a' } })

  // the echo to a, had there been one, was queued before b even saw the message; b's marker comes after
  await b.channel.send({ type: 'broadcast', event: 'marker', payload: {} })
  await a.broadcasts.find((m) => m.event === 'marker', 3000, "b's marker on a")
  assert.deepEqual(
    a.broadcasts.items.map((m) => m.event),
    ['marker'],
    'the sender did not receive its own message',
  )
  assert.deepEqual(b.broadcasts.items.map((m) => m.event), ['greet'], 'b did not receive its own marker')
})

test('self: true — the sender gets its own message too', async () => {
  const name = room('self-true')
  const a = await joined(client(), name, { config: { broadcast: { self: true } } })
  const b = await joined(client(), name)

  await a.channel.send({ type: 'broadcast', event: 'echo', payload: { n: 42 } })
  const own = await a.broadcasts.find((m) => m.event === 'echo', 3000, 'own message back')
  assert.deepEqual(own, { type: 'broadcast', event: 'echo', payload: { n: 42 } })
  await b.broadcasts.find((m) => m.event === 'echo', 3000, 'message on the other client')
})

test("ack: true — send() resolves 'ok' once the server acknowledges", async () => {
  const name = room('ack')
  const a = await joined(client(), name, { config: { broadcast: { ack: true } } })
  const b = await joined(client(), name)

  const started = Date.now()
  const result = await a.channel.send({ type: 'broadcast', event: 'acked', payload: { v: 1 } })
  assert.equal(result, 'ok', `send() resolved ${result} after ${Date.now() - started} ms`)
  await b.broadcasts.find((m) => m.event === 'acked', 3000, 'the acked message')

  // ack and self together: both the reply and the echo arrive
  const c = await joined(client(), room('ack-self'), { config: { broadcast: { ack: true, self: true } } })
  assert.equal(await c.channel.send({ type: 'broadcast', event: 'both', payload: {} }), 'ok')
  await c.broadcasts.find((m) => m.event === 'both', 3000, 'the echo with ack+self')
})

test('topic isolation — a message stays on its topic', async () => {
  const x = room('x')
  const y = room('y')
  const sender = client()
  const receiver = client()
  const ax = await joined(sender, x)
  const ay = await joined(sender, y)
  const bx = await joined(receiver, x)
  const by = await joined(receiver, y)
  const bz = await joined(receiver, `${x}-suffix`) // a topic that merely shares a prefix

  await ax.channel.send({ type: 'broadcast', event: 'same', payload: { topic: 'x' } })
  await bx.broadcasts.find((m) => m.event === 'same', 3000, 'the message on x')
  await ay.channel.send({ type: 'broadcast', event: 'same', payload: { topic: 'y' } })
  await by.broadcasts.find((m) => m.event === 'same', 3000, 'the message on y')

  assert.deepEqual(bx.broadcasts.items.map((m) => m.payload), [{ topic: 'x' }])
  assert.deepEqual(by.broadcasts.items.map((m) => m.payload), [{ topic: 'y' }])
  // a marker on the prefix topic proves nothing from x leaked into it
  const zSender = await joined(client(), `${x}-suffix`)
  await zSender.channel.send({ type: 'broadcast', event: 'marker', payload: {} })
  await bz.broadcasts.find((m) => m.event === 'marker', 3000, 'the marker on the prefix topic')
  assert.deepEqual(bz.broadcasts.items.map((m) => m.event), ['marker'])
})

test('100 messages arrive complete and in order', async () => {
  const name = room('order')
  const a = await joined(client(), name)
  const b = await joined(client(), name)
  for (let seq = 0; seq < 100; seq++) {
    const result = await a.channel.send({ type: 'broadcast', event: 'seq', payload: { seq } })
    assert.equal(result, 'ok')
  }
  const got = await b.broadcasts.count(100, 10_000, '100 messages')
  assert.deepEqual(
    got.map((m) => m.payload.seq),
    Array.from({ length: 100 }, (_, i) => i),
  )

  // the same with ack: each send waits for its reply, and order still holds
  const c = await joined(client(), room('order-ack'), { config: { broadcast: { ack: true, self: true } } })
  for (let seq = 0; seq < 100; seq++) {
    assert.equal(await c.channel.send({ type: 'broadcast', event: 'seq', payload: { seq } }), 'ok')
  }
  const own = await c.broadcasts.count(100, 10_000, '100 own messages')
  assert.deepEqual(
    own.map((m) => m.payload.seq),
    Array.from({ length: 100 }, (_, i) => i),
  )
})

test('unicode and nested payloads arrive intact (and a non-ASCII event name)', async () => {
  const name = room('unicode')
  const a = await joined(client(), name, { config: { broadcast: { self: true } } })
  const b = await joined(client(), name)

  await a.channel.send({ type: 'broadcast', event: 'payload', payload: UNICODE_PAYLOAD })
  const got = await b.broadcasts.find((m) => m.event === 'payload', 3000, 'the unicode payload')
  assert.deepEqual(got.payload, UNICODE_PAYLOAD)
  const own = await a.broadcasts.find((m) => m.event === 'payload', 3000, 'the unicode payload (self)')
  assert.deepEqual(own.payload, UNICODE_PAYLOAD)

  // event names go into a length-prefixed binary header; their length is in UTF-8 bytes
  const event = 'événement-😀'
  await a.channel.send({ type: 'broadcast', event, payload: { ok: 'ü' } })
  const named = await b.broadcasts.find((m) => m.event === event, 3000, 'the non-ASCII event')
  assert.deepEqual(named.payload, { ok: 'ü' })

  // a payload that is large but under the cap
  const big = { blob: 'ü'.repeat(200_000), list: Array.from({ length: 2000 }, (_, i) => ({ i, s: `✓${i}` })) }
  await a.channel.send({ type: 'broadcast', event: 'big', payload: big })
  const gotBig = await b.broadcasts.find((m) => m.event === 'big', 5000, 'the large payload')
  assert.deepEqual(gotBig.payload, big)
})

test("a payload over MAX_PAYLOAD_SIZE_IN_KB is not delivered and an ack'd send resolves 'error'", async () => {
  const name = room('cap')
  const a = await joined(client(), name, { config: { broadcast: { ack: true } } })
  const b = await joined(client(), name)
  const tooBig = { blob: 'x'.repeat(CAP_KB * 1000 * 2) }
  assert.equal(await a.channel.send({ type: 'broadcast', event: 'huge', payload: tooBig }), 'error')
  assert.equal(await a.channel.send({ type: 'broadcast', event: 'marker', payload: {} }), 'ok')
  await b.broadcasts.find((m) => m.event === 'marker', 3000, 'the marker after the oversized message')
  assert.deepEqual(b.broadcasts.items.map((m) => m.event), ['marker'], 'the oversized message was dropped')
  // the channel survives the refusal
  assert.deepEqual(a.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
})
