// REST broadcast (protocol.md §5.4): the batch endpoint POST /api/broadcast, authenticated by the apikey
// header or Authorization: Bearer, answers 202 and reaches subscribers; the per-event endpoint that
// realtime-js httpSend() uses does the same (percent-encoded topic, binary bodies); bad credentials 401.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { signJwt, startGateway } from './lib/gateway.mjs'
import { UNICODE_PAYLOAD } from './lib/payloads.mjs'

let gw
before(async () => {
  gw = await startGateway({ env: { MAX_PAYLOAD_SIZE_IN_KB: '100' } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

const room = (label) => `rest-${label}-${randomUUID()}`

function post(path, { headers = {}, body, json = true } = {}) {
  return fetch(`${gw.url}${path}`, {
    method: 'POST',
    headers: json ? { 'Content-Type': 'application/json', ...headers } : headers,
    body: json ? JSON.stringify(body) : body,
  })
}

test('POST /realtime/v1/api/broadcast with the apikey header: 202, and V2 and V1 subscribers get it', async () => {
  const name = room('apikey')
  const v2 = await joined(supabaseClient(gw), name)
  const v1 = await joined(v1Client(gw), name)
  const res = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ topic: name, event: 'rest', payload: { via: 'apikey', u: UNICODE_PAYLOAD } }] },
  })
  assert.equal(res.status, 202, await res.clone().text())
  assert.equal(await res.text(), '')
  for (const sub of [v2, v1]) {
    const got = await sub.broadcasts.find((m) => m.event === 'rest', 3000, 'the REST message')
    assert.equal(got.type, 'broadcast')
    assert.deepEqual(got.payload, { via: 'apikey', u: UNICODE_PAYLOAD })
  }
})

test('POST /api/broadcast with Authorization: Bearer only: 202, several messages in order', async () => {
  const name = room('bearer')
  const other = room('bearer-other')
  const sub = await joined(supabaseClient(gw), name)
  const res = await post('/api/broadcast', {
    headers: { Authorization: `Bearer ${gw.serviceKey}` },
    body: {
      messages: [
        { topic: name, event: 'm', payload: { i: 1 } },
        { topic: other, event: 'm', payload: { i: 'elsewhere' } },
        { topic: name, event: 'm', payload: { i: 2 } },
        { topic: name, event: 'm', payload: { i: 3 }, private: false },
      ],
    },
  })
  assert.equal(res.status, 202, await res.clone().text())
  const got = await sub.broadcasts.count(3, 3000, 'three messages')
  assert.deepEqual(got.map((m) => m.payload), [{ i: 1 }, { i: 2 }, { i: 3 }])
})

test('REST broadcast without valid credentials is refused with 401 and nothing is delivered', async () => {
  const name = room('unauth')
  const sub = await joined(supabaseClient(gw), name)
  const body = { messages: [{ topic: name, event: 'nope', payload: {} }] }
  const now = Math.floor(Date.now() / 1000)
  const cases = {
    'no credentials': {},
    'garbage apikey': { apikey: 'garbage' },
    'bad signature': { apikey: signJwt('some-other-secret-some-other-secret-1234', { role: 'anon' }) },
    'expired bearer': { Authorization: `Bearer ${gw.sign({ role: 'anon', iat: now - 99, exp: now - 9 })}` },
    'no role': { apikey: gw.sign({ sub: 'x' }) },
  }
  for (const [label, headers] of Object.entries(cases)) {
    const res = await post('/realtime/v1/api/broadcast', { headers, body })
    assert.equal(res.status, 401, `${label}: ${await res.clone().text()}`)
    assert.deepEqual(await res.json(), { message: 'Unauthorized' }, label)
  }
  // marker through the front door; it must be the only thing the subscriber saw
  const ok = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ topic: name, event: 'marker', payload: {} }] },
  })
  assert.equal(ok.status, 202)
  await sub.broadcasts.find((m) => m.event === 'marker', 3000, 'the marker')
  assert.deepEqual(sub.broadcasts.items.map((m) => m.event), ['marker'])
})

test('a batch message without a topic gets 422', async () => {
  const res = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ event: 'no-topic', payload: {} }] },
  })
  assert.equal(res.status, 422, await res.clone().text())
})

