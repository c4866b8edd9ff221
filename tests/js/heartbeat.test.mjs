// Heartbeats: the server answers `phoenix`/`heartbeat` with phx_reply ok {} (protocol.md §3.2), a client
// that heartbeats keeps its socket and channel well past the idle timeout, and a socket that stays silent
// is closed once the idle timeout passes (§1.6) — which is what makes the first half meaningful.
//
// The gateway runs with WEBSOCKET_IDLE_TIMEOUT_MS=3000 and the client heartbeats every 1000 ms.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { Inbox, within } from './lib/inbox.mjs'
import { rawSocket } from './lib/raw.mjs'

const IDLE_MS = 3000

let gw
before(async () => {
  gw = await startGateway({ env: { WEBSOCKET_IDLE_TIMEOUT_MS: String(IDLE_MS) } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

test('V2 heartbeat gets [null, ref, "phoenix", "phx_reply", {status: ok, response: {}}]', async () => {
  const sock = await rawSocket(gw, { vsn: '2.0.0' })
  sock.send({ ref: '17', topic: 'phoenix', event: 'heartbeat', payload: {} })
  const reply = await sock.frames.find((f) => f.ref === '17', 2000, 'the heartbeat reply')
  assert.deepEqual(JSON.parse(reply.text), [null, '17', 'phoenix', 'phx_reply', { status: 'ok', response: {} }])
  await sock.close()
})

test('V1 heartbeat gets {topic: phoenix, event: phx_reply, payload: {status: ok, response: {}}, ref}', async () => {
  const sock = await rawSocket(gw, { vsn: '1.0.0' })
  sock.send({ ref: '5', topic: 'phoenix', event: 'heartbeat', payload: {} })
  const reply = await sock.frames.find((f) => f.ref === '5', 2000, 'the heartbeat reply')
  const { text, ...frame } = reply
  assert.deepEqual(frame, {
    topic: 'phoenix',
    event: 'phx_reply',
    payload: { status: 'ok', response: {} },
    ref: '5',
  })
  assert.ok(!('join_ref' in JSON.parse(text)), 'the V1 serializer never emits join_ref')
  await sock.close()
})

test('heartbeating clients keep socket and channel past several idle timeouts; a silent socket is closed', async () => {
  // the control: a socket that never sends anything must be closed by the server
  const silent = await rawSocket(gw, { vsn: '2.0.0' })
  const silentOpened = Date.now()
  const silentClosed = silent.closed.then((close) => ({ ...close, after: Date.now() - silentOpened }))

  const beats = new Inbox('heartbeat statuses')
  const supabase = supabaseClient(gw, {
    realtime: { heartbeatIntervalMs: 1000, heartbeatCallback: (status) => beats.push(status) },
  })
  const room = `heartbeat-${randomUUID()}`
  const v2 = await joined(supabase, room, { config: { broadcast: { self: true, ack: true } } })

  const old = v1Client(gw, { heartbeatIntervalMs: 1000 })
  const v1 = await joined(old, room)
  const v1Beats = new Inbox('V1 heartbeat statuses')
  old.onHeartbeat((status) => v1Beats.push(status))

  // 7 answered heartbeats at 1 s intervals span more than two idle timeouts
  await beats.until((items) => items.filter((s) => s === 'ok').length >= 7, 15_000, '7 answered heartbeats')
  const bad = beats.items.filter((s) => s !== 'ok' && s !== 'sent')
  assert.deepEqual(bad, [], 'no heartbeat timed out, errored, or found the socket disconnected')
  assert.equal(supabase.realtime.isConnected(), true)
  assert.deepEqual(
    v2.statuses.items.map((s) => s.status),
    ['SUBSCRIBED'],
    'the channel never errored or rejoined',
  )
  await v1Beats.until((items) => items.filter((s) => s === 'ok').length >= 5, 5000, '5 answered V1 heartbeats')
  assert.deepEqual(v1Beats.items.filter((s) => s !== 'ok' && s !== 'sent'), [], 'V1 heartbeats all answered')
  assert.equal(old.isConnected(), true)
  assert.deepEqual(v1.statuses.items.map((s) => s.status), ['SUBSCRIBED'])

  // both channels still carry traffic
  assert.equal(await v2.channel.send({ type: 'broadcast', event: 'alive', payload: { n: 1 } }), 'ok')
  await v2.broadcasts.find((m) => m.event === 'alive', 2000, 'own broadcast (self: true)')
  await v1.broadcasts.find((m) => m.event === 'alive', 2000, 'the broadcast on the V1 client')

  const close = await within(silentClosed, IDLE_MS + 5000, 'the server to close the silent socket')
  assert.ok(
    close.after >= IDLE_MS - 500 && close.after <= IDLE_MS + 3000,
    `silent socket closed after ${close.after} ms, idle timeout is ${IDLE_MS} ms`,
  )
})
