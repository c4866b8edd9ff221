// Presence with the real clients (protocol.md §6, issue 3): track/untrack, the sync/join/leave events,
// presenceState() shape, shared keys, re-tracks, leaves on untrack / removeChannel / disconnect / a killed
// socket / a silent socket / a duplicate join, late joiners, a 50-member room, rapid typing-indicator
// re-tracks, the per-channel rate limit, a V1 (realtime-js 2.11) client that only gets presence with
// PRESENCE_ENABLED, and a few wire-level checks the clients hide (frame order, phx_ref_prev, when
// presence_state is sent). The 200-member measurement lives in bench/presence-200.mjs.
//
// Four gateways: `gw` with the defaults (5 presence calls per 30 s), `fast` with CLIENT_PRESENCE_MAX_CALLS
// raised for the typing test, `legacy` with PRESENCE_ENABLED=true, and `idle` with a 2 s idle timeout.
// Every wait is on an event (a sync, a join, a leave, a status, a frame) with a deadline; absence is shown
// with a marker that travels the same path after the thing that must not arrive.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { delay } from './lib/inbox.mjs'
import { bare, closeAll, keysOf, metasOf, presenceJoined, wsOf } from './lib/presence-helpers.mjs'
import { rawSocket } from './lib/raw.mjs'

const IDLE_MS = 2000

let gw, fast, legacy, idle
before(async () => {
  ;[gw, fast, legacy, idle] = await Promise.all([
    startGateway(),
    startGateway({ env: { CLIENT_PRESENCE_MAX_CALLS: '1000' } }),
    startGateway({ env: { PRESENCE_ENABLED: 'true' } }),
    startGateway({ env: { WEBSOCKET_IDLE_TIMEOUT_MS: String(IDLE_MS) } }),
  ])
})
after(async () => {
  await closeClients()
  await Promise.all([gw, fast, legacy, idle].map((g) => g?.stop()))
})

const room = (label) => `presence-${label}-${randomUUID()}`
const client = (g = gw, realtime = {}) => supabaseClient(g, { realtime: { timeout: 4000, ...realtime } })
/** A member on its own socket. */
const member = (name, key, options = {}) => presenceJoined(client(options.gw, options.realtime), name, { key, ...options })

const isRef = (value) => typeof value === 'string' && value.length > 0

test('track → the other member gets join and sync carrying the meta', async () => {
  const name = room('track')
  const alice = await member(name, 'alice')
  const bob = await member(name, 'bob')
  // presence.enabled was sent (listener registered), so presence_state gives an initial, empty sync
  await bob.syncs.count(1, 3000, 'the sync from presence_state')
  assert.deepEqual(bob.state(), {})

  const meta = { user_id: 'alice', online_at: '2026-01-01T00:00:00Z', tags: ['a', 'é'], nested: { n: 1, ok: true } }
  assert.equal(await alice.channel.track(meta), 'ok')

  const join = await bob.joins.find((j) => j.key === 'alice', 3000, "alice's join on bob")
  assert.equal(join.event, 'join')
  assert.deepEqual(join.currentPresences, [], 'alice was not present before')
  assert.equal(join.newPresences.length, 1)
  assert.deepEqual(bare(join.newPresences[0]), meta)
  assert.ok(isRef(join.newPresences[0].presence_ref), `presence_ref ${join.newPresences[0].presence_ref}`)

  const state = await bob.untilState((s) => s.alice, 3000, 'alice in bob’s state (a sync after the join)')
  assert.ok(bob.syncs.length >= 2, 'presence_state sync, then the diff sync')
  assert.deepEqual(metasOf(state, 'alice'), [meta])
  assert.deepEqual(bob.leaves.items, [])
})

