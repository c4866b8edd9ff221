// Private channels (protocol.md §8.3, §4.4, §5.2, §6.1, §3.5): joins with `config.private: true` are
// authorized by RLS policies on realtime.messages, as the reference does it — read (probe rows selected as
// the JWT role) at join and again on a token refresh, write (probe row inserted as the JWT role) at the
// first broadcast and the first presence track.
//
// Policies are scoped by topic prefix so each test owns its topics:
//   none:*    no policy at all
//   sel:*     authenticated may SELECT (read), nobody may INSERT (write)
//   rw:*      authenticated may SELECT and INSERT
//   anon:*    anon may SELECT and INSERT (and authenticated nothing)
//   member:*  members of the room (public.room_members, auth.uid()) may SELECT and INSERT
//   rev:*     authenticated may SELECT; the policy is dropped mid-test
//   pr:*      authenticated may read broadcasts and track; presence read only with the claim sees_presence
//   claim:*   authenticated may SELECT; INSERT only with the JWT claim can_write: true
// service_role has BYPASSRLS, so it reads and writes every private topic.
//
// Absence is proved without sleeping: after the message that must not arrive, a barrier is sent on a
// path that reaches the same subscriber (the service_role REST endpoint, or a broadcast on the same
// socket); the barrier arriving alone shows the other message was never delivered. A broadcast dropped
// for lack of write gets no reply even with ack (§5.2), so the sender's ack times out (1.5 s).

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { channel, closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { within } from './lib/inbox.mjs'
import { presenceJoined } from './lib/presence-helpers.mjs'
import { startPostgres } from './lib/postgres.mjs'
import { rawSocket } from './lib/raw.mjs'

let db
let gw

const POLICIES = `
  create table public.room_members (
    room text not null,
    user_id uuid not null,
    primary key (room, user_id)
  );
  grant select on public.room_members to authenticated;

  create policy "sel: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'sel');

  create policy "rw: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'rw');
  create policy "rw: write" on realtime.messages for insert to authenticated
    with check (split_part(realtime.topic(), ':', 1) = 'rw');

  create policy "anon: read" on realtime.messages for select to anon
    using (split_part(realtime.topic(), ':', 1) = 'anon');
  create policy "anon: write" on realtime.messages for insert to anon
    with check (split_part(realtime.topic(), ':', 1) = 'anon');

  create policy "members read their rooms" on realtime.messages for select to authenticated
    using (
      realtime.messages.extension in ('broadcast', 'presence')
      and exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid())
    );
  create policy "members write to their rooms" on realtime.messages for insert to authenticated
    with check (
      realtime.messages.extension in ('broadcast', 'presence')
      and exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid())
    );

  create policy "rev: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'rev');

  -- pr:* broadcast read for every signed-in user, presence read only with the claim sees_presence,
  -- presence write for everyone signed in
  create policy "pr: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'pr' and (realtime.messages.extension = 'broadcast'
      or coalesce((auth.jwt() ->> 'sees_presence')::boolean, false)));
  create policy "pr: track" on realtime.messages for insert to authenticated
    with check (split_part(realtime.topic(), ':', 1) = 'pr' and realtime.messages.extension = 'presence');

  create policy "claim: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'claim');
  create policy "claim: write with the can_write claim" on realtime.messages for insert to authenticated
    with check (split_part(realtime.topic(), ':', 1) = 'claim' and coalesce((auth.jwt() ->> 'can_write')::boolean, false));
`

before(async () => {
  db = await startPostgres()
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'private_channels' } })
  // the gateway applies the realtime schema at start; the policies need realtime.messages
  await db.sql(POLICIES)
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const topic = (prefix, label) => `${prefix}:${label}-${randomUUID()}`
const userToken = (sub, extra = {}) => gw.sign({ role: 'authenticated', sub, aud: 'authenticated', ...extra })
const PRIVATE = { private: true }

/**
 * supabase-js built as a third-party-auth app (the `accessToken` option, README.md): the callback is
 * the single source of the token; realtime auth is set before subscribing.
 */
