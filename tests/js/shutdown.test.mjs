// Graceful shutdown (issue 2, gateway): on SIGTERM or SIGINT every socket gets a WebSocket close frame
// (not a dropped TCP connection, which ws reports as 1006), and the process exits 0 within its deadline.
// An idle keep-alive HTTP connection (what every HTTP client pool leaves behind) must not hold the exit
// until that deadline.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { connect } from 'node:net'
import { after, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { within } from './lib/inbox.mjs'
import { rawSocket } from './lib/raw.mjs'

after(closeClients)

for (const signal of ['SIGTERM', 'SIGINT']) {
  test(`${signal}: joined sockets get a close frame and the gateway exits 0`, async () => {
    const gw = await startGateway()
    try {
      const supabase = supabaseClient(gw, { realtime: { reconnectAfterMs: () => 60_000 } })
      const sub = await joined(supabase, `shutdown-${randomUUID()}`)
      const v2 = await rawSocket(gw, { vsn: '2.0.0' })
      const v1 = await rawSocket(gw, { vsn: '1.0.0' })
      v2.send({ join_ref: '1', ref: '1', topic: 'realtime:shutdown', event: 'phx_join', payload: { config: {} } })
      await v2.frames.find((f) => f.ref === '1', 3000, 'the raw join reply')

      const started = Date.now()
      gw.signal(signal)
      const status = await within(gw.exited, 15_000, `the gateway to exit after ${signal}`)
      assert.deepEqual({ code: status.code, signal: status.signal }, { code: 0, signal: null }, `exit after ${signal}`)
      for (const [label, sock] of [['V2', v2], ['V1', v1]]) {
        const close = await within(sock.closed, 3000, `the ${label} socket to close`)
        assert.ok([1000, 1001, 1012].includes(close.code), `${label} socket closed with ${close.code} ${close.reason}`)
      }
      await sub.statuses.find((s) => s.status === 'CHANNEL_ERROR', 3000, 'the supabase-js channel to notice')
      assert.ok(Date.now() - started < 15_000)
    } finally {
      await gw.stop()
    }
  })
}

test('an idle keep-alive HTTP connection does not hold up the exit', async () => {
  const gw = await startGateway()
  try {
    const tcp = connect(gw.port, '127.0.0.1')
    await new Promise((resolve, reject) => {
      tcp.once('connect', resolve)
      tcp.once('error', reject)
    })
    const serverClosed = new Promise((resolve) => tcp.once('close', resolve))
    tcp.on('error', () => {})
    tcp.write('GET /healthcheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
    const head = await within(new Promise((resolve) => tcp.once('data', (d) => resolve(d.toString()))), 3000, 'the response')
    assert.match(head, /^HTTP\/1\.1 200/)
    // the connection is now idle, kept alive by HTTP/1.1 default
    const started = Date.now()
    gw.signal('SIGTERM')
    const status = await within(gw.exited, 15_000, 'the gateway to exit')
    const elapsed = Date.now() - started
    assert.equal(status.code, 0)
    assert.ok(elapsed < 3000, `exit took ${elapsed} ms with one idle keep-alive connection open`)
    await within(serverClosed, 1000, 'the server to close the idle connection')
  } finally {
    await gw.stop()
  }
})
