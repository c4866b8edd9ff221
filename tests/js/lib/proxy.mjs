// A loopback TCP proxy in front of the gateway, for drills that break a client's connection the way
// networks do: `cut()` stops forwarding on the connections open now, both ways, and keeps them open
// (nothing is closed, so only heartbeats can notice); `refuse(ms)` closes them and turns new ones
// away for a while; `hold()` turns new ones away, without closing any, until `release()`. New
// connections after a cut are forwarded as usual.

import { createServer, connect } from 'node:net'

/** Starts a proxy on a free 127.0.0.1 port forwarding to 127.0.0.1:`targetPort`. */
export async function startProxy(targetPort) {
  const pairs = new Set()
  let refuseUntil = 0
  const server = createServer((client) => {
    if (Date.now() < refuseUntil) {
      client.destroy()
      return
    }
    const upstream = connect(targetPort, '127.0.0.1')
    const pair = { client, upstream, cut: false }
    pairs.add(pair)
    const forward = (from, to) =>
      from.on('data', (chunk) => {
        if (!pair.cut) to.write(chunk)
      })
    forward(client, upstream)
    forward(upstream, client)
    const end = () => {
      pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on('error', end)
    upstream.on('error', end)
    client.on('close', end)
    upstream.on('close', end)
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address()
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    /** Connections open now. */
    get open() {
      return [...pairs].filter((p) => !p.cut).length
    },
    /** Stops forwarding on every open connection, silently: both sockets stay open. */
    cut() {
      for (const pair of pairs) {
        pair.cut = true
        // Stop reading too, so what the gateway writes piles up unread, as on a dead route.
        pair.client.pause()
        pair.upstream.pause()
      }
    },
    /** Closes every open connection and refuses new ones for `ms`. */
    refuse(ms) {
      refuseUntil = Date.now() + ms
      for (const pair of [...pairs]) {
        pair.client.end()
        pair.upstream.end()
      }
    },
    /** Turns new connections away, closing none, until `release()`. */
    hold() {
      refuseUntil = Infinity
    },
    release() {
      refuseUntil = 0
    },
    async stop() {
      for (const pair of [...pairs]) {
        pair.client.destroy()
        pair.upstream.destroy()
      }
      await new Promise((resolve) => server.close(resolve))
    },
  }
}