test('payloads over MAX_PAYLOAD_SIZE_IN_KB or not objects get 422 with field errors, and are not delivered', async () => {
  const name = room('cap')
  const sub = await joined(supabaseClient(gw), name)
  const big = { blob: 'x'.repeat(150_000) } // cap is 100 KB here
  const batch = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ topic: name, event: 'big', payload: big }] },
  })
  assert.equal(batch.status, 422)
  assert.deepEqual(await batch.json(), { errors: { messages: [{ payload: ['Payload size exceeds tenant limit'] }] } })
  const single = await post(`/realtime/v1/api/broadcast/${encodeURIComponent(name)}/events/big`, {
    headers: { apikey: gw.anonKey },
    body: big,
  })
  assert.equal(single.status, 422, await single.clone().text())
  const notObject = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ topic: name, event: 'str', payload: 'just a string' }] },
  })
  assert.equal(notObject.status, 422)
  const marker = await post('/realtime/v1/api/broadcast', {
    headers: { apikey: gw.anonKey },
    body: { messages: [{ topic: name, event: 'marker', payload: {} }] },
  })
  assert.equal(marker.status, 202)
  await sub.broadcasts.find((m) => m.event === 'marker', 3000, 'the marker')
  assert.deepEqual(sub.broadcasts.items.map((m) => m.event), ['marker'])
})

test('channel.httpSend() posts to the per-event endpoint: success, V2 and V1 subscribers get it', async () => {
  const name = room('httpsend')
  const sender = supabaseClient(gw)
  const v2 = await joined(supabaseClient(gw), name)
  const v1 = await joined(v1Client(gw), name)
  // the sender need not be subscribed
  const ch = sender.channel(name)
  const result = await ch.httpSend('via-http', { n: 1, u: UNICODE_PAYLOAD })
  assert.deepEqual(result, { success: true })
  for (const sub of [v2, v1]) {
    const got = await sub.broadcasts.find((m) => m.event === 'via-http', 3000, 'the httpSend message')
    assert.equal(got.type, 'broadcast')
    assert.deepEqual(got.payload, { n: 1, u: UNICODE_PAYLOAD })
  }
})

test('httpSend() on a topic with a space and a slash (percent-encoded path segments)', async () => {
  const name = `room 1/x-${randomUUID()}`
  const sub = await joined(supabaseClient(gw), name)
  const result = await supabaseClient(gw).channel(name).httpSend('ev t/2', { a: 2 })
  assert.deepEqual(result, { success: true })
  const got = await sub.broadcasts.find((m) => m.event === 'ev t/2', 3000, 'the message')
  assert.deepEqual(got.payload, { a: 2 })
})

test('httpSend() with a binary payload reaches a V2 subscriber as bytes', async () => {
  const name = room('binary')
  const sub = await joined(supabaseClient(gw), name)
  const bytes = new Uint8Array([0, 1, 2, 253, 254, 255])
  const result = await supabaseClient(gw).channel(name).httpSend('bin', bytes)
  assert.deepEqual(result, { success: true })
  const got = await sub.broadcasts.find((m) => m.event === 'bin', 3000, 'the binary message')
  assert.ok(got.payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(got.payload)}`)
  assert.deepEqual([...new Uint8Array(got.payload)], [...bytes])
})

test('raw per-event POST: 202 with apikey or Bearer, 401 without, 415 for another content type', async () => {
  const name = room('single')
  const sub = await joined(supabaseClient(gw), name)
  const path = `/api/broadcast/${encodeURIComponent(name)}/events/single`
  const a = await post(path, { headers: { apikey: gw.anonKey }, body: { k: 'apikey' } })
  assert.equal(a.status, 202, await a.clone().text())
  const b = await post(`/realtime/v1${path}`, { headers: { Authorization: `Bearer ${gw.anonKey}` }, body: { k: 'bearer' } })
  assert.equal(b.status, 202, await b.clone().text())
  const got = await sub.broadcasts.count(2, 3000, 'two messages')
  assert.deepEqual(got.map((m) => m.payload), [{ k: 'apikey' }, { k: 'bearer' }])

  const noAuth = await post(path, { body: { k: 'none' } })
  assert.equal(noAuth.status, 401)
  const wrongType = await post(path, {
    json: false,
    headers: { apikey: gw.anonKey, 'Content-Type': 'text/plain' },
    body: 'hello',
  })
  assert.equal(wrongType.status, 415)
  assert.deepEqual(await wrongType.json(), {
    error: 'Unsupported Media Type. Use application/json or application/octet-stream',
  })
})

test('send() on a channel that is not joined falls back to the batch endpoint', async () => {
  const name = room('fallback')
  const sub = await joined(supabaseClient(gw), name)
  const sender = supabaseClient(gw, { realtime: { logger: () => {} } }) // silence the deprecation warning
  const result = await sender.channel(name).send({ type: 'broadcast', event: 'fb', payload: { x: 1 } })
  assert.equal(result, 'ok')
  const got = await sub.broadcasts.find((m) => m.event === 'fb', 3000, 'the fallback message')
  assert.deepEqual(got.payload, { x: 1 })
})