async function appWithToken(initial, target = gw) {
  const state = { token: initial }
  const supabase = supabaseClient(target, { accessToken: async () => state.token, realtime: { timeout: 5000 } })
  await supabase.realtime.setAuth()
  return {
    supabase,
    state,
    async switchTo(token) {
      state.token = token
      await supabase.realtime.setAuth(token)
    },
  }
}

/** A supabase-js client acting as `role`: anon (the anon key), authenticated (a user JWT) or service_role. */
async function clientAs(role, sub = randomUUID()) {
  if (role === 'anon') return supabaseClient(gw, { realtime: { timeout: 5000 } })
  if (role === 'service_role') return supabaseClient(gw, { key: gw.serviceKey, realtime: { timeout: 5000 } })
  return (await appWithToken(userToken(sub))).supabase
}

/** POST /api/broadcast; returns { status, body }. */
async function restBatch(messages, { bearer, apikey = gw.anonKey, target = gw } = {}) {
  const headers = { 'Content-Type': 'application/json', apikey }
  if (bearer) headers.Authorization = `Bearer ${bearer}`
  const res = await fetch(`${target.url}/api/broadcast`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ messages }),
  })
  return { status: res.status, body: await res.text() }
}

/** A private barrier message from service_role (BYPASSRLS: write always granted). */
async function privateBarrier(name, event = 'barrier') {
  const res = await restBatch([{ topic: name, event, payload: { barrier: true }, private: true }], {
    bearer: gw.serviceKey,
  })
  assert.equal(res.status, 202, `service_role barrier: ${res.body}`)
}

/**
 * Subscribes `name` with `config` and expects the join to be refused; returns the error message the
 * client reports (realtime-js joins the reply's `response` values with ", ").
 */
async function refusal(supabase, name, config = PRIVATE) {
  const sub = channel(supabase, name, { config })
  const first = await sub.statuses.find(() => true, 5000, `a subscribe status for ${name}`)
  // stop realtime-js from rejoining with backoff
  await within(supabase.removeChannel(sub.channel), 3000, 'removeChannel').catch(() => {})
  assert.equal(first.status, 'CHANNEL_ERROR', `expected the join of ${name} to be refused, got ${first.status}`)
  return first.err?.message
}

const unauthorized = (name) => `Unauthorized: You do not have permissions to read from this Channel topic: ${name}`

const broadcastEvents = (sub) => sub.broadcasts.items.map((m) => m.event)

describe('the private-channel matrix: policy × role → join, then broadcast write', () => {
  // [topic prefix, role, joins?, writes?]
  const MATRIX = [
    ['none', 'anon', false],
    ['none', 'authenticated', false],
    ['none', 'service_role', true, true],
    ['sel', 'anon', false],
    ['sel', 'authenticated', true, false],
    ['rw', 'anon', false],
    ['rw', 'authenticated', true, true],
    ['anon', 'anon', true, true],
    ['anon', 'authenticated', false],
  ]
  const policyLabel = { none: 'no policy', sel: 'select only', rw: 'select + insert', anon: 'select + insert to anon' }

  for (const [prefix, role, joins, writes] of MATRIX) {
    const outcome = !joins ? 'join refused' : writes ? 'joins, broadcast delivered' : 'joins, broadcast dropped'
    test(`${policyLabel[prefix]} × ${role}: ${outcome}`, async () => {
      const name = topic(prefix, role)
      if (!joins) {
        assert.equal(await refusal(await clientAs(role), name), unauthorized(name))
        return
      }
      const receiver = await joined(await clientAs(role), name, { config: PRIVATE })
      const sender = await joined(await clientAs(role), name, { config: { ...PRIVATE, broadcast: { ack: true } } })
      const result = await sender.channel.send({ type: 'broadcast', event: 'hello', payload: { role } }, { timeout: 1500 })
      if (writes) {
        assert.equal(result, 'ok', 'the ack of a permitted broadcast')
        const got = await receiver.broadcasts.find((m) => m.event === 'hello', 3000, 'the broadcast')
        assert.deepEqual(got.payload, { role })
      } else {
        // §5.2: write denied → dropped with no reply at all, even with ack: true
        assert.equal(result, 'timed out', 'a broadcast without write gets no ack reply')
        await privateBarrier(name)
        await receiver.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier (read still works)')
        await sender.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier on the sender')
        assert.deepEqual(broadcastEvents(receiver), ['barrier'], 'the dropped broadcast never reached the reader')
        assert.deepEqual(broadcastEvents(sender), ['barrier'], 'the sender still reads the topic')
      }
    })
  }
})

