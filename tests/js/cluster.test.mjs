// Several gateway nodes on one nats-server (Debian's 2.9.10), with real supabase-js clients on
// different nodes: Broadcast (client and REST) reaches every subscriber on every node exactly once and
// in each sender's order; Presence is the whole cluster's, including a node killed with -9, a node
// frozen with SIGSTOP past NODE_DOWN_AFTER_MS, a node that starts late, a node cut off from NATS
// (a partition) that heals, and nats-server restarted.
//
// Heartbeats are 250 ms and a node is down after 2,000 ms here, to keep the file short; the
// defaults are 1,000 / 5,000.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { startNats } from './lib/nats.mjs'
import { delay as sleep } from './lib/inbox.mjs'
import { keysOf as keys, presenceJoined } from './lib/presence-helpers.mjs'
import { startProxy } from './lib/proxy.mjs'

const DOWN_AFTER_MS = 2000
let nats
let secret
const nodes = []

async function node(name, natsUrl = nats.url) {
  const gw = await startGateway({
    secret,
    env: {
      CLUSTER_NATS_URL: natsUrl,
      NODE_NAME: name,
      NODE_HEARTBEAT_MS: '250',
      NODE_DOWN_AFTER_MS: String(DOWN_AFTER_MS),
    },
  })
  secret = gw.secret
  nodes.push(gw)
  return gw
}

before(async () => {
  nats = await startNats()
  await node('a')
  await node('b')
  await node('c')
})
after(async () => {
  await closeClients()
  await Promise.all(nodes.map((gw) => gw.stop()))
  await nats?.stop()
})

const room = (label) => `cluster-${label}-${randomUUID()}`
const client = (gw) => supabaseClient(gw, { realtime: { timeout: 5000 } })

/** Waits until every node has heard from `count` others. */
async function peersUp(gws, count, ms = 10_000) {
  const started = Date.now()
  for (;;) {
    const seen = await Promise.all(gws.map((gw) => gw.metric('realtime_cluster_peers')))
    if (seen.every((n) => n === count)) return
    if (Date.now() - started > ms) throw new Error(`peers seen ${seen}, wanted ${count} each`)
    await sleep(50)
  }
}


test('broadcasts from every node reach every subscriber on every node once, in each sender order', async () => {
  const [a, b, c] = nodes
  await peersUp([a, b, c], 2)
  const name = room('fanout')
  const config = { broadcast: { self: true, ack: true } }
  const subs = await Promise.all([a, b, c, a, b, c].map((gw) => joined(client(gw), name, { config })))
  const PER_SENDER = 50
  const senders = subs.slice(0, 3)
  await Promise.all(
    senders.map(async (s, i) => {
      for (let n = 0; n < PER_SENDER; n++) {
        const status = await s.channel.send({ type: 'broadcast', event: 'n', payload: { from: i, n } })
        assert.equal(status, 'ok', 'ack: true answers ok')
      }
    }),
  )
  const total = PER_SENDER * senders.length
  for (const [i, sub] of subs.entries()) {
    const got = await sub.broadcasts.until((items) => items.length >= total && items, 10_000, `subscriber ${i}: ${total}`)
    await sleep(200) // anything delivered twice would be here by now
    assert.equal(sub.broadcasts.length, total, `subscriber ${i}: exactly once`)
    for (let from = 0; from < senders.length; from++) {
      const order = got.filter((m) => m.payload.from === from).map((m) => m.payload.n)
      assert.deepEqual(order, [...Array(PER_SENDER).keys()], `subscriber ${i}: sender ${from} in order`)
    }
  }
})

test('self: false on a node still reaches the other nodes, and the sender does not get its own', async () => {
  const [a, b] = nodes
  const name = room('self')
  const sender = await joined(client(a), name, { config: { broadcast: { self: false } } })
  const remote = await joined(client(b), name, {})
  await sender.channel.send({ type: 'broadcast', event: 'hi', payload: { x: 1 } })
  await remote.broadcasts.find((m) => m.event === 'hi', 5000, 'the message on b')
  // b's marker reaches a after anything a could have got of its own
  await remote.channel.send({ type: 'broadcast', event: 'marker', payload: {} })
  await sender.broadcasts.find((m) => m.event === 'marker', 5000, "b's marker on a")
  assert.deepEqual(
    sender.broadcasts.items.map((m) => m.event),
    ['marker'],
  )
})

