// Wire-level access for checks the clients hide: the HTTP answer to a refused upgrade, and raw frames.

import { randomBytes } from 'node:crypto'
import { request } from 'node:http'
import WebSocket from 'ws'
import { Inbox } from './inbox.mjs'

/**
 * Sends a WebSocket upgrade request and reports the server's answer without speaking WebSocket:
 * `{ status, headers, body }` (body '' for 101, after which the connection is dropped).
 */
export function rawUpgrade(gw, { path = '/realtime/v1/websocket', query = {}, headers = {} } = {}) {
  const qs = new URLSearchParams(query).toString()
  return new Promise((resolve, reject) => {
    const req = request({
      host: '127.0.0.1',
      agent: false, // one connection per upgrade attempt; never reuse a refused one
      port: gw.port,
      path: qs ? `${path}?${qs}` : path,
      headers: {
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': randomBytes(16).toString('base64'),
        ...headers,
      },
    })
    req.setTimeout(10_000, () => req.destroy(new Error('upgrade request timed out')))
    req.on('upgrade', (res, socket) => {
      socket.destroy()
      resolve({ status: res.statusCode, headers: res.headers, body: '' })
    })
    req.on('response', (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (chunk) => (body += chunk))
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

/**
 * A raw WebSocket to the gateway. Text frames are parsed as JSON (V2 arrays are turned into
 * `{join_ref, ref, topic, event, payload}` objects, keeping the raw text); binary frames arrive as
 * `{ binary: Buffer }`.
 */
export async function rawSocket(gw, { vsn = '2.0.0', key = gw.anonKey, path = '/realtime/v1/websocket' } = {}) {
  const params = new URLSearchParams({ apikey: key })
  if (vsn !== null) params.set('vsn', vsn)
  const ws = new WebSocket(`${gw.wsUrl}${path}?${params}`)
  const frames = new Inbox('raw frames')
  const closed = new Promise((resolve) => {
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }))
  })
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      frames.push({ binary: Buffer.from(data) })
      return
    }
    const text = data.toString('utf8')
    const value = JSON.parse(text)
    if (Array.isArray(value)) {
      const [join_ref, ref, topic, event, payload] = value
      frames.push({ join_ref, ref, topic, event, payload, text })
    } else {
      frames.push({ ...value, text })
    }
  })
  await new Promise((resolve, reject) => {
    ws.once('open', resolve)
    ws.once('error', reject)
  })
  let counter = 0
  return {
    ws,
    frames,
    closed,
    nextRef: () => String(++counter),
    /** Sends a V2 array frame (or a V1 object when the socket is V1). */
    send({ join_ref = null, ref = null, topic, event, payload }) {
      const frame =
        vsn && vsn.startsWith('2')
          ? [join_ref, ref, topic, event, payload]
          : { topic, event, payload, ref, ...(join_ref === null ? {} : { join_ref }) }
      ws.send(JSON.stringify(frame))
    },
    /** Closes from our side; a server that does not finish the close handshake gets the TCP cut. */
    async close() {
      ws.close()
      const timer = setTimeout(() => ws.terminate(), 2000)
      const result = await closed
      clearTimeout(timer)
      return result
    },
  }
}