test('broadcast without write is dropped every time (also without ack) while reading keeps working', async () => {
  const name = topic('sel', 'no-ack')
  const reader = await joined(await clientAs('authenticated'), name, { config: PRIVATE })
  const writerClient = await clientAs('authenticated')
  const writer = await joined(writerClient, name, { config: PRIVATE })
  // a second channel on the writer's socket, with write, whose ack'd broadcast follows the dropped ones
  const side = await joined(writerClient, topic('rw', 'side'), { config: { ...PRIVATE, broadcast: { ack: true } } })
  for (let i = 0; i < 3; i++) {
    // ack: false resolves 'ok' as soon as the push is sent, as realtime-js always does
    assert.equal(await writer.channel.send({ type: 'broadcast', event: 'dropped', payload: { i } }), 'ok')
  }
  assert.equal(await side.channel.send({ type: 'broadcast', event: 'side', payload: {} }, { timeout: 3000 }), 'ok')
  await privateBarrier(name)
  await reader.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier')
  await writer.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier on the writer')
  assert.deepEqual(broadcastEvents(reader), ['barrier'])
  assert.deepEqual(broadcastEvents(writer), ['barrier'], 'the writer still reads')
})

test('an auth.uid() policy on a membership table: only members of a room read and write its topic', async () => {
  const [A, B, C] = [randomUUID(), randomUUID(), randomUUID()]
  const room = topic('member', 'room')
  const otherRoom = topic('member', 'other')
  await db.sql(`insert into public.room_members (room, user_id) values ($1, $2), ($1, $3), ($4, $5)`, [
    room,
    A,
    B,
    otherRoom,
    C,
  ])
  const alice = await joined(await clientAs('authenticated', A), room, { config: { ...PRIVATE, broadcast: { ack: true } } })
  const bob = await joined(await clientAs('authenticated', B), room, { config: PRIVATE })
  const carol = await clientAs('authenticated', C)
  assert.equal(await refusal(carol, room), unauthorized(room), 'a non-member is refused')
  assert.equal(await refusal(await clientAs('anon'), room), unauthorized(room), 'anon is refused')
  await joined(carol, otherRoom, { config: PRIVATE }) // her own room is fine

  assert.equal(await alice.channel.send({ type: 'broadcast', event: 'hi', payload: { from: 'alice' } }, { timeout: 3000 }), 'ok')
  const got = await bob.broadcasts.find((m) => m.event === 'hi', 3000, "alice's message on bob")
  assert.deepEqual(got.payload, { from: 'alice' })

  // the policy reads the table at every check: adding carol lets her in
  await db.sql(`insert into public.room_members (room, user_id) values ($1, $2)`, [room, C])
  const carolIn = await joined(carol, room, { config: PRIVATE })
  await alice.channel.send({ type: 'broadcast', event: 'welcome', payload: {} }, { timeout: 3000 })
  await carolIn.broadcasts.find((m) => m.event === 'welcome', 3000, 'the welcome on carol')
})