test('presenceState() is {key: [{...meta, presence_ref}]} with phx_ref / phx_ref_prev / metas removed', async () => {
  const name = room('shape')
  const u1 = await member(name, 'user-1')
  const u2 = await member(name, 'user-2')
  const watcher = await member(name, 'watcher')
  assert.equal(await u1.channel.track({ online_at: 'x' }), 'ok')
  assert.equal(await u2.channel.track({ n: 2 }), 'ok')
  // a re-track makes the server send phx_ref_prev, which must not leak into presenceState()
  assert.equal(await u2.channel.track({ n: 3 }), 'ok')

  const state = await watcher.untilState(
    (s) => s['user-1'] && s['user-2']?.[0]?.n === 3,
    3000,
    'user-1 and user-2 (n = 3)',
  )
  assert.deepEqual(keysOf(state), ['user-1', 'user-2'], 'watcher never tracked, so it is not a key')
  for (const key of ['user-1', 'user-2']) {
    assert.ok(Array.isArray(state[key]), `${key} maps to an array`)
    assert.equal(state[key].length, 1)
  }
  const [p1] = state['user-1']
  const [p2] = state['user-2']
  assert.deepEqual(Object.keys(p1).sort(), ['online_at', 'presence_ref'])
  assert.deepEqual(Object.keys(p2).sort(), ['n', 'presence_ref'])
  assert.ok(isRef(p1.presence_ref) && isRef(p2.presence_ref))
  assert.notEqual(p1.presence_ref, p2.presence_ref)
  assert.deepEqual(state, {
    'user-1': [{ online_at: 'x', presence_ref: p1.presence_ref }],
    'user-2': [{ n: 3, presence_ref: p2.presence_ref }],
  })
})

test('own presence is visible to self (the tracker gets its own join and sees itself)', async () => {
  const name = room('self')
  const me = await member(name, 'me')
  const other = await member(name, 'other')
  assert.equal(await me.channel.track({ status: 'online' }), 'ok')

  const own = await me.joins.find((j) => j.key === 'me', 3000, 'my own join')
  assert.deepEqual(own.newPresences.map(bare), [{ status: 'online' }])
  const mine = await me.untilState((s) => s.me, 3000, 'myself in my state')
  const theirs = await other.untilState((s) => s.me, 3000, 'me in the other state')
  assert.deepEqual(mine, theirs, 'both views agree, presence_ref included')
  assert.deepEqual(keysOf(mine), ['me'])
})

test('two sockets sharing one presence key give one key with two entries; one untrack leaves the other', async () => {
  const name = room('shared')
  const phone = await member(name, 'shared-user')
  const laptop = await member(name, 'shared-user')
  const observer = await member(name, 'observer')
  assert.equal(await phone.channel.track({ device: 'phone' }), 'ok')
  assert.equal(await laptop.channel.track({ device: 'laptop' }), 'ok')

  const devices = (s) => (s['shared-user'] ?? []).map((m) => m.device).sort()
  for (const view of [observer, phone, laptop]) {
    const state = await view.untilState((s) => devices(s).length === 2, 3000, 'two metas under shared-user')
    assert.deepEqual(keysOf(state), ['shared-user'])
    assert.deepEqual(devices(state), ['laptop', 'phone'])
    const refs = state['shared-user'].map((m) => m.presence_ref)
    assert.ok(refs.every(isRef) && refs[0] !== refs[1], `two distinct presence_refs: ${refs}`)
  }
  const joins = observer.joins.items.filter((j) => j.key === 'shared-user')
  assert.equal(joins.length, 2, 'one join per socket')
  assert.deepEqual(joins[1].currentPresences.map(bare), [{ device: 'phone' }], 'the second join sees the first')

  assert.equal(await phone.channel.untrack(), 'ok')
  const leave = await observer.leaves.find((l) => l.key === 'shared-user', 3000, 'the phone leave')
  assert.deepEqual(leave.leftPresences.map(bare), [{ device: 'phone' }])
  assert.deepEqual(leave.currentPresences.map(bare), [{ device: 'laptop' }], 'the laptop entry stays')
  const state = await observer.untilState((s) => devices(s).length === 1, 3000, 'one meta left')
  assert.deepEqual(metasOf(state, 'shared-user'), [{ device: 'laptop' }])
})