test('a 2 MB broadcast crosses nodes whole', async () => {
  const [a, b] = nodes
  const name = room('large')
  const sender = await joined(client(a), name, { config: { broadcast: { ack: true } } })
  const remote = await joined(client(b), name, {})
  const big = 'x'.repeat(2_000_000)
  assert.equal(await sender.channel.send({ type: 'broadcast', event: 'big', payload: { big } }), 'ok')
  const got = await remote.broadcasts.find((m) => m.event === 'big', 10_000, 'the 2 MB message on b')
  assert.equal(got.payload.big.length, big.length)
  assert.ok(got.payload.big === big, 'the same bytes')
})

test('a REST broadcast on one node reaches subscribers on the others once, and nothing else is told', async () => {
  const [a, b, c] = nodes
  const name = room('rest')
  const onA = await joined(client(a), name, {})
  const onC = await joined(client(c), name, {})
  const other = await joined(client(c), room('elsewhere'), {})
  const response = await fetch(`${b.url}/api/broadcast`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', apikey: b.serviceKey, authorization: `Bearer ${b.serviceKey}` },
    body: JSON.stringify({ messages: [{ topic: name, event: 'rest', payload: { via: 'b' } }] }),
  })
  assert.equal(response.status, 202)
  for (const sub of [onA, onC]) {
    const got = await sub.broadcasts.find((m) => m.event === 'rest', 5000, 'the REST message')
    assert.deepEqual(got.payload, { via: 'b' })
  }
  await sleep(300)
  assert.equal(onA.broadcasts.length, 1)
  assert.equal(onC.broadcasts.length, 1)
  assert.equal(other.broadcasts.length, 0, 'another topic hears nothing')
})

test('presence spans nodes: a joiner sees everyone, diffs cross, a node killed with -9 leaves within NODE_DOWN_AFTER_MS', async (t) => {
  const [a, b] = nodes
  await peersUp(nodes, nodes.length - 1)
  const victim = await node(`victim-${randomUUID().slice(0, 8)}`)
  await peersUp(nodes, nodes.length - 1)
  const name = room('presence')
  const onA = await presenceJoined(client(a), name, { key: 'on-a' })
  await onA.channel.track({ node: 'a' })
  const onVictim = await presenceJoined(client(victim), name, { key: 'on-victim' })
  await onVictim.channel.track({ node: 'victim' })
  const onB = await presenceJoined(client(b), name, { key: 'on-b' })
  await onB.channel.track({ node: 'b' })
  for (const [label, ch] of [['a', onA], ['b', onB], ['victim', onVictim]]) {
    await ch.untilState((s) => keys(s).length === 3, 5000, `${label} sees the three members`)
  }
  assert.deepEqual(onB.state()['on-a'].map((m) => m.node), ['a'])

  const killed = Date.now()
  victim.signal('SIGKILL')
  await victim.exited
  nodes.splice(nodes.indexOf(victim), 1)
  for (const [label, ch] of [['a', onA], ['b', onB]]) {
    await ch.untilState((s) => !('on-victim' in s), DOWN_AFTER_MS + 1500, `${label}: the killed node's member leaves`)
  }
  const took = Date.now() - killed
  assert.ok(took <= DOWN_AFTER_MS + 500, `left after ${took} ms`)
  t.diagnostic(`kill -9: the node's member left the others ${took} ms after the kill (NODE_DOWN_AFTER_MS ${DOWN_AFTER_MS})`)
  assert.deepEqual(keys(onA.state()), ['on-a', 'on-b'])
  assert.deepEqual(keys(onB.state()), ['on-a', 'on-b'])
})

