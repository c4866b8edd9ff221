// Gateway nodes on a NATS cluster of three nats-servers (routes between them), as the README
// tells production to run: nodes on different servers share Broadcast and Presence through the
// routes, and when the server a node is connected to is killed, the node moves to another one in
// its CLUSTER_NATS_URL and everything crosses again, with no ghost and nothing twice.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { freePort, startGateway } from './lib/gateway.mjs'
import { startNats } from './lib/nats.mjs'
import { delay as sleep } from './lib/inbox.mjs'
import { keysOf as keys, presenceJoined } from './lib/presence-helpers.mjs'

const DOWN_AFTER_MS = 2000
const servers = []
const nodes = {}
let secret

before(async () => {
  const routes = [await freePort(), await freePort(), await freePort()]
  for (const [i, route] of routes.entries()) {
    servers.push(await startNats({ name: `n${i + 1}`, route, routes, monitor: await freePort() }))
  }
  const url = (...indexes) => indexes.map((i) => servers[i].url).join(',')
  // a and b may fail over; c stays on n3, so a and b are on another server than c.
  for (const [name, urls] of [['a', url(0, 1)], ['b', url(1, 0)], ['c', url(2)]]) {
    const gw = await startGateway({
      secret,
      env: {
        CLUSTER_NATS_URL: urls,
        NODE_NAME: name,
        NODE_HEARTBEAT_MS: '250',
        NODE_DOWN_AFTER_MS: String(DOWN_AFTER_MS),
      },
    })
    secret = gw.secret
    nodes[name] = gw
  }
})
after(async () => {
  await closeClients()
  await Promise.all(Object.values(nodes).map((gw) => gw.stop()))
  await Promise.all(servers.map((s) => s.stop()))
})

const client = (gw) => supabaseClient(gw, { realtime: { timeout: 5000 } })

async function until(what, check, ms) {
  const started = Date.now()
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() - started > ms) throw new Error(`timed out: ${what}`)
    await sleep(50)
  }
}

/** The number (1–3) of the server node `name` is connected to, or 0. */
async function serverOf(name) {
  const lists = await Promise.all(servers.map((s) => s.connections().catch(() => [])))
  return lists.findIndex((names) => names.includes(`realtime-gateway ${name}`)) + 1
}

/** Sends from `from` until `to` has it: subscriptions spread through the routes asynchronously. */
async function crosses(from, to, event, ms = 10_000) {
  const started = Date.now()
  for (let i = 0; ; i++) {
    await from.channel.send({ type: 'broadcast', event, payload: { i } })
    if (to.broadcasts.items.some((m) => m.event === event)) return
    if (Date.now() - started > ms) throw new Error(`${event} did not cross`)
    await sleep(100)
  }
}

test('nodes on different servers of a NATS cluster share broadcasts and presence; a killed server is left for another', async (t) => {
  const { a, b, c } = nodes
  await until(
    'every node sees the other two',
    async () => (await Promise.all([a, b, c].map((gw) => gw.metric('realtime_cluster_peers')))).every((n) => n === 2),
    15_000,
  )
  const first = await until('a is connected to a server', () => serverOf('a'), 5000)
  assert.equal(await serverOf('c'), 3, 'c is on n3')
  assert.notEqual(first, 3, 'a is on another server than c')

  const name = `nats-cluster-${randomUUID()}`
  const chans = {}
  for (const key of ['a', 'b', 'c']) {
    chans[key] = await presenceJoined(client(nodes[key]), name, { key: `on-${key}` })
    await chans[key].channel.track({ node: key })
  }
  const want = 'on-a,on-b,on-c'
  for (const [key, ch] of Object.entries(chans)) {
    await ch.untilState((s) => keys(s).join() === want, 10_000, `${key} sees everyone`)
  }
  // Exactly once through the routes, in order.
  const counted = await joined(client(c), name, {})
  const sender = await joined(client(a), name, { config: { broadcast: { ack: true } } })
  await crosses(sender, counted, 'warmup')
  for (let n = 0; n < 50; n++) {
    assert.equal(await sender.channel.send({ type: 'broadcast', event: 'n', payload: { n } }), 'ok')
  }
  await counted.broadcasts.until((items) => items.filter((m) => m.event === 'n').length >= 50, 5000, 'the 50 on c')
  await sleep(300)
  assert.deepEqual(
    counted.broadcasts.items.filter((m) => m.event === 'n').map((m) => m.payload.n),
    [...Array(50).keys()],
    'once each, in order, on the node of another server',
  )

  // The server a is on goes away: a moves to the other one in its list.
  const killed = Date.now()
  await servers[first - 1].stop()
  await until(
    'a connects to another server',
    async () => {
      const now = await serverOf('a')
      return now !== 0 && now !== first && (await a.metric('realtime_cluster_connected')) === 1
    },
    15_000,
  )
  const moved = Date.now() - killed
  await crosses(chans.a, chans.c, 'after-a')
  await crosses(chans.c, chans.a, 'after-c')
  await chans.a.channel.track({ node: 'a', moved: true })
  await chans.c.untilState((s) => s['on-a']?.[0]?.moved === true, 10_000, "a's change after the move reaches c")
  await sleep(DOWN_AFTER_MS) // a node dropped while it moved would be back by now, or gone
  for (const [key, ch] of Object.entries(chans)) {
    assert.equal(keys(ch.state()).join(), want, `${key}: everyone, nobody else`)
    for (const k of want.split(',')) assert.equal(ch.state()[k].length, 1, `${key}: ${k} once`)
  }
  t.diagnostic(`a was on n${first}; connected to another server ${moved} ms after it was killed`)
})
