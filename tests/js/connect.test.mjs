// Connecting: the anon key gets a socket and a SUBSCRIBED channel; bad, expired, unsigned and garbage
// keys are refused at the upgrade with HTTP 401 and a JSON body (protocol.md §1.5), and the client sees
// the failure as a channel error instead of ever subscribing.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { channel, closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { signJwt, startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'
import { rawUpgrade } from './lib/raw.mjs'
import WebSocket from 'ws'

let gw
before(async () => {
  gw = await startGateway({ env: { CONNECT_ERROR_BACKOFF_MS: '0' } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

const room = () => `connect-${randomUUID()}`

function badKeys() {
  const now = Math.floor(Date.now() / 1000)
  return {
    'bad signature': {
      key: signJwt('not-the-gateway-secret-not-the-gateway-1', { role: 'anon' }),
      error: 'Failed to validate JWT signature',
    },
    expired: {
      key: gw.sign({ role: 'anon', iat: now - 120, exp: now - 60 }),
      error: 'Token has expired',
    },
    'unsigned (alg none)': {
      key: gw.sign({ role: 'anon' }, { alg: 'none' }),
      // no signer exists for alg "none" (protocol.md §8.1 "anything else → signer error")
      error: 'Failed to generate JWT signer, check your JWT secret or JWKS configuration',
    },
    garbage: { key: 'this-is-not-a-jwt', error: 'The token provided is not a valid JWT' },
    'missing role': {
      key: gw.sign({ sub: 'user-1' }),
      error: 'Fields `role` and `exp` are required in JWT',
    },
    'missing exp': {
      key: gw.sign({ role: 'anon' }, { expiresIn: null }),
      error: 'Fields `role` and `exp` are required in JWT',
    },
  }
}

describe('a valid anon key', () => {
  test('the health endpoint answers 200 ok', async () => {
    const res = await fetch(`${gw.url}/healthcheck`)
    assert.equal(res.status, 200)
    assert.equal((await res.text()).trim(), 'ok')
  })

  test('supabase-js connects and the channel reaches SUBSCRIBED', async () => {
    const supabase = supabaseClient(gw)
    const { channel: ch } = await joined(supabase, room())
    assert.equal(ch.state, 'joined')
    assert.equal(supabase.realtime.isConnected(), true)
  })

  test('realtime-js 2.11 (V1) connects and the channel reaches SUBSCRIBED', async () => {
    const client = v1Client(gw)
    const { channel: ch } = await joined(client, room())
    assert.equal(ch.state, 'joined')
  })

  test('the raw upgrade is accepted on both paths, with the key in ?apikey or x-api-key', async () => {
    for (const path of ['/realtime/v1/websocket', '/socket/websocket']) {
      const res = await rawUpgrade(gw, { path, query: { apikey: gw.anonKey, vsn: '2.0.0' } })
      assert.equal(res.status, 101, `${path} with ?apikey`)
    }
    const viaHeader = await rawUpgrade(gw, {
      query: { vsn: '1.0.0' },
      headers: { 'x-api-key': gw.anonKey },
    })
    assert.equal(viaHeader.status, 101, 'x-api-key header')
    // the header wins over the query parameter (protocol.md §1.2)
    const headerWins = await rawUpgrade(gw, {
      query: { apikey: 'garbage', vsn: '2.0.0' },
      headers: { 'x-api-key': gw.anonKey },
    })
    assert.equal(headerWins.status, 101, 'x-api-key header beats a bad ?apikey')
  })

  test('vsn: missing means 1.0.0; 1.0.x and 2.0.x accepted; anything else 403 with an empty body', async () => {
    assert.equal((await rawUpgrade(gw, { query: { apikey: gw.anonKey } })).status, 101)
    assert.equal((await rawUpgrade(gw, { query: { apikey: gw.anonKey, vsn: '1.0.1' } })).status, 101)
    assert.equal((await rawUpgrade(gw, { query: { apikey: gw.anonKey, vsn: '2.0.3' } })).status, 101)
    for (const vsn of ['3.0.0', '2.1.0', 'banana']) {
      const res = await rawUpgrade(gw, { query: { apikey: gw.anonKey, vsn } })
      assert.equal(res.status, 403, `vsn=${vsn}`)
      assert.equal(res.body, '', `vsn=${vsn} body`)
    }
  })
})

describe('rejected keys', () => {
  test('no key at all: 401 {"error":"API key is missing"}', async () => {
    const res = await rawUpgrade(gw, { query: { vsn: '2.0.0' } })
    assert.equal(res.status, 401)
    assert.match(res.headers['content-type'] ?? '', /^application\/json/)
    assert.deepEqual(JSON.parse(res.body), { error: 'API key is missing' })
  })

  for (const name of ['bad signature', 'expired', 'unsigned (alg none)', 'garbage', 'missing role', 'missing exp']) {
    test(`${name}: the upgrade gets 401 with the reference's JSON error`, async () => {
      const { key, error } = badKeys()[name]
      const res = await rawUpgrade(gw, { query: { apikey: key, vsn: '2.0.0' } })
      assert.equal(res.status, 401, `status for ${name}; body ${res.body}`)
      assert.match(res.headers['content-type'] ?? '', /^application\/json/)
      assert.deepEqual(JSON.parse(res.body), { error })
    })
  }

  for (const name of ['bad signature', 'expired', 'unsigned (alg none)', 'garbage']) {
    test(`${name}: supabase-js sees CHANNEL_ERROR, retries, and never subscribes`, async () => {
      const { key } = badKeys()[name]
      // the app's transport is `ws`; this subclass only records what each attempt saw
      const attempts = new Inbox('connection attempts')
      class RecordingWebSocket extends WebSocket {
        constructor(...args) {
          super(...args)
          const attempt = { opened: false, error: null }
          attempts.push(attempt)
          this.on('open', () => (attempt.opened = true))
          this.on('error', (e) => (attempt.error = e.message))
        }
      }
      const supabase = supabaseClient(gw, {
        key,
        realtime: { transport: RecordingWebSocket, reconnectAfterMs: () => 100 },
      })
      const { statuses, channel: ch } = channel(supabase, room())
      const first = await statuses.find(() => true, 5000, 'a subscribe status')
      assert.equal(first.status, 'CHANNEL_ERROR')
      assert.ok(first.err instanceof Error, 'the callback gets an Error')
      // the client keeps reconnecting (protocol.md §1.5: the browser sees a failed socket, then backoff)
      const seen = await attempts.until(
        (items) => items.length >= 3 && items.slice(0, 2).every((a) => a.error) && items,
        5000,
        'three failed attempts',
      )
      for (const attempt of seen.slice(0, 2)) {
        assert.equal(attempt.opened, false)
        assert.match(attempt.error, /Unexpected server response: 401/)
      }
      assert.ok(!statuses.items.some((s) => s.status === 'SUBSCRIBED'))
      assert.notEqual(ch.state, 'joined')
      await supabase.removeChannel(ch)
      supabase.realtime.disconnect()
    })
  }

  test('expired: realtime-js 2.11 (V1) sees CHANNEL_ERROR and never subscribes', async () => {
    const { key } = badKeys().expired
    const client = v1Client(gw, { key, reconnectAfterMs: () => 200 })
    const { statuses } = channel(client, room())
    const first = await statuses.find(() => true, 5000, 'a subscribe status')
    assert.equal(first.status, 'CHANNEL_ERROR')
    assert.ok(!statuses.items.some((s) => s.status === 'SUBSCRIBED'))
    client.disconnect()
  })
})

test('the refusal waits CONNECT_ERROR_BACKOFF_MS before answering', async () => {
  const slow = await startGateway({ env: { CONNECT_ERROR_BACKOFF_MS: '600' } })
  try {
    const started = Date.now()
    const res = await rawUpgrade(slow, { query: { apikey: 'garbage', vsn: '2.0.0' } })
    const elapsed = Date.now() - started
    assert.equal(res.status, 401)
    assert.ok(elapsed >= 550, `answered after ${elapsed} ms, expected >= 600 ms`)
    // a good key is not delayed
    const okStarted = Date.now()
    assert.equal((await rawUpgrade(slow, { query: { apikey: slow.anonKey } })).status, 101)
    assert.ok(Date.now() - okStarted < 550, 'a valid key is accepted without the backoff')
  } finally {
    await slow.stop()
  }
})