test('untrack → leave on the others (and on self), key gone from presenceState()', async () => {
  const name = room('untrack')
  const alice = await member(name, 'alice')
  const bob = await member(name, 'bob')
  assert.equal(await alice.channel.track({ online: true }), 'ok')
  const join = await bob.joins.find((j) => j.key === 'alice', 3000, "alice's join")

  assert.equal(await alice.channel.untrack(), 'ok')
  const leave = await bob.leaves.find((l) => l.key === 'alice', 3000, "alice's leave on bob")
  assert.equal(leave.event, 'leave')
  assert.deepEqual(leave.leftPresences, join.newPresences, 'the left meta is the joined one, same presence_ref')
  assert.deepEqual(leave.currentPresences, [])
  assert.deepEqual(await bob.untilState((s) => !s.alice, 3000, 'alice gone'), {})
  await alice.leaves.find((l) => l.key === 'alice', 3000, 'own leave on alice')
  assert.deepEqual(await alice.untilState((s) => !s.alice, 3000, 'alice gone from own state'), {})
})

/** A room with an observer and a tracker `key`; resolves once the observer has seen the tracker's join. */
async function trackedPair(label, realtime = {}) {
  const name = room(label)
  const supabase = client(gw, realtime)
  const tracker = await presenceJoined(supabase, name, { key: 'leaver' })
  const observer = await member(name, 'observer')
  assert.equal(await tracker.channel.track({ here: true }), 'ok')
  const join = await observer.joins.find((j) => j.key === 'leaver', 3000, "the leaver's join")
  return { name, supabase, tracker, observer, join }
}

async function assertLeft({ observer, join }, how) {
  const leave = await observer.leaves.find((l) => l.key === 'leaver', 5000, `the leave after ${how}`)
  assert.deepEqual(leave.leftPresences, join.newPresences)
  assert.deepEqual(await observer.untilState((s) => !s.leaver, 3000, 'leaver gone'), {})
}

test('removeChannel (phx_leave) → leave on the others', async () => {
  const pair = await trackedPair('remove')
  assert.equal(await pair.supabase.removeChannel(pair.tracker.channel), 'ok')
  await assertLeft(pair, 'removeChannel')
})

test('client disconnect (socket closed cleanly, no phx_leave) → leave on the others', async () => {
  const pair = await trackedPair('disconnect')
  await pair.supabase.realtime.disconnect()
  await assertLeft(pair, 'realtime.disconnect()')
})

test('killed socket (TCP torn down, no close frame) → leave; no ghost for a late joiner', async () => {
  // no reconnect within the test, so the leave cannot be confused with a rejoin
  const pair = await trackedPair('kill', { reconnectAfterMs: () => 60_000 })
  wsOf(pair.supabase).terminate()
  await assertLeft(pair, 'terminate()')
  const late = await member(pair.name, 'late')
  await late.syncs.count(1, 3000, 'the late joiner’s presence_state')
  assert.deepEqual(late.state(), {}, 'no ghost of the killed member (the observer never tracked)')
  await closeAll([pair.supabase])
})

test('silent socket (no heartbeat, no close) → idle timeout → leave; no ghost for a late joiner', async () => {
  const name = room('silent')
  // the observer heartbeats well inside the idle timeout
  const observer = await member(name, 'observer', { gw: idle, realtime: { heartbeatIntervalMs: 400 } })
  const raw = await rawSocket(idle)
  raw.send({
    join_ref: '1',
    ref: '1',
    topic: `realtime:${name}`,
    event: 'phx_join',
    payload: {
      config: { broadcast: { ack: false, self: false }, presence: { enabled: true, key: 'silent' }, postgres_changes: [], private: false },
      access_token: idle.anonKey,
    },
  })
  await raw.frames.find((f) => f.ref === '1' && f.event === 'phx_reply', 3000, 'the raw join reply')
  raw.send({ join_ref: '1', ref: '2', topic: `realtime:${name}`, event: 'presence', payload: { type: 'presence', event: 'track', payload: { silent: true } } })
  const reply = await raw.frames.find((f) => f.ref === '2', 3000, 'the track reply')
  assert.equal(reply.payload.status, 'ok')
  const started = Date.now()
  await observer.joins.find((j) => j.key === 'silent', 3000, "the silent member's join")

  // from here on the raw socket sends nothing
  const leave = await observer.leaves.find((l) => l.key === 'silent', IDLE_MS + 4000, 'the leave after the idle timeout')
  assert.deepEqual(leave.leftPresences.map(bare), [{ silent: true }])
  assert.ok(Date.now() - started >= IDLE_MS - 500, `the leave came after the idle timeout (${Date.now() - started} ms)`)
  await raw.closed
  const late = await member(name, 'late', { gw: idle, realtime: { heartbeatIntervalMs: 400 } })
  await late.syncs.count(1, 3000, 'the late joiner’s presence_state')
  assert.deepEqual(late.state(), {}, 'no ghost of the silent member')
  assert.ok(observer.channel.state === 'joined', 'the heartbeating observer kept its channel')
})