test('a policy revoked mid-session: after setAuth(newToken) the channel is closed with the reference message', async () => {
  const sub = randomUUID()
  const app = await appWithToken(userToken(sub))
  const name = topic('rev', 'revoked')
  const kept = topic('rw', 'kept')
  const revoked = await joined(app.supabase, name, { config: PRIVATE })
  const control = await joined(app.supabase, kept, { config: { ...PRIVATE, broadcast: { ack: true } } })

  await db.sql(`drop policy "rev: read" on realtime.messages`)
  try {
    // a different token string (the client only pushes access_token when the value changes)
    await app.switchTo(userToken(sub, { refreshed: 1 }))
    await revoked.statuses.find((s) => s.status === 'CLOSED', 5000, 'CLOSED after the refresh')
    const system = revoked.system.items.at(-1)
    assert.deepEqual(
      { extension: system?.extension, status: system?.status, message: system?.message },
      {
        extension: 'system',
        status: 'error',
        message: `You no longer have permission to read from this Channel topic: ${name}`,
      },
      '§3.5 / §8.2: the system message before phx_close',
    )
    // the same refresh left the channel whose policy still holds alone; an ack'd push after the
    // refresh (same socket, handled in order) shows the refresh of this channel has been handled
    assert.equal(await control.channel.send({ type: 'broadcast', event: 'probe', payload: {} }, { timeout: 3000 }), 'ok')
    assert.deepEqual(
      control.statuses.items.map((s) => s.status),
      ['SUBSCRIBED'],
    )
    await privateBarrier(kept, 'after-refresh')
    await control.broadcasts.find((m) => m.event === 'after-refresh', 3000, 'a broadcast on the kept channel')
    // and the closed one receives nothing any more: rejoining is refused
    assert.equal(await refusal(app.supabase, name), unauthorized(name))
  } finally {
    await db.sql(`create policy "rev: read" on realtime.messages for select to authenticated
      using (split_part(realtime.topic(), ':', 1) = 'rev')`)
  }
})

test('membership removed mid-session: the removed member’s refresh closes its channel, the other member’s keeps it', async () => {
  const [A, B] = [randomUUID(), randomUUID()]
  const room = topic('member', 'leaving')
  await db.sql(`insert into public.room_members (room, user_id) values ($1, $2), ($1, $3)`, [room, A, B])
  const a = await appWithToken(userToken(A))
  const b = await appWithToken(userToken(B))
  const subA = await joined(a.supabase, room, { config: { ...PRIVATE, broadcast: { ack: true } } })
  const subB = await joined(b.supabase, room, { config: PRIVATE })

  await db.sql(`delete from public.room_members where room = $1 and user_id = $2`, [room, B])
  await b.switchTo(userToken(B, { refreshed: 1 }))
  await a.switchTo(userToken(A, { refreshed: 1 }))
  await subB.statuses.find((s) => s.status === 'CLOSED', 5000, "CLOSED on the removed member's channel")
  assert.equal(subB.system.items.at(-1)?.message, `You no longer have permission to read from this Channel topic: ${room}`)
  // an ack'd push after A's refresh (same socket, in order): the refresh has been handled, A still writes
  assert.equal(await subA.channel.send({ type: 'broadcast', event: 'probe', payload: {} }, { timeout: 3000 }), 'ok')
  await privateBarrier(room, 'still-here')
  await subA.broadcasts.find((m) => m.event === 'still-here', 3000, 'the remaining member still reads')
  assert.deepEqual(subA.statuses.items.map((s) => s.status), ['SUBSCRIBED'])
})

test('write is re-checked after a token refresh: dropped before, delivered after setAuth(token with the claim)', async () => {
  const sub = randomUUID()
  const name = topic('claim', 'write')
  const app = await appWithToken(userToken(sub))
  const reader = await joined(await clientAs('authenticated'), name, { config: PRIVATE })
  const writer = await joined(app.supabase, name, { config: { ...PRIVATE, broadcast: { ack: true } } })
  assert.equal(await writer.channel.send({ type: 'broadcast', event: 'before', payload: {} }, { timeout: 1500 }), 'timed out')

  await app.switchTo(userToken(sub, { can_write: true }))
  assert.equal(await writer.channel.send({ type: 'broadcast', event: 'after', payload: {} }, { timeout: 3000 }), 'ok')
  await reader.broadcasts.find((m) => m.event === 'after', 3000, 'the broadcast after the refresh')
  assert.deepEqual(broadcastEvents(reader), ['after'], 'the one sent before the refresh was dropped')

  // and back: a token without the claim loses write again (the cached answer is dropped on refresh)
  await app.switchTo(userToken(sub, { can_write: false }))
  assert.equal(await writer.channel.send({ type: 'broadcast', event: 'again', payload: {} }, { timeout: 1500 }), 'timed out')
  await privateBarrier(name)
  await reader.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier')
  assert.deepEqual(broadcastEvents(reader), ['after', 'barrier'])
})