test('a node frozen past NODE_DOWN_AFTER_MS is dropped, then converges again within 3 s of resuming, no ghosts', async (t) => {
  const [a, b] = nodes
  const frozen = await node(`frozen-${randomUUID().slice(0, 8)}`)
  await peersUp(nodes, nodes.length - 1)
  const name = room('freeze')
  const onA = await presenceJoined(client(a), name, { key: 'on-a' })
  await onA.channel.track({ node: 'a' })
  const onFrozen = await presenceJoined(client(frozen), name, { key: 'on-frozen' })
  await onFrozen.channel.track({ node: 'frozen' })
  await onA.untilState((s) => keys(s).length === 2, 5000, 'a sees both')
  await onFrozen.untilState((s) => keys(s).length === 2, 5000, 'frozen sees both')

  frozen.signal('SIGSTOP')
  await onA.untilState((s) => !('on-frozen' in s), DOWN_AFTER_MS + 2000, 'the frozen member leaves a')
  // While it is frozen a member comes and goes on b, another stays.
  const passing = await presenceJoined(client(b), name, { key: 'passing' })
  await passing.channel.track({ node: 'b' })
  await passing.channel.untrack()
  const onB = await presenceJoined(client(b), name, { key: 'on-b' })
  await onB.channel.track({ node: 'b' })
  await sleep(500)
  const resumed = Date.now()
  frozen.signal('SIGCONT')
  const want = ['on-a', 'on-b', 'on-frozen']
  for (const [label, ch] of [['a', onA], ['b', onB], ['frozen', onFrozen]]) {
    await ch.untilState((s) => keys(s).join() === want.join(), 3000, `${label} converges`)
  }
  const took = Date.now() - resumed
  assert.ok(took <= 3000, `converged ${took} ms after SIGCONT`)
  t.diagnostic(`SIGSTOP: converged ${took} ms after SIGCONT`)
  await sleep(DOWN_AFTER_MS) // no flap afterwards
  for (const ch of [onA, onB, onFrozen]) {
    assert.deepEqual(keys(ch.state()), want)
    for (const key of want) assert.equal(ch.state()[key].length, 1, `${key}: one meta, no ghost`)
  }
  await frozen.stop()
  nodes.splice(nodes.indexOf(frozen), 1)
  await onA.untilState((s) => !('on-frozen' in s), 3000, 'a clean stop leaves at once')
})

test('a node that starts late gets the whole state', async () => {
  const [a, b] = nodes
  const name = room('late')
  const onA = await presenceJoined(client(a), name, { key: 'on-a' })
  await onA.channel.track({ node: 'a' })
  const onB = await presenceJoined(client(b), name, { key: 'on-b' })
  await onB.channel.track({ node: 'b' })
  await onA.untilState((s) => keys(s).length === 2, 5000, 'a sees both')
  const late = await node(`late-${randomUUID().slice(0, 8)}`)
  await peersUp(nodes, nodes.length - 1)
  const onLate = await presenceJoined(client(late), name, { key: 'on-late' })
  await onLate.untilState((s) => keys(s).includes('on-a') && keys(s).includes('on-b'), 3000, 'the late node sees a and b')
  await late.stop()
  nodes.splice(nodes.indexOf(late), 1)
})