test('re-track updates the meta: one entry with the new value everywhere, old one reported as left', async () => {
  const name = room('retrack')
  const alice = await member(name, 'alice')
  const bob = await member(name, 'bob')
  assert.equal(await alice.channel.track({ status: 'online', typing: false }), 'ok')
  const first = await bob.untilState((s) => s.alice, 3000, 'alice tracked')
  const oldRef = first.alice[0].presence_ref

  assert.equal(await alice.channel.track({ status: 'online', typing: true }), 'ok')
  for (const view of [bob, alice]) {
    const state = await view.untilState((s) => s.alice?.[0]?.typing === true, 3000, 'the new meta')
    assert.equal(state.alice.length, 1, `one entry, not two: ${JSON.stringify(state)}`)
    assert.deepEqual(metasOf(state, 'alice'), [{ status: 'online', typing: true }])
    assert.notEqual(state.alice[0].presence_ref, oldRef, 'the new meta has a new presence_ref')
  }
  const leave = await bob.leaves.find((l) => l.key === 'alice', 3000, 'the leave of the old meta')
  assert.deepEqual(leave.leftPresences, [{ status: 'online', typing: false, presence_ref: oldRef }])

  // an identical re-track is a no-op: the next diff bob sees is carol's, not alice's
  const joinsBefore = bob.joins.length
  assert.equal(await alice.channel.track({ status: 'online', typing: true }), 'ok')
  const carol = await member(name, 'carol')
  assert.equal(await carol.channel.track({ marker: true }), 'ok')
  await bob.joins.find((j) => j.key === 'carol', 3000, "carol's join (marker)")
  assert.deepEqual(bob.joins.items.slice(joinsBefore).map((j) => j.key), ['carol'])
  assert.equal(bob.leaves.items.filter((l) => l.key === 'alice').length, 1)
})

test('a late joiner sees everyone present in its first sync (presence_state), and nobody who left', async () => {
  const name = room('late')
  const present = []
  for (const key of ['ann', 'ben', 'cid']) {
    const m = await member(name, key)
    assert.equal(await m.channel.track({ name: key }), 'ok')
    present.push(m)
  }
  const gone = await member(name, 'gone')
  assert.equal(await gone.channel.track({ name: 'gone' }), 'ok')
  assert.equal(await gone.channel.untrack(), 'ok')
  // ann has seen the untrack, so the server state is settled
  await present[0].untilState((s) => s.cid && !s.gone && s.ann && s.ben, 3000, 'ann, ben, cid and no gone')

  const late = await member(name, 'late')
  await late.syncs.count(1, 3000, 'the first sync')
  assert.equal(late.syncs.length, 1)
  const state = late.state()
  assert.deepEqual(keysOf(state), ['ann', 'ben', 'cid'])
  for (const key of ['ann', 'ben', 'cid']) assert.deepEqual(metasOf(state, key), [{ name: key }])
  assert.deepEqual(state, present[0].state(), 'the late view equals a long-standing member’s view')
  assert.deepEqual(late.joins.items.map((j) => j.key).sort(), ['ann', 'ben', 'cid'], 'one join event per member')
})

test('50 clients in one room all converge to 50 keys', async () => {
  const N = 50
  const name = room('fifty')
  const clients = Array.from({ length: N }, () => client())
  const started = Date.now()
  // join and track concurrently, so presence_state and diffs race as they do in a real room
  const members = await Promise.all(
    clients.map(async (supabase, i) => {
      const m = await presenceJoined(supabase, name, { key: `m${i}`, timeoutMs: 10_000 })
      assert.equal(await m.channel.track({ i, name: `member ${i}` }), 'ok')
      return m
    }),
  )
  const expected = Object.fromEntries(Array.from({ length: N }, (_, i) => [`m${i}`, [{ i, name: `member ${i}` }]]))
  await Promise.all(
    members.map(async (m, i) => {
      const state = await m.untilState((s) => Object.keys(s).length === N, 15_000, `${N} keys on m${i}`)
      const stripped = Object.fromEntries(Object.entries(state).map(([k, metas]) => [k, metas.map(bare)]))
      assert.deepEqual(stripped, expected, `m${i} sees every member exactly once with its meta`)
    }),
  )
  console.log(`# ${N} members converged in ${Date.now() - started} ms`)
  await closeAll(clients)
})

