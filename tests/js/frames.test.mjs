// The exact frames of a client session, checked against the shapes in protocol.md (§2–§5, Appendix A/B),
// and the lifecycle edges a client does not show: duplicate joins, unmatched topics, malformed frames.
//
// Each transcript is the full list of server frames for a scripted session: join (ack + self), one
// broadcast, one heartbeat, leave. The expected frames are written from the protocol reference, with the
// refs taken from what the client itself sent.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import WebSocket from 'ws'
import { closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'
import { rawSocket, rawUpgrade } from './lib/raw.mjs'

let gw
before(async () => {
  gw = await startGateway({ env: { CHANNEL_ERROR_BACKOFF_MS: '50' } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

/** A `ws` transport that records both directions: `{ dir: 'C>' | 'S>', binary, text, value }`. */
function recorder() {
  const frames = new Inbox('frames')
  const record = (dir, data, binary) => {
    const buf = Buffer.from(data)
    if (binary) frames.push({ dir, binary: buf })
    else frames.push({ dir, text: buf.toString('utf8'), value: JSON.parse(buf.toString('utf8')) })
  }
  class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args)
      this.on('message', (data, isBinary) => record('S>', data, isBinary))
    }
    send(data, ...rest) {
      record('C>', typeof data === 'string' ? Buffer.from(data) : data, typeof data !== 'string')
      return super.send(data, ...rest)
    }
  }
  return { RecordingWebSocket, frames }
}

/** kind 4 (protocol.md §2.3): 04, topic len, event len, metadata len, encoding, topic, event, metadata, payload. */
function kind4(topic, event, payloadText) {
  const t = Buffer.from(topic)
  const e = Buffer.from(event)
  return Buffer.concat([Buffer.from([4, t.length, e.length, 0, 1]), t, e, Buffer.from(payloadText)])
}

async function scriptedSession(client, name) {
  const sub = await joined(client, name, { config: { broadcast: { ack: true, self: true } } })
  assert.equal(await sub.channel.send({ type: 'broadcast', event: 'cursor', payload: { x: 'é' } }), 'ok')
  await sub.broadcasts.find((m) => m.event === 'cursor', 3000, 'own broadcast')
  return sub
}

test('supabase-js, vsn 2.0.0: the server frames of a session are exactly the reference shapes', async () => {
  const name = `frames-v2-${randomUUID()}`
  const topic = `realtime:${name}`
  const rec = recorder()
  const supabase = supabaseClient(gw, { realtime: { transport: rec.RecordingWebSocket } })
  const sub = await scriptedSession(supabase, name)
  await supabase.realtime.sendHeartbeat()
  await rec.frames.find((f) => f.dir === 'S>' && f.value?.[2] === 'phoenix', 3000, 'the heartbeat reply')
  assert.equal(await supabase.removeChannel(sub.channel), 'ok')
  await rec.frames.find((f) => f.dir === 'S>' && f.value?.[3] === 'phx_close', 3000, 'phx_close after leave')

  const sent = rec.frames.items.filter((f) => f.dir === 'C>')
  const join = sent.find((f) => f.value?.[3] === 'phx_join').value
  const jr = join[0]
  const push = sent.find((f) => f.binary) // the broadcast, as a kind-3 frame
  assert.equal(push.binary[0], 3, 'supabase-js sent the broadcast as binary kind 3')
  const pushRef = push.binary.subarray(7 + push.binary[1], 7 + push.binary[1] + push.binary[2]).toString()
  const hb = sent.find((f) => f.value?.[2] === 'phoenix').value[1]
  const leave = sent.find((f) => f.value?.[3] === 'phx_leave').value[1]

  const received = rec.frames.items.filter((f) => f.dir === 'S>')
  const shown = received.map((f) => (f.binary ? `bin:${f.binary.toString('hex')}` : f.value))
  const ok = { status: 'ok', response: {} }
  // 1. the join reply comes first
  assert.deepEqual(shown[0], [jr, jr, topic, 'phx_reply', { status: 'ok', response: { postgres_changes: [] } }])
  // 2. the broadcast: its echo as kind 4 with the receiver's topic and no metadata, and the ack (either order)
  assert.deepEqual(
    new Set(shown.slice(1, 3).map((f) => JSON.stringify(f))),
    new Set([
      JSON.stringify(`bin:${kind4(topic, 'cursor', '{"x":"é"}').toString('hex')}`),
      JSON.stringify([jr, pushRef, topic, 'phx_reply', ok]),
    ]),
  )
  // 3. heartbeat, 4. leave reply then phx_close with ref = join_ref (§3.4)
  assert.deepEqual(shown.slice(3), [
    [null, hb, 'phoenix', 'phx_reply', ok],
    [jr, leave, topic, 'phx_reply', ok],
    [jr, jr, topic, 'phx_close', {}],
  ])
})

for (const flavour of ['supabase-js vsn 1.0.0', 'realtime-js 2.11']) {
  test(`${flavour}: the server frames of a session are exactly the reference V1 shapes`, async () => {
    const name = `frames-v1-${randomUUID()}`
    const topic = `realtime:${name}`
    const rec = recorder()
    const client =
      flavour === 'realtime-js 2.11'
        ? v1Client(gw, { transport: rec.RecordingWebSocket })
        : supabaseClient(gw, { realtime: { vsn: '1.0.0', transport: rec.RecordingWebSocket } })
    const realtime = client.realtime ?? client
    const sub = await scriptedSession(client, name)
    await realtime.sendHeartbeat()
    await rec.frames.find((f) => f.dir === 'S>' && f.value?.topic === 'phoenix', 3000, 'the heartbeat reply')
    await realtime.removeChannel(sub.channel)
    await rec.frames.find((f) => f.dir === 'S>' && f.value?.event === 'phx_close', 3000, 'phx_close after leave')

    const sent = rec.frames.items.filter((f) => f.dir === 'C>').map((f) => f.value)
    assert.ok(sent.every((m) => m && !Array.isArray(m)), 'the client sent V1 objects only')
    const jr = sent.find((m) => m.event === 'phx_join').ref
    const pushRef = sent.find((m) => m.event === 'broadcast').ref
    const hb = sent.find((m) => m.topic === 'phoenix').ref
    const leave = sent.find((m) => m.event === 'phx_leave').ref

    const received = rec.frames.items.filter((f) => f.dir === 'S>')
    assert.ok(received.every((f) => !f.binary), 'no binary frame to a V1 socket')
    const shown = received.map((f) => f.value)
    const ok = { status: 'ok', response: {} }
    const frame = (event, payload, ref, t = topic) => ({ topic: t, event, payload, ref })
    assert.deepEqual(shown[0], frame('phx_reply', { status: 'ok', response: { postgres_changes: [] } }, jr))
    assert.deepEqual(
      new Set(shown.slice(1, 3).map((f) => JSON.stringify(f, Object.keys(f).sort()))),
      new Set(
        [
          frame('broadcast', { type: 'broadcast', event: 'cursor', payload: { x: 'é' } }, null),
          frame('phx_reply', ok, pushRef),
        ].map((f) => JSON.stringify(f, Object.keys(f).sort())),
      ),
    )
    assert.deepEqual(shown.slice(3), [
      frame('phx_reply', ok, hb, 'phoenix'),
      frame('phx_reply', ok, leave),
      frame('phx_close', {}, jr),
    ])
  })
}

describe('lifecycle edges (raw frames)', () => {
  const config = { broadcast: { ack: false, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false }

  test('a duplicate join: phx_close for the old join_ref, the new join answered ok', async () => {
    const sock = await rawSocket(gw)
    const topic = `realtime:dup-${randomUUID()}`
    sock.send({ join_ref: '1', ref: '1', topic, event: 'phx_join', payload: { config } })
    await sock.frames.find((f) => f.ref === '1', 3000, 'first join reply')
    sock.send({ join_ref: '2', ref: '2', topic, event: 'phx_join', payload: { config } })
    const reply = await sock.frames.find((f) => f.ref === '2', 3000, 'second join reply')
    assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } })
    const close = await sock.frames.find((f) => f.event === 'phx_close', 3000, 'phx_close of the old join')
    assert.deepEqual(JSON.parse(close.text), ['1', '1', topic, 'phx_close', {}])
    // the new channel is the live one: a broadcast with the new join_ref reaches a second socket
    const other = await rawSocket(gw)
    other.send({ join_ref: '9', ref: '9', topic, event: 'phx_join', payload: { config } })
    await other.frames.find((f) => f.ref === '9', 3000, 'join of the listener')
    sock.send({ join_ref: '2', ref: '3', topic, event: 'broadcast', payload: { type: 'broadcast', event: 'e', payload: { n: 1 } } })
    const got = await other.frames.find((f) => f.event === 'broadcast', 3000, 'the broadcast')
    assert.deepEqual(JSON.parse(got.text), [null, null, topic, 'broadcast', { type: 'broadcast', event: 'e', payload: { n: 1 } }])
    await Promise.all([sock.close(), other.close()])
  })

  test('unjoined topics: leave answers ok, other events "unmatched topic"; non-realtime topics refused', async () => {
    const sock = await rawSocket(gw)
    const topic = `realtime:nobody-${randomUUID()}`
    sock.send({ join_ref: '1', ref: '1', topic, event: 'phx_leave', payload: {} })
    const leave = await sock.frames.find((f) => f.ref === '1', 3000, 'leave reply')
    assert.deepEqual(leave.payload, { status: 'ok', response: {} })
    sock.send({ join_ref: '1', ref: '2', topic, event: 'broadcast', payload: { type: 'broadcast', event: 'e', payload: {} } })
    const bc = await sock.frames.find((f) => f.ref === '2', 3000, 'broadcast reply')
    assert.deepEqual(bc.payload, { status: 'error', response: { reason: 'unmatched topic' } })
    sock.send({ join_ref: '3', ref: '3', topic: 'room1', event: 'phx_join', payload: { config } })
    const bad = await sock.frames.find((f) => f.ref === '3', 3000, 'join reply for a topic without realtime:')
    assert.deepEqual(bad.payload, { status: 'error', response: { reason: 'unmatched topic' } })
    sock.send({ join_ref: '4', ref: '4', topic: 'realtime:', event: 'phx_join', payload: { config } })
    const empty = await sock.frames.find((f) => f.ref === '4', 3000, 'join reply for "realtime:"')
    assert.deepEqual(empty.payload, {
      status: 'error',
      response: { reason: 'TopicNameRequired: You must provide a topic name' },
    })
    await sock.close()
  })

  test('malformed frames are dropped and the socket stays usable', async () => {
    for (const vsn of ['2.0.0', '1.0.0']) {
      const sock = await rawSocket(gw, { vsn })
      sock.ws.send('this is not json')
      sock.ws.send('{"topic":"phoenix"}')
      sock.ws.send(vsn === '2.0.0' ? '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}' : '[null,"1","phoenix","heartbeat",{}]')
      sock.ws.send('[1,2]')
      sock.ws.send(Buffer.from([3, 200, 200]))
      sock.send({ ref: '2', topic: 'phoenix', event: 'heartbeat', payload: {} })
      await sock.frames.find((f) => f.ref === '2', 3000, `heartbeat reply after garbage (${vsn})`)
      assert.deepEqual(
        sock.frames.items.map((f) => f.ref),
        ['2'],
        `nothing answered the malformed frames (${vsn}); the V1-shaped frame on V2 and vice versa included`,
      )
      await sock.close()
    }
  })

  test('a doubled slash in the socket path is tolerated', async () => {
    const res = await rawUpgrade(gw, { path: '/realtime/v1//websocket', query: { apikey: gw.anonKey, vsn: '2.0.0' } })
    assert.equal(res.status, 101)
  })
})
