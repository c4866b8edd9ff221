// Mixed serializers on one topic (protocol.md §2.4): an old realtime-js 2.11.x client (V1 JSON objects,
// JSON broadcasts) and supabase-js 2.119 (V2 arrays, binary kind-3 pushes, kind-4 deliveries) see each
// other's messages both ways; supabase-js with vsn '1.0.0' interoperates with default supabase-js too.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import WebSocket from 'ws'
import { closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'
import { UNICODE_PAYLOAD } from './lib/payloads.mjs'

let gw
before(async () => {
  gw = await startGateway()
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

const room = (label) => `mixed-${label}-${randomUUID()}`

/** A ws transport that records every frame the gateway sends to this client. */
function recordingTransport() {
  const received = new Inbox('frames received')
  class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args)
      this.on('message', (data, isBinary) => received.push({ isBinary, data: Buffer.from(data) }))
    }
  }
  return { RecordingWebSocket, received }
}

test('realtime-js 2.11 (V1) and supabase-js (V2) on one topic see each other both ways', async () => {
  const name = room('v1-v2')
  const v1rec = recordingTransport()
  const old = v1Client(gw, { transport: v1rec.RecordingWebSocket })
  const v1 = await joined(old, name, { config: { broadcast: { self: true } } })
  const v2 = await joined(supabaseClient(gw), name, { config: { broadcast: { self: true } } })

  // V1 → V2 (JSON text in, JSON array out to the V2 socket)
  assert.equal(await v1.channel.send({ type: 'broadcast', event: 'from-v1', payload: UNICODE_PAYLOAD }), 'ok')
  const atV2 = await v2.broadcasts.find((m) => m.event === 'from-v1', 3000, 'the V1 message on V2')
  assert.deepEqual(atV2, { type: 'broadcast', event: 'from-v1', payload: UNICODE_PAYLOAD })
  const ownV1 = await v1.broadcasts.find((m) => m.event === 'from-v1', 3000, 'the V1 message back (self)')
  assert.deepEqual(ownV1.payload, UNICODE_PAYLOAD)

  // V2 → V1 (binary kind 3 in, converted to a JSON object for the V1 socket)
  assert.equal(await v2.channel.send({ type: 'broadcast', event: 'from-v2', payload: UNICODE_PAYLOAD }), 'ok')
  const atV1 = await v1.broadcasts.find((m) => m.event === 'from-v2', 3000, 'the V2 message on V1')
  assert.equal(atV1.type, 'broadcast')
  assert.deepEqual(atV1.payload, UNICODE_PAYLOAD)
  const ownV2 = await v2.broadcasts.find((m) => m.event === 'from-v2', 3000, 'the V2 message back (self)')
  assert.deepEqual(ownV2.payload, UNICODE_PAYLOAD)

  // the V1 socket never got a binary frame, and every frame was a V1 object without join_ref
  assert.ok(v1rec.received.length > 0)
  for (const frame of v1rec.received.items) {
    assert.equal(frame.isBinary, false, `binary frame to a V1 socket: ${frame.data.toString('hex')}`)
    const msg = JSON.parse(frame.data.toString('utf8'))
    assert.ok(!Array.isArray(msg), `V2 array frame to a V1 socket: ${frame.data}`)
    assert.deepEqual(Object.keys(msg).sort(), ['event', 'payload', 'ref', 'topic'])
  }
  const relayed = v1rec.received.items
    .map((f) => JSON.parse(f.data.toString('utf8')))
    .find((m) => m.event === 'broadcast' && m.payload.event === 'from-v2')
  assert.equal(relayed.topic, `realtime:${name}`, 'the receiver join topic')
  assert.equal(relayed.ref, null, 'fastlane messages carry ref null')
})

test('a V2 sender reaches several V1 and V2 receivers in order', async () => {
  const name = room('fanout')
  const receivers = []
  for (let i = 0; i < 3; i++) receivers.push(await joined(v1Client(gw), name))
  for (let i = 0; i < 3; i++) receivers.push(await joined(supabaseClient(gw), name))
  const sender = await joined(supabaseClient(gw), name)
  for (let seq = 0; seq < 20; seq++) await sender.channel.send({ type: 'broadcast', event: 'n', payload: { seq } })
  for (const r of receivers) {
    const got = await r.broadcasts.count(20, 5000, '20 messages')
    assert.deepEqual(got.map((m) => m.payload.seq), Array.from({ length: 20 }, (_, i) => i))
  }
})

test("supabase-js with vsn '1.0.0' and default supabase-js (2.0.0) see each other both ways", async () => {
  const name = room('vsn')
  const rec = recordingTransport()
  const v1 = await joined(supabaseClient(gw, { realtime: { vsn: '1.0.0', transport: rec.RecordingWebSocket } }), name)
  const v2 = await joined(supabaseClient(gw), name)

  await v1.channel.send({ type: 'broadcast', event: 'a', payload: { from: 'vsn1', u: UNICODE_PAYLOAD.emoji } })
  const atV2 = await v2.broadcasts.find((m) => m.event === 'a', 3000, 'the vsn 1.0.0 message on V2')
  assert.deepEqual(atV2.payload, { from: 'vsn1', u: UNICODE_PAYLOAD.emoji })

  await v2.channel.send({ type: 'broadcast', event: 'b', payload: { from: 'vsn2', u: UNICODE_PAYLOAD.cjk } })
  const atV1 = await v1.broadcasts.find((m) => m.event === 'b', 3000, 'the vsn 2.0.0 message on vsn 1.0.0')
  assert.deepEqual(atV1.payload, { from: 'vsn2', u: UNICODE_PAYLOAD.cjk })

  assert.ok(rec.received.items.every((f) => !f.isBinary), 'no binary frame to the vsn 1.0.0 socket')
})

test('ack and self behave the same on a V1 socket', async () => {
  const name = room('v1-ack')
  const v1 = await joined(v1Client(gw), name, { config: { broadcast: { ack: true, self: true } } })
  const v2 = await joined(supabaseClient(gw), name)
  assert.equal(await v1.channel.send({ type: 'broadcast', event: 'acked', payload: { x: 1 } }), 'ok')
  await v1.broadcasts.find((m) => m.event === 'acked', 3000, 'own message (self)')
  await v2.broadcasts.find((m) => m.event === 'acked', 3000, 'the message on V2')
})