test('typing indicator: 20 re-tracks per second for 2 s converge to the last value on every observer', async () => {
  const name = room('typing')
  const typer = await member(name, 'typer', { gw: fast })
  const observers = []
  for (let i = 0; i < 3; i++) observers.push(await member(name, `obs${i}`, { gw: fast }))

  const COUNT = 40
  const replies = []
  for (let n = 0; n < COUNT; n++) {
    // fire-and-forget like a keystroke handler; the pacing is the test's input, not a wait for an event
    replies.push(typer.channel.track({ typing: n < COUNT - 1, n }))
    await delay(50)
  }
  assert.deepEqual(await Promise.all(replies), Array(COUNT).fill('ok'))
  const last = { typing: false, n: COUNT - 1 }
  for (const view of [...observers, typer]) {
    const state = await view.untilState((s) => s.typer?.some((m) => m.n === COUNT - 1), 5000, 'the last value')
    assert.deepEqual(metasOf(state, 'typer'), [last], 'exactly one entry, holding the last value')
  }
  for (const o of observers) {
    assert.deepEqual(o.system.items, [], 'no system error on the observers')
    // every update arrived as a join, and each replaced the previous meta
    assert.ok(o.joins.items.filter((j) => j.key === 'typer').length >= 2)
  }
  assert.deepEqual(typer.system.items, [], 'the raised limit kept the typer’s channel open')
})

test('default rate limit: the 6th track within 30 s closes the channel with "Client presence rate limit exceeded"', async () => {
  const name = room('ratelimit')
  const spammer = await member(name, 'spammer', { realtime: { timeout: 2000 } })
  const observer = await member(name, 'observer')
  for (let n = 1; n <= 5; n++) assert.equal(await spammer.channel.track({ n }), 'ok', `track ${n}`)
  await observer.untilState((s) => s.spammer?.[0]?.n === 5, 3000, 'the 5th value')
  assert.deepEqual(spammer.system.items, [], 'five calls are within the limit')

  const sixth = spammer.channel.track({ n: 6 })
  const message = await spammer.system.find(() => true, 3000, 'the system message')
  assert.deepEqual(message, {
    extension: 'system',
    status: 'error',
    message: 'Client presence rate limit exceeded',
    channel: name,
  })
  await spammer.statuses.find((s) => s.status === 'CLOSED', 3000, 'CLOSED')
  assert.notEqual(await sixth, 'ok', 'the 6th track was not accepted')
  // the closed channel's presence is removed; the 6th value never showed up
  // (each earlier re-track was a leave of the previous value with the new one current)
  const leave = await observer.leaves.find(
    (l) => l.key === 'spammer' && l.currentPresences.length === 0,
    3000,
    "the spammer's final leave",
  )
  assert.deepEqual(leave.leftPresences.map(bare), [{ n: 5 }])
  assert.deepEqual(await observer.untilState((s) => !s.spammer, 3000, 'spammer gone'), {})
  assert.ok(!observer.joins.items.some((j) => j.newPresences.some((p) => p.n === 6)))
})