test('a private and a public channel with the same name are separate channels', async () => {
  const name = topic('rw', 'same-name')
  const p1 = await joined(await clientAs('authenticated'), name, { config: { ...PRIVATE, broadcast: { ack: true } } })
  const p2 = await joined(await clientAs('authenticated'), name, { config: PRIVATE })
  const q1 = await joined(await clientAs('authenticated'), name, { config: { broadcast: { ack: true } } })
  const q2 = await joined(await clientAs('anon'), name)

  // each ack means the message has been fanned out before the next one is sent
  assert.equal(await q1.channel.send({ type: 'broadcast', event: 'from-public', payload: {} }, { timeout: 3000 }), 'ok')
  assert.equal(await p1.channel.send({ type: 'broadcast', event: 'from-private', payload: {} }, { timeout: 3000 }), 'ok')
  // REST: public and private messages to the same name
  const rest = await restBatch(
    [
      { topic: name, event: 'rest-public', payload: {}, private: false },
      { topic: name, event: 'rest-private', payload: {}, private: true },
    ],
    { bearer: userToken(randomUUID()) },
  )
  assert.equal(rest.status, 202, rest.body)
  await q1.channel.send({ type: 'broadcast', event: 'end', payload: {} }, { timeout: 3000 })
  await p1.channel.send({ type: 'broadcast', event: 'end', payload: {} }, { timeout: 3000 })
  await q2.broadcasts.find((m) => m.event === 'end', 3000, 'the public end marker')
  await p2.broadcasts.find((m) => m.event === 'end', 3000, 'the private end marker')
  await q1.broadcasts.find((m) => m.event === 'rest-public', 3000, 'the public REST message on q1')
  await p1.broadcasts.find((m) => m.event === 'rest-private', 3000, 'the private REST message on p1')

  assert.deepEqual(broadcastEvents(q2), ['from-public', 'rest-public', 'end'], 'public subscriber')
  assert.deepEqual(broadcastEvents(p2), ['from-private', 'rest-private', 'end'], 'private subscriber')
  assert.deepEqual(broadcastEvents(q1), ['rest-public'], 'public sender (self: false)')
  assert.deepEqual(broadcastEvents(p1), ['rest-private'], 'private sender (self: false)')
})

test('presence track without write gets an error reply; with write it is tracked', async () => {
  const readOnly = topic('sel', 'presence')
  const member = await presenceJoined(await clientAs('authenticated'), readOnly, { key: 'reader', config: PRIVATE })
  const watcher = await presenceJoined(await clientAs('authenticated'), readOnly, { key: 'watcher', config: PRIVATE })
  // §6.1: write denied → phx_reply error {} (realtime-js resolves 'error', not 'timed out')
  assert.equal(await member.channel.track({ online: true }, { timeout: 3000 }), 'error')
  // the channel is still joined and reads: a private broadcast still arrives
  await privateBarrier(readOnly, 'after-track')
  await member.broadcasts.find((m) => m.event === 'after-track', 3000, 'a broadcast after the refused track')
  await watcher.broadcasts.find((m) => m.event === 'after-track', 3000, 'the barrier on the watcher')
  assert.deepEqual(watcher.state(), {}, 'nobody was tracked')

  const readWrite = topic('rw', 'presence')
  const tracker = await presenceJoined(await clientAs('authenticated'), readWrite, { key: 'writer', config: PRIVATE })
  const observer = await presenceJoined(await clientAs('authenticated'), readWrite, { key: 'observer', config: PRIVATE })
  assert.equal(await tracker.channel.track({ online: true }, { timeout: 3000 }), 'ok')
  const state = await observer.untilState((s) => s.writer, 3000, 'the writer in presenceState()')
  assert.equal(state.writer[0].online, true)
})

