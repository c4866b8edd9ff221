// The slow-consumer rule (issue 2, fan-out design): every socket has a bounded outbox; a socket that
// does not drain is closed and never slows the publisher or the other subscribers.
//
// One raw subscriber stops reading from its TCP socket. A supabase-js publisher then sends ~60 MB of
// acknowledged broadcasts (more than any sane per-socket bound plus kernel buffers) to the topic. Every
// ack must come back, a healthy supabase-js subscriber must get every message in order, and the stalled
// socket must be closed by the server instead of buffering without bound.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { within } from './lib/inbox.mjs'
import { rawSocket } from './lib/raw.mjs'

const MESSAGES = 120
const PAYLOAD_BYTES = 500_000

let gw
before(async () => {
  gw = await startGateway()
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

test('a subscriber that stops reading is closed; the publisher and other subscribers are not slowed', async (t) => {
  const name = `slow-${randomUUID()}`
  const topic = `realtime:${name}`

  const slow = await rawSocket(gw, { vsn: '2.0.0' })
  slow.send({ join_ref: '1', ref: '1', topic, event: 'phx_join', payload: { config: { broadcast: { self: false } } } })
  await slow.frames.find((f) => f.ref === '1', 3000, 'the stalled socket join reply')
  slow.ws._socket.pause() // stop reading: the kernel buffers fill, then the gateway's outbox does
  let slowClosedAt = null
  slow.closed.then(() => (slowClosedAt = Date.now()))

  const healthy = await joined(supabaseClient(gw), name)
  const publisher = await joined(supabaseClient(gw, { realtime: { timeout: 10_000 } }), name, {
    config: { broadcast: { ack: true } },
  })

  const blob = 'x'.repeat(PAYLOAD_BYTES)
  const started = Date.now()
  for (let seq = 0; seq < MESSAGES; seq++) {
    const result = await publisher.channel.send({ type: 'broadcast', event: 'bulk', payload: { seq, blob } })
    assert.equal(result, 'ok', `ack for message ${seq}`)
  }
  const publishMs = Date.now() - started
  const got = await healthy.broadcasts.count(MESSAGES, 20_000, `${MESSAGES} messages on the healthy subscriber`)
  assert.deepEqual(
    got.map((m) => m.payload.seq),
    Array.from({ length: MESSAGES }, (_, i) => i),
  )
  assert.ok(got.every((m) => m.payload.blob.length === PAYLOAD_BYTES))
  assert.ok(publishMs < 15_000, `publishing took ${publishMs} ms`)

  // now let the stalled socket read what reached it: it must end in a close, not in more data forever
  slow.ws._socket.resume()
  const close = await within(slow.closed, 10_000, 'the server to close the stalled socket')
  const delivered = slow.frames.items.filter((f) => f.binary).length
  assert.ok(delivered < MESSAGES, `the stalled socket got all ${delivered} messages: nothing was bounded`)
  assert.ok(slowClosedAt !== null)
  // the other sockets on the topic are untouched
  assert.deepEqual(healthy.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  assert.deepEqual(publisher.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  t.diagnostic(`stalled socket: ${delivered} of ${MESSAGES} messages, then close ${close.code} ${close.reason}`)
})