test('V1 client (realtime-js 2.11, no presence.enabled) gets presence only with PRESENCE_ENABLED=true', async () => {
  // control: on the default gateway the V1 client never receives presence_state, so its Presence keeps
  // diffs buffered and shows nobody. A broadcast sent after the track arrives after the diff would have.
  {
    const name = room('v1-off')
    const old = await presenceJoined(v1Client(gw), name, { key: 'old' })
    const tracker = await member(name, 'new')
    assert.equal(await tracker.channel.track({ v: 2 }), 'ok')
    await tracker.joins.find((j) => j.key === 'new', 3000, 'own join (the diff went out)')
    assert.equal(await tracker.channel.send({ type: 'broadcast', event: 'marker', payload: {} }), 'ok')
    await old.broadcasts.find((m) => m.event === 'marker', 3000, 'the marker on V1')
    assert.equal(old.syncs.length, 0, 'no presence_state, so no sync')
    assert.deepEqual(old.state(), {})
  }
  const name = room('v1-on')
  const old = await presenceJoined(v1Client(legacy), name, { key: 'old' })
  await old.syncs.count(1, 3000, 'the V1 sync from presence_state pushed by PRESENCE_ENABLED')
  const modern = await member(name, 'new', { gw: legacy })
  assert.equal(await modern.channel.track({ v: 2 }), 'ok')
  const join = await old.joins.find((j) => j.key === 'new', 3000, 'the V2 member on V1')
  assert.deepEqual(join.newPresences.map(bare), [{ v: 2 }])
  assert.equal(await old.channel.track({ v: 1 }), 'ok')
  const onV2 = await modern.untilState((s) => s.old, 3000, 'the V1 member on V2')
  assert.deepEqual(metasOf(onV2, 'old'), [{ v: 1 }])
  const onV1 = await old.untilState((s) => s.old && s.new, 3000, 'both on V1')
  assert.deepEqual(onV1, onV2, 'both clients see the same state')
})

test('wire: presence_state after the join reply, diffs with null join_ref, re-track leave+join with phx_ref_prev', async () => {
  const name = room('wire')
  const topic = `realtime:${name}`
  const sock = await rawSocket(gw)
  sock.send({
    join_ref: '1',
    ref: '1',
    topic,
    event: 'phx_join',
    payload: {
      config: { broadcast: { ack: false, self: false }, presence: { enabled: true, key: 'wire' }, postgres_changes: [], private: false },
      access_token: gw.anonKey,
    },
  })
  const state = await sock.frames.find((f) => f.event === 'presence_state', 3000, 'presence_state')
  const events = sock.frames.items.map((f) => f.event)
  assert.deepEqual(events.slice(0, 2), ['phx_reply', 'presence_state'], 'reply first, then presence_state')
  assert.equal(sock.frames.items[0].payload.status, 'ok')
  assert.deepEqual(JSON.parse(state.text), ['1', null, topic, 'presence_state', {}])

  const track = (ref, meta) =>
    sock.send({ join_ref: '1', ref, topic, event: 'presence', payload: { type: 'presence', event: 'track', payload: meta } })
  track('2', { a: 1 })
  const diffs = () => sock.frames.items.filter((f) => f.event === 'presence_diff')
  await sock.frames.until(() => diffs().length >= 1, 3000, 'the first diff')
  const first = diffs()[0]
  assert.equal(first.join_ref, null)
  assert.equal(first.ref, null)
  const ref1 = first.payload.joins?.wire?.metas?.[0]?.phx_ref
  assert.ok(isRef(ref1), first.text)
  assert.deepEqual(first.payload, { joins: { wire: { metas: [{ phx_ref: ref1, a: 1 }] } }, leaves: {} })

  track('3', { a: 2 })
  await sock.frames.until(() => diffs().length >= 2, 3000, 'the re-track diff')
  const second = diffs()[1]
  const ref2 = second.payload.joins?.wire?.metas?.[0]?.phx_ref
  assert.ok(isRef(ref2) && ref2 !== ref1, second.text)
  assert.deepEqual(second.payload, {
    joins: { wire: { metas: [{ phx_ref: ref2, phx_ref_prev: ref1, a: 2 }] } },
    leaves: { wire: { metas: [{ phx_ref: ref1, a: 1 }] } },
  })
  const replies = sock.frames.items.filter((f) => f.event === 'phx_reply').map((f) => [f.ref, f.payload.status])
  assert.deepEqual(replies, [['1', 'ok'], ['2', 'ok'], ['3', 'ok']])
  await sock.close()
})