test('presence track on a private channel joined without presence: read and write are checked on demand', async () => {
  const name = topic('sel', 'presence-late')
  // no presence listener → presence.enabled false at join; the track is still refused for lack of write
  const sub = await joined(await clientAs('authenticated'), name, { config: PRIVATE })
  assert.equal(await sub.channel.track({ late: true }, { timeout: 3000 }), 'error')
  const ok = await joined(await clientAs('authenticated'), topic('rw', 'presence-late'), { config: PRIVATE })
  assert.equal(await ok.channel.track({ late: true }, { timeout: 3000 }), 'ok')
})

test('presence read denied: no presence_state and no presence_diff for that subscriber (§8.3, §6.2)', async () => {
  const name = topic('pr', 'presence-read')
  // the blind subscriber: raw V2 frames, presence enabled, broadcast read only
  const sock = await rawSocket(gw)
  try {
    sock.send({
      join_ref: '1',
      ref: '1',
      topic: `realtime:${name}`,
      event: 'phx_join',
      payload: {
        config: { broadcast: { ack: false, self: false }, presence: { key: 'blind', enabled: true }, postgres_changes: [], private: true },
        access_token: userToken(randomUUID()),
      },
    })
    const reply = await sock.frames.find((f) => f.event === 'phx_reply' && f.ref === '1', 5000, 'the join reply')
    assert.equal(reply.payload.status, 'ok', JSON.stringify(reply.payload))

    const seeing = await presenceJoined((await appWithToken(userToken(randomUUID(), { sees_presence: true }))).supabase, name, {
      key: 'seeing',
      config: PRIVATE,
    })
    assert.equal(await seeing.channel.track({ here: true }, { timeout: 3000 }), 'ok')
    await seeing.untilState((s) => s.seeing, 3000, 'own presence')
    await privateBarrier(name)
    await sock.frames.find((f) => f.event === 'broadcast' && f.payload?.event === 'barrier', 3000, 'the barrier on the blind socket')
    const presenceFrames = sock.frames.items.filter((f) => f.event === 'presence_state' || f.event === 'presence_diff')
    assert.deepEqual(presenceFrames.map((f) => f.text), [], 'no presence frames to a subscriber without presence read')
  } finally {
    await sock.close()
  }
})

describe('PRIVATE_ONLY=true', () => {
  let strict
  before(async () => {
    strict = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'private_only', PRIVATE_ONLY: 'true' } })
  })
  after(async () => {
    await strict?.stop()
  })

  test('public joins are refused with PrivateOnly; private joins are authorized by the policies', async () => {
    const anon = supabaseClient(strict, { realtime: { timeout: 5000 } })
    const publicName = topic('rw', 'public-on-strict')
    assert.equal(await refusal(anon, publicName, {}), 'PrivateOnly: This project only allows private channels')

    const token = strict.sign({ role: 'authenticated', sub: randomUUID() })
    const user = (await appWithToken(token, strict)).supabase
    assert.equal(
      await refusal(user, publicName, { private: false }),
      'PrivateOnly: This project only allows private channels',
      'an explicit private: false too',
    )
    const name = topic('rw', 'strict')
    const a = await joined(user, name, { config: { ...PRIVATE, broadcast: { ack: true, self: true } } })
    assert.equal(await a.channel.send({ type: 'broadcast', event: 'own', payload: {} }, { timeout: 3000 }), 'ok')
    await a.broadcasts.find((m) => m.event === 'own', 3000, 'own private broadcast (self: true)')
    const refusedName = topic('none', 'strict')
    assert.equal(await refusal(user, refusedName), unauthorized(refusedName), 'private still needs a policy')
  })
})

