// Channel tokens over time (protocol.md §8.2, §3.5): a token refreshed with setAuth() keeps the channel
// alive past the old token's expiry; a token that is left to expire closes the channel with the system
// message `Token has expired N seconds ago` followed by phx_close (ref = join_ref), and the client
// reports CLOSED without rejoining. Refreshes are never answered.
//
// The tests wait on real JWT expiry (second granularity), so they run concurrently.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { channel, closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { rawSocket } from './lib/raw.mjs'

let gw
before(async () => {
  gw = await startGateway({ env: { CHANNEL_ERROR_BACKOFF_MS: '50' } })
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

const room = (label) => `auth-${label}-${randomUUID()}`
const EXPIRED = /^Token has expired \d+ seconds ago$/

/** A token for `role` that expires `seconds` from now (whole seconds, as JWT exp is). */
const tokenExpiringIn = (seconds, claims = {}) =>
  gw.sign({ role: 'authenticated', sub: randomUUID(), ...claims }, { expiresIn: seconds })

/**
 * supabase-js configured the way third-party-auth apps do: `accessToken` returns the current JWT.
 *
 * supabase-js hands the callback's first token to realtime asynchronously; a channel subscribed in the
 * same tick as createClient() joins without it (the join then falls back to the connect token) and the
 * token is never pushed afterwards, because it did not change. So, like a careful app, wait for realtime
 * auth before subscribing.
 */
async function appWithToken(initial) {
  const state = { token: initial }
  const supabase = supabaseClient(gw, { accessToken: async () => state.token, realtime: { timeout: 4000 } })
  await supabase.realtime.setAuth()
  return {
    supabase,
    async refresh(token) {
      state.token = token
      await supabase.realtime.setAuth(token)
    },
  }
}

function assertClosedByExpiry(sub, name) {
  const sys = sub.system.items.at(-1)
  assert.ok(sys, 'a system message arrived')
  assert.equal(sys.extension, 'system')
  assert.equal(sys.status, 'error')
  assert.match(sys.message, EXPIRED)
  assert.equal(sys.channel, name, 'system.channel is the sub_topic')
  assert.equal(sub.statuses.items.at(-1).status, 'CLOSED')
  assert.equal(sub.channel.state, 'closed')
}

describe('channel tokens', { concurrency: true }, () => {
  test('setAuth(newToken) before expiry keeps the channel; an unrefreshed twin is closed at its expiry', async () => {
    const name = room('refresh')
    // the refreshed channel's first token expires a second BEFORE the control's, so once the control is
    // closed the refreshed channel's old expiry has certainly passed
    const refreshed = await appWithToken(tokenExpiringIn(3))
    const control = await appWithToken(tokenExpiringIn(4))
    const r = await joined(refreshed.supabase, name, { config: { broadcast: { self: true, ack: true } } })
    const c = await joined(control.supabase, name)

    await refreshed.refresh(tokenExpiringIn(3600))

    await c.statuses.find((s) => s.status === 'CLOSED', 8000, 'the control channel to close at expiry')
    assertClosedByExpiry(c, name)

    assert.deepEqual(r.system.items, [], 'no system message on the refreshed channel')
    assert.deepEqual(r.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
    assert.equal(r.channel.state, 'joined')
    assert.equal(await r.channel.send({ type: 'broadcast', event: 'still', payload: { here: true } }), 'ok')
    await r.broadcasts.find((m) => m.event === 'still', 3000, 'own broadcast after the old expiry')
  })

  test('an expiring channel token: system "Token has expired N seconds ago", then CLOSED, no rejoin', async () => {
    const name = room('expire')
    const app = await appWithToken(tokenExpiringIn(2))
    const sub = await joined(app.supabase, name)
    const watcher = await joined(supabaseClient(gw), name) // connect token only, long-lived

    await sub.statuses.find((s) => s.status === 'CLOSED', 8000, 'CLOSED after expiry')
    assertClosedByExpiry(sub, name)
    assert.equal(sub.system.items.length, 1)
    assert.ok(
      !app.supabase.getChannels().includes(sub.channel),
      'the client dropped the closed channel instead of rejoining',
    )
    // the socket and other channels on the topic are unaffected
    assert.equal(app.supabase.realtime.isConnected(), true)
    assert.deepEqual(watcher.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
  })

  test('realtime-js 2.11 (V1) gets the system message and CLOSED too (phx_close ref = join_ref)', async () => {
    const name = room('expire-v1')
    const client = v1Client(gw)
    await client.setAuth(tokenExpiringIn(2))
    const sub = await joined(client, name)
    await sub.statuses.find((s) => s.status === 'CLOSED', 8000, 'CLOSED after expiry')
    assertClosedByExpiry(sub, name)
  })

  test('raw V2 frames: system error (join_ref, ref null), then phx_close with ref = join_ref', async () => {
    const name = room('raw')
    const topic = `realtime:${name}`
    const sock = await rawSocket(gw, { vsn: '2.0.0' })
    const config = { broadcast: { ack: true, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false }
    sock.send({ join_ref: '3', ref: '3', topic, event: 'phx_join', payload: { config, access_token: tokenExpiringIn(2) } })
    const reply = await sock.frames.find((f) => f.ref === '3', 3000, 'the join reply')
    assert.deepEqual(JSON.parse(reply.text), ['3', '3', topic, 'phx_reply', { status: 'ok', response: { postgres_changes: [] } }])

    // a refresh to the same token is never answered: the ack'd broadcast after it is the only reply
    sock.send({ join_ref: '3', ref: '4', topic, event: 'access_token', payload: { access_token: tokenExpiringIn(2) } })
    sock.send({ join_ref: '3', ref: '5', topic, event: 'broadcast', payload: { type: 'broadcast', event: 'e', payload: {} } })
    await sock.frames.find((f) => f.ref === '5', 3000, 'the broadcast ack')
    assert.ok(!sock.frames.items.some((f) => f.ref === '4'), 'access_token got a reply')

    const close = await sock.frames.find((f) => f.event === 'phx_close', 8000, 'phx_close')
    const sys = sock.frames.items.find((f) => f.event === 'system')
    assert.ok(sys, 'a system frame came before phx_close')
    assert.ok(sock.frames.items.indexOf(sys) < sock.frames.items.indexOf(close))
    const [jr, ref, t, ev, payload] = JSON.parse(sys.text)
    assert.deepEqual([jr, ref, t, ev], ['3', null, topic, 'system'])
    assert.equal(payload.extension, 'system')
    assert.equal(payload.status, 'error')
    assert.equal(payload.channel, name)
    assert.match(payload.message, EXPIRED)
    assert.deepEqual(JSON.parse(close.text), ['3', '3', topic, 'phx_close', {}])
    await sock.close()
  })

  test('setAuth() with an already expired token closes the channel the same way', async () => {
    const name = room('set-expired')
    const app = await appWithToken(tokenExpiringIn(3600))
    const sub = await joined(app.supabase, name)
    const now = Math.floor(Date.now() / 1000)
    await app.refresh(gw.sign({ role: 'authenticated', iat: now - 100, exp: now - 30 }))
    await sub.statuses.find((s) => s.status === 'CLOSED', 5000, 'CLOSED after the expired refresh')
    assertClosedByExpiry(sub, name)
  })

  test('setAuth() with a token that is not a JWT closes the channel', async () => {
    const name = room('set-garbage')
    const app = await appWithToken(tokenExpiringIn(3600))
    const sub = await joined(app.supabase, name)
    await app.refresh('not-a-jwt')
    await sub.statuses.find((s) => s.status === 'CLOSED', 5000, 'CLOSED after the bad refresh')
    const sys = sub.system.items.at(-1)
    assert.equal(sys?.status, 'error')
    assert.equal(sys.message, 'The token provided is not a valid JWT')
  })

  test('joining with an expired channel token fails with InvalidJWTToken', async () => {
    const name = room('join-expired')
    const now = Math.floor(Date.now() / 1000)
    const app = await appWithToken(gw.sign({ role: 'authenticated', iat: now - 100, exp: now - 30 }))
    const { statuses, channel: ch } = channel(app.supabase, name)
    const first = await statuses.find(() => true, 5000, 'a subscribe status')
    assert.equal(first.status, 'CHANNEL_ERROR')
    assert.match(first.err.message, /^InvalidJWTToken: Token has expired \d+ seconds ago$/)
    await app.supabase.removeChannel(ch)
  })
})