test('a partition that heals: each side drops the other within NODE_DOWN_AFTER_MS, then both converge, no ghosts', async (t) => {
  const [a, b] = nodes
  // p reaches NATS through a loopback proxy; cutting it leaves p's connection open and silent.
  const proxy = await startProxy(nats.port)
  const p = await node(`partitioned-${randomUUID().slice(0, 8)}`, `nats://127.0.0.1:${proxy.port}`)
  try {
    await peersUp(nodes, nodes.length - 1)
    const name = room('partition')
    const onA = await presenceJoined(client(a), name, { key: 'on-a' })
    await onA.channel.track({ node: 'a' })
    const onP = await presenceJoined(client(p), name, { key: 'on-p' })
    await onP.channel.track({ node: 'p' })
    await onA.untilState((s) => keys(s).join() === 'on-a,on-p', 5000, 'a sees p')
    await onP.untilState((s) => keys(s).join() === 'on-a,on-p', 5000, 'p sees a')

    const cut = Date.now()
    proxy.cut()
    proxy.hold()
    await Promise.all([
      onA.untilState((s) => !('on-p' in s), DOWN_AFTER_MS + 2000, "p's member leaves a"),
      onP.untilState((s) => !('on-a' in s), DOWN_AFTER_MS + 2000, "a's member leaves p"),
    ])
    const dropped = Date.now() - cut
    assert.ok(dropped <= DOWN_AFTER_MS + 1000, `both sides dropped the other after ${dropped} ms`)
    // While apart: a member comes and goes on b, another stays, and p's member changes.
    const passing = await presenceJoined(client(b), name, { key: 'passing' })
    await passing.channel.track({ node: 'b' })
    await passing.channel.untrack()
    const onB = await presenceJoined(client(b), name, { key: 'on-b' })
    await onB.channel.track({ node: 'b' })
    await onP.channel.track({ node: 'p', status: 'apart' })
    await sleep(500)

    const healed = Date.now()
    proxy.release()
    const want = 'on-a,on-b,on-p'
    for (const [label, ch] of [['a', onA], ['b', onB], ['p', onP]]) {
      await ch.untilState((s) => keys(s).join() === want, 15_000, `${label} converges after the heal`)
    }
    await onA.untilState((s) => s['on-p']?.[0]?.status === 'apart', 3000, "p's change made while apart reaches a")
    const converged = Date.now() - healed
    await sleep(DOWN_AFTER_MS) // no flap afterwards
    for (const ch of [onA, onB, onP]) {
      assert.equal(keys(ch.state()).join(), want)
      for (const key of want.split(',')) assert.equal(ch.state()[key].length, 1, `${key}: one meta, no ghost`)
    }
    // Broadcast crosses the healed link both ways.
    await onA.channel.send({ type: 'broadcast', event: 'healed', payload: { from: 'a' } })
    await onP.channel.send({ type: 'broadcast', event: 'healed', payload: { from: 'p' } })
    await onP.broadcasts.find((m) => m.event === 'healed' && m.payload.from === 'a', 5000, "a's broadcast on p")
    await onA.broadcasts.find((m) => m.event === 'healed' && m.payload.from === 'p', 5000, "p's broadcast on a")
    t.diagnostic(`partition: dropped on both sides ${dropped} ms after the cut; converged ${converged} ms after the heal`)
  } finally {
    await p.stop()
    nodes.splice(nodes.indexOf(p), 1)
    await proxy.stop()
  }
})

test('nats-server restarted: local delivery goes on, loss is counted, broadcast and presence come back', async () => {
  const [a, b] = nodes
  await peersUp([a, b], nodes.length - 1)
  const name = room('nats-restart')
  const local = await joined(client(a), name, {})
  const sender = await presenceJoined(client(a), name, { key: 'sender' })
  const remote = await presenceJoined(client(b), name, { key: 'remote' })
  await sender.channel.track({ node: 'a' })
  await remote.channel.track({ node: 'b' })
  await remote.untilState((s) => 'sender' in s, 5000, 'b sees a')
  await sender.untilState((s) => 'remote' in s, 5000, 'a sees b')

  await nats.stop()
  const until = Date.now() + 5000
  while ((await a.metric('realtime_cluster_connected')) !== 0) {
    if (Date.now() > until) throw new Error('a did not notice that NATS is gone')
    await sleep(50)
  }
  const droppedBefore = await a.metric('realtime_cluster_dropped_total')
  await sender.channel.send({ type: 'broadcast', event: 'during', payload: {} })
  await local.broadcasts.find((m) => m.event === 'during', 3000, 'local delivery during the outage')
  assert.ok((await a.metric('realtime_cluster_dropped_total')) > droppedBefore, 'the cross-node loss is counted')
  // Presence changes while the bus is away reach b once it is back.
  await sender.channel.track({ node: 'a', status: 'away' })

  await nats.start()
  await remote.untilState((s) => s.sender?.[0]?.status === 'away', 10_000, 'b gets the change made during the outage')
  const back = Date.now() + 10_000
  for (let i = 0; ; i++) {
    await sender.channel.send({ type: 'broadcast', event: 'after', payload: { i } })
    if (remote.broadcasts.items.some((m) => m.event === 'after')) break
    if (Date.now() > back) throw new Error('broadcast did not cross again after NATS came back')
    await sleep(200)
  }
  assert.ok(!remote.broadcasts.items.some((m) => m.event === 'during'), 'what was dropped is not delivered late')
  await sender.untilState((s) => keys(s).join() === 'remote,sender', 5000, 'a sees b again')
  assert.equal(keys(remote.state()).join(), 'remote,sender')
  for (const ch of [sender, remote]) {
    for (const key of ['remote', 'sender']) assert.equal(ch.state()[key].length, 1, `${key}: one meta`)
  }
})