describe('REST broadcast to private topics', () => {
  test('batch: topics whose write check fails are skipped, the request still answers 202', async () => {
    const writable = topic('rw', 'rest')
    const readOnly = topic('sel', 'rest')
    const noPolicy = topic('none', 'rest')
    const onWritable = await joined(await clientAs('authenticated'), writable, { config: PRIVATE })
    const publicOnWritable = await joined(await clientAs('anon'), writable)
    const onReadOnly = await joined(await clientAs('authenticated'), readOnly, { config: PRIVATE })
    const serviceOnNone = await joined(await clientAs('service_role'), noPolicy, { config: PRIVATE })

    const user = userToken(randomUUID())
    const res = await restBatch(
      [
        { topic: writable, event: 'granted', payload: { n: 1 }, private: true },
        { topic: readOnly, event: 'skipped', payload: { n: 2 }, private: true },
        { topic: noPolicy, event: 'skipped', payload: { n: 3 }, private: true },
        { topic: writable, event: 'public', payload: { n: 4 }, private: false },
        { topic: writable, event: 'granted', payload: { n: 5 }, private: true },
      ],
      { bearer: user },
    )
    assert.deepEqual(res, { status: 202, body: '' })
    // anon (apikey only) has no write on rw:*: skipped as well, still 202
    assert.equal((await restBatch([{ topic: writable, event: 'anon', payload: {}, private: true }])).status, 202)

    for (const name of [writable, readOnly, noPolicy]) await privateBarrier(name)
    for (const sub of [onWritable, onReadOnly, serviceOnNone]) {
      await sub.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier')
    }
    assert.deepEqual(
      onWritable.broadcasts.items.map((m) => [m.event, m.payload.n]),
      [
        ['granted', 1],
        ['granted', 5],
        ['barrier', undefined],
      ],
    )
    assert.deepEqual(broadcastEvents(onReadOnly), ['barrier'], 'no write on sel:* → skipped')
    assert.deepEqual(broadcastEvents(serviceOnNone), ['barrier'], 'no policy → skipped')
    await publicOnWritable.broadcasts.find((m) => m.event === 'public', 3000, 'the public message')
    assert.deepEqual(broadcastEvents(publicOnWritable), ['public'])
  })

  test('single (httpSend, ?private=true): 202 with write, 403 {"message":"Unauthorized"} without', async () => {
    const writable = topic('rw', 'single')
    const readOnly = topic('sel', 'single')
    const sender = await appWithToken(userToken(randomUUID()))
    const onWritable = await joined(await clientAs('authenticated'), writable, { config: PRIVATE })
    const onReadOnly = await joined(await clientAs('authenticated'), readOnly, { config: PRIVATE })

    const ok = sender.supabase.channel(writable, { config: PRIVATE })
    assert.deepEqual(await ok.httpSend('single', { n: 1 }), { success: true })
    const got = await onWritable.broadcasts.find((m) => m.event === 'single', 3000, 'the httpSend message')
    assert.deepEqual(got.payload, { n: 1 })

    const denied = sender.supabase.channel(readOnly, { config: PRIVATE })
    await assert.rejects(denied.httpSend('single', { n: 2 }), (error) => error.message === 'Unauthorized')
    // the exact answer, as realtime-js posts it
    const res = await fetch(
      `${gw.url}/realtime/v1/api/broadcast/${encodeURIComponent(readOnly)}/events/single?apikey=${gw.anonKey}&vsn=2.0.0&private=true`,
      {
        method: 'POST',
        headers: { apikey: gw.anonKey, Authorization: `Bearer ${sender.state.token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ n: 3 }),
      },
    )
    assert.equal(res.status, 403)
    assert.deepEqual(await res.json(), { message: 'Unauthorized' })
    await privateBarrier(readOnly)
    await onReadOnly.broadcasts.find((m) => m.event === 'barrier', 3000, 'the barrier')
    assert.deepEqual(broadcastEvents(onReadOnly), ['barrier'], 'nothing of the refused sends arrived')
  })
})

test('a raw V2 join: the refusal frame carries the exact reason (§4.4)', async () => {
  const sock = await rawSocket(gw)
  try {
    const name = topic('none', 'raw')
    sock.send({
      join_ref: '1',
      ref: '1',
      topic: `realtime:${name}`,
      event: 'phx_join',
      payload: {
        config: { broadcast: { ack: false, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: true },
        access_token: userToken(randomUUID()),
      },
    })
    const reply = await sock.frames.find((f) => f.event === 'phx_reply' && f.ref === '1', 5000, 'the join reply')
    assert.deepEqual(reply.payload, { status: 'error', response: { reason: unauthorized(name) } })
    assert.equal(reply.join_ref, '1')
  } finally {
    await sock.close()
  }
})