test('a member that tracks without any presence listener (presence.enabled false) is still visible to others', async () => {
  const name = room('no-listener')
  const silent = await presenceJoined(client(), name, { key: 'quiet', listen: false })
  const observer = await member(name, 'observer')
  assert.equal(await silent.channel.track({ shy: true }), 'ok')
  const state = await observer.untilState((s) => s.quiet, 3000, 'the listener-less tracker')
  assert.deepEqual(metasOf(state, 'quiet'), [{ shy: true }])
  assert.equal(await silent.channel.untrack(), 'ok')
  await observer.untilState((s) => !s.quiet, 3000, 'gone after untrack')
})

test('wire (V1): the first track on a channel joined without presence.enabled syncs the state once', async () => {
  // The reference's current presence handler (supabase/realtime presence_handler.ex track/2) sends
  // :sync_presence when a track is what enables presence on the channel: that channel never got the
  // join-time presence_state, so without it the members tracked before would stay invisible. The
  // protocol reference (v2.129.8) predates that change. Later tracks do not sync again.
  const name = room('wire-v1-track')
  const topic = `realtime:${name}`
  const sock = await rawSocket(gw, { vsn: '1.0.0' })
  sock.send({
    ref: '1',
    topic,
    event: 'phx_join',
    payload: { config: { broadcast: { ack: false, self: true }, presence: { key: 'v1' }, postgres_changes: [], private: false }, access_token: gw.anonKey },
  })
  await sock.frames.find((f) => f.ref === '1' && f.event === 'phx_reply', 3000, 'the join reply')
  sock.send({ ref: '2', topic, event: 'presence', payload: { type: 'presence', event: 'track', payload: { v: 1 } } })
  await sock.frames.find((f) => f.ref === '2' && f.event === 'phx_reply', 3000, 'the track reply')
  await sock.frames.find((f) => f.event === 'presence_diff', 3000, 'the own diff')
  sock.send({ ref: '3', topic, event: 'presence', payload: { type: 'presence', event: 'track', payload: { v: 2 } } })
  await sock.frames.find((f) => f.ref === '3' && f.event === 'phx_reply', 3000, 'the re-track reply')
  // a marker on the same socket, after everything the tracks could have caused
  sock.send({ ref: '4', topic, event: 'broadcast', payload: { type: 'broadcast', event: 'marker', payload: {} } })
  await sock.frames.find((f) => f.event === 'broadcast' && f.payload?.event === 'marker', 3000, 'the marker')
  const states = sock.frames.items.filter((f) => f.event === 'presence_state')
  assert.equal(states.length, 1, 'exactly one presence_state, from the first track')
  assert.deepEqual(Object.keys(states[0].payload), ['v1'])
  assert.equal(states[0].payload.v1.metas[0].v, 1)
  await sock.close()
})

test('wire: a duplicate join on the same socket ends the old channel and its presence (no ghost)', async () => {
  const name = room('dup-join')
  const topic = `realtime:${name}`
  const observer = await member(name, 'observer')
  const sock = await rawSocket(gw)
  const join = (ref) =>
    sock.send({
      join_ref: ref,
      ref,
      topic,
      event: 'phx_join',
      payload: { config: { broadcast: { ack: false, self: false }, presence: { enabled: true, key: 'dup' }, postgres_changes: [], private: false }, access_token: gw.anonKey },
    })
  join('1')
  await sock.frames.find((f) => f.ref === '1' && f.event === 'phx_reply', 3000, 'the first join reply')
  sock.send({ join_ref: '1', ref: '2', topic, event: 'presence', payload: { type: 'presence', event: 'track', payload: { gen: 1 } } })
  await observer.joins.find((j) => j.key === 'dup', 3000, 'the first channel’s join')

  join('3')
  await sock.frames.find((f) => f.ref === '3' && f.event === 'phx_reply', 3000, 'the second join reply')
  const leave = await observer.leaves.find((l) => l.key === 'dup', 3000, 'the old channel’s leave')
  assert.deepEqual(leave.leftPresences.map(bare), [{ gen: 1 }])
  assert.deepEqual(await observer.untilState((s) => !s.dup, 3000, 'dup gone'), {})
  const state = await sock.frames.find((f) => f.event === 'presence_state' && f.join_ref === '3', 3000, 'the new channel’s presence_state')
  assert.equal(state.payload.dup, undefined, `the new channel does not see the old one’s presence: ${state.text}`)
  await sock.close()
})
