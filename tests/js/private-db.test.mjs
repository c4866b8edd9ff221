// Broadcast from the database and replay (protocol.md §5.5, §5.6, §8.3–8.4): `realtime.send()` and
// `realtime.broadcast_changes()` write realtime.messages; the gateway tails the inserts over the WAL and
// delivers them with meta {"id": <row id>} — public ones (private = false) to public channels, private
// ones (the default) only to private channels whose broadcast read passed. Replay on a private channel
// delivers the newest `limit` stored messages since `since`, oldest first, with meta.replayed.
//
// Policies (authenticated, by topic prefix): db:* read; ponly:* presence read only; rp:* read;
// room:* members of the room (public.room_members) read.
//
// Database broadcasts are delivered in commit order, and all of them pass through one stream, so a
// later message arriving shows every earlier one has been routed: absence is proved by a later barrier.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { channel, closeClients, joined, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { delay, within } from './lib/inbox.mjs'
import { presenceJoined } from './lib/presence-helpers.mjs'
import { startPostgres } from './lib/postgres.mjs'
import { rawSocket } from './lib/raw.mjs'

let db
let gw
let barrierSub
let barrierTopic

const SETUP = `
  create table public.room_members (
    room text not null,
    user_id uuid not null,
    primary key (room, user_id)
  );
  grant select on public.room_members to authenticated;

  create policy "members read their rooms" on realtime.messages for select to authenticated
    using (exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid()));
  create policy "db: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'db');
  create policy "ponly: presence read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'ponly' and realtime.messages.extension = 'presence');
  create policy "rp: read" on realtime.messages for select to authenticated
    using (split_part(realtime.topic(), ':', 1) = 'rp');

  -- the app's trigger: every change of a room message goes to the room's private topic
  create function public.broadcast_room_message() returns trigger
  language plpgsql security definer set search_path = '' as $$
  begin
    if coalesce(new.room_id, old.room_id) is not null then
      perform realtime.broadcast_changes(
        'room:' || coalesce(new.room_id, old.room_id), tg_op, tg_op, tg_table_name, tg_table_schema, new, old);
    end if;
    return null;
  end
  $$;
  create trigger broadcast_room_message after insert or update or delete on public.messages
    for each row execute function public.broadcast_room_message();
`

before(async () => {
  db = await startPostgres()
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'private_db' } })
  await db.sql(SETUP)
  barrierTopic = `barrier-${randomUUID()}`
  barrierSub = await joined(supabaseClient(gw), barrierTopic)
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const topic = (prefix, label) => `${prefix}:${label}-${randomUUID()}`
const userToken = (sub) => gw.sign({ role: 'authenticated', sub, aud: 'authenticated' })
const PRIVATE = { private: true }

/** supabase-js as a signed-in user (the `accessToken` option; realtime auth set before subscribing). */
async function userClient(sub = randomUUID()) {
  const supabase = supabaseClient(gw, { accessToken: async () => userToken(sub), realtime: { timeout: 5000 } })
  await supabase.realtime.setAuth()
  return supabase
}

let barrierCount = 0
/** Waits until every row committed so far has passed through the gateway's stream. */
async function streamed() {
  const n = ++barrierCount
  await db.sql(`select realtime.send(jsonb_build_object('n', $1::int), 'barrier', $2, false)`, [n, barrierTopic])
  await barrierSub.broadcasts.find((m) => m.payload.n === n, 5000, `stream barrier ${n}`)
}

/** `realtime.send` in a transaction of its own. */
const send = (payload, event, name, ...privateFlag) =>
  db.sql(
    privateFlag.length
      ? `select realtime.send($1::jsonb, $2, $3, $4)`
      : `select realtime.send($1::jsonb, $2, $3)`,
    [JSON.stringify(payload), event, name, ...privateFlag],
  )

async function rowId(name, filter) {
  const rows = await db.sql(
    `select id::text as id from realtime.messages where topic = $1 and payload @> $2::jsonb`,
    [name, JSON.stringify(filter)],
  )
  assert.equal(rows.length, 1, `one stored row for ${JSON.stringify(filter)} on ${name}`)
  return rows[0].id
}

async function refusal(supabase, name, config) {
  const sub = channel(supabase, name, { config })
  const first = await sub.statuses.find(() => true, 5000, `a subscribe status for ${name}`)
  await within(supabase.removeChannel(sub.channel), 3000, 'removeChannel').catch(() => {})
  assert.equal(first.status, 'CHANNEL_ERROR', `expected the join of ${name} to be refused, got ${first.status}`)
  return first.err?.message
}

describe('realtime.send()', () => {
  test('private = false reaches public subscribers only; the default (private) reaches private readers only', async () => {
    const name = topic('db', 'send')
    const pub = await joined(supabaseClient(gw), name)
    const pubV1 = await joined(v1Client(gw), name)
    const priv = await joined(await userClient(), name, { config: PRIVATE })
    const privB = await joined(await userClient(), name, { config: PRIVATE })

    await send({ n: 1 }, 'ev', name, false)
    await send({ n: 2 }, 'ev', name, true)
    await send({ n: 3 }, 'ev', name, false)
    await send({ n: 4 }, 'ev', name) // private defaults to true
    for (const sub of [pub, pubV1]) await sub.broadcasts.find((m) => m.payload.n === 3, 5000, 'n=3 on public')
    for (const sub of [priv, privB]) await sub.broadcasts.find((m) => m.payload.n === 4, 5000, 'n=4 on private')

    const ns = (sub) => sub.broadcasts.items.map((m) => m.payload.n)
    assert.deepEqual(ns(pub), [1, 3], 'public (supabase-js V2)')
    assert.deepEqual(ns(pubV1), [1, 3], 'public (realtime-js 2.11, V1)')
    assert.deepEqual(ns(priv), [2, 4], 'private')
    assert.deepEqual(ns(privB), [2, 4], 'private, second reader')

    // §5.5: payload gets "id" = the row id, delivered as meta {"id"} too
    const id1 = await rowId(name, { n: 1 })
    assert.match(id1, UUID)
    assert.deepEqual(pub.broadcasts.items[0], { type: 'broadcast', event: 'ev', payload: { n: 1, id: id1 }, meta: { id: id1 } })
    assert.deepEqual(pubV1.broadcasts.items[0], { type: 'broadcast', event: 'ev', payload: { n: 1, id: id1 }, meta: { id: id1 } })
    const id4 = await rowId(name, { n: 4 })
    assert.deepEqual(priv.broadcasts.items[1], { type: 'broadcast', event: 'ev', payload: { n: 4, id: id4 }, meta: { id: id4 } })
  })

  test('a payload that has its own "id" keeps it; meta.id is the row id', async () => {
    const name = topic('db', 'own-id')
    const priv = await joined(await userClient(), name, { config: PRIVATE })
    await send({ id: 'mine', text: 'x' }, 'own', name)
    const got = await priv.broadcasts.find((m) => m.event === 'own', 5000, 'the message')
    const id = await rowId(name, { id: 'mine' })
    assert.deepEqual(got, { type: 'broadcast', event: 'own', payload: { id: 'mine', text: 'x' }, meta: { id } })
  })

  test('a rolled-back send is never delivered', async () => {
    const name = topic('db', 'rollback')
    const priv = await joined(await userClient(), name, { config: PRIVATE })
    const client = await db.connect()
    await client.query('begin')
    await client.query(`select realtime.send('{"n": "rolled back"}'::jsonb, 'ev', $1)`, [name])
    await client.query('rollback')
    await client.end()
    await send({ n: 'committed' }, 'ev', name)
    await priv.broadcasts.find((m) => m.payload.n === 'committed', 5000, 'the committed message')
    assert.deepEqual(priv.broadcasts.items.map((m) => m.payload.n), ['committed'])
  })

  test('a channel with presence read only never receives private broadcasts', async () => {
    const supabase = await userClient()
    const presenceOnly = topic('ponly', 'reader')
    const readable = topic('db', 'next-to-ponly')
    const ponly = await presenceJoined(supabase, presenceOnly, { key: 'me', config: PRIVATE })
    const other = await joined(supabase, readable, { config: PRIVATE })
    // without presence enabled only broadcast read is checked at join: refused
    const noPresence = topic('ponly', 'no-presence')
    assert.equal(
      await refusal(await userClient(), noPresence, PRIVATE),
      `Unauthorized: You do not have permissions to read from this Channel topic: ${noPresence}`,
    )
    await send({ n: 1 }, 'ev', presenceOnly)
    await send({ n: 2 }, 'ev', readable)
    // same socket, same stream: n=2 arriving after n=1 was routed
    await other.broadcasts.find((m) => m.payload.n === 2, 5000, 'n=2 on the readable channel')
    assert.deepEqual(ponly.broadcasts.items, [], 'no broadcast on the presence-only channel')
  })
})

test('realtime.broadcast_changes() from a trigger on public.messages reaches the room’s private channel', async () => {
  const [A, B, C] = [randomUUID(), randomUUID(), randomUUID()]
  const roomId = `r-${randomUUID()}`
  const name = `room:${roomId}`
  await db.sql(`insert into public.room_members (room, user_id) values ($1, $2), ($1, $3)`, [name, A, B])
  const member = await joined(await userClient(B), name, { config: PRIVATE })
  const publicSub = await joined(supabaseClient(gw), name)
  assert.equal(
    await refusal(await userClient(C), name, PRIVATE),
    `Unauthorized: You do not have permissions to read from this Channel topic: ${name}`,
    'a non-member cannot join the room',
  )

  // A writes as an app does: under RLS, as role authenticated with its claims
  const client = await db.connect()
  await client.query('begin')
  await client.query(`select set_config('role', 'authenticated', true), set_config('request.jwt.claims', $1, true)`, [
    JSON.stringify({ role: 'authenticated', sub: A }),
  ])
  const {
    rows: [inserted],
  } = await client.query(`insert into public.messages (room_id, content) values ($1, 'hello room') returning id`, [roomId])
  await client.query('commit')
  await client.end()
  const messageId = Number(inserted.id)
  const [{ row: asInserted }] = await db.sql(`select to_jsonb(m) as row from public.messages m where id = $1`, [messageId])

  await db.sql(`update public.messages set content = 'edited' where id = $1`, [messageId])
  const [{ row: asUpdated }] = await db.sql(`select to_jsonb(m) as row from public.messages m where id = $1`, [messageId])
  await db.sql(`delete from public.messages where id = $1`, [messageId])

  const got = await member.broadcasts.count(3, 5000, 'INSERT, UPDATE, DELETE')
  assert.deepEqual(got.map((m) => m.event), ['INSERT', 'UPDATE', 'DELETE'])
  for (const m of got) {
    assert.equal(m.type, 'broadcast')
    assert.match(m.meta?.id ?? '', UUID, 'meta.id')
    assert.equal(m.payload.id, m.meta.id, 'payload.id is the row id (realtime.send adds it)')
  }
  const body = ({ id, ...rest }) => rest
  assert.deepEqual(body(got[0].payload), {
    operation: 'INSERT',
    schema: 'public',
    table: 'messages',
    record: asInserted,
    old_record: null,
  })
  assert.equal(got[0].payload.record.sender_id, A, 'sender_id = auth.uid() of the writer')
  assert.equal(got[0].payload.record.content, 'hello room')
  assert.deepEqual(body(got[1].payload), {
    operation: 'UPDATE',
    schema: 'public',
    table: 'messages',
    record: asUpdated,
    old_record: asInserted,
  })
  assert.deepEqual(body(got[2].payload), {
    operation: 'DELETE',
    schema: 'public',
    table: 'messages',
    record: null,
    old_record: asUpdated,
  })
  // private by default: the public channel of the same name got none of it
  await send({ n: 'public barrier' }, 'barrier', name, false)
  await publicSub.broadcasts.find((m) => m.event === 'barrier', 5000, 'the public barrier')
  assert.deepEqual(publicSub.broadcasts.items.map((m) => m.event), ['barrier'])
})

describe('replay (config.broadcast.replay)', () => {
  test('since and limit: the newest `limit` since `since`, delivered oldest first with meta.replayed', async () => {
    const name = topic('rp', 'replay')
    const other = topic('rp', 'other')
    for (let i = 1; i <= 3; i++) await send({ i, age: 'old' }, 'old', name)
    const [{ since }] = await db.sql(`select floor(extract(epoch from clock_timestamp()) * 1000)::bigint + 1 as since`)
    await delay(10) // rows from here on are inserted at least 10 ms after `since`
    for (let i = 1; i <= 6; i++) await send({ i, age: 'new' }, 'new', name)
    await send({ i: 'public' }, 'new', name, false) // public rows are never replayed
    await send({ i: 'elsewhere' }, 'new', other) // nor other topics
    await streamed() // everything above has been through the live stream: no live copy can follow the join
    const ids = await db.sql(
      `select id::text as id, payload->>'i' as i from realtime.messages where topic = $1 and private and event = 'new' order by inserted_at`,
      [name],
    )
    assert.equal(ids.length, 6)

    const sinceMs = Number(since)
    const sub = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: sinceMs, limit: 4 } } },
    })
    const replayed = await sub.broadcasts.count(4, 5000, '4 replayed messages')
    // then a live one: exactly 4 replayed before it
    await send({ i: 'live' }, 'live', name)
    await sub.broadcasts.find((m) => m.event === 'live', 5000, 'the live message after the replay')
    assert.deepEqual(
      sub.broadcasts.items.map((m) => [m.event, m.payload.i, m.meta?.replayed ?? false]),
      [
        ['new', 3, true],
        ['new', 4, true],
        ['new', 5, true],
        ['new', 6, true],
        ['live', 'live', false],
      ],
    )
    for (const [k, m] of replayed.entries()) {
      assert.deepEqual(m.meta, { replayed: true, id: ids[k + 2].id }, `meta of replayed message ${k}`)
      assert.equal(m.payload.id, ids[k + 2].id)
      assert.equal(m.payload.age, 'new')
      assert.equal(m.type, 'broadcast')
    }
    const live = sub.broadcasts.items[4]
    assert.deepEqual(Object.keys(live.meta).sort(), ['id'], 'a live message carries meta {id} only')

    // limit above the count: all six new ones (and the live one, it is newer than since too)
    const all = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: sinceMs, limit: 25 } } },
    })
    await all.broadcasts.count(7, 5000, '7 replayed messages')
    // since 0: the old ones too
    const everything = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: 0, limit: 25 } } },
    })
    await everything.broadcasts.count(10, 5000, '10 replayed messages')
    await send({ i: 'end' }, 'end', name)
    for (const s of [all, everything]) await s.broadcasts.find((m) => m.event === 'end', 5000, 'the end marker')
    assert.deepEqual(
      all.broadcasts.items.map((m) => m.payload.i),
      [1, 2, 3, 4, 5, 6, 'live', 'end'],
    )
    assert.deepEqual(
      everything.broadcasts.items.map((m) => `${m.event}${m.payload.i}`),
      ['old1', 'old2', 'old3', 'new1', 'new2', 'new3', 'new4', 'new5', 'new6', 'livelive', 'endend'],
    )
    assert.ok(everything.broadcasts.items.slice(0, 10).every((m) => m.meta.replayed === true))
  })

  test('limit is clamped to 1..25', async () => {
    const name = topic('rp', 'bulk')
    await db.sql(
      `select realtime.send(jsonb_build_object('i', g), 'bulk', $1) from generate_series(1, 30) g`,
      [name],
    )
    await streamed()
    const sub = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: 0, limit: 100 } } },
    })
    await sub.broadcasts.count(25, 5000, '25 replayed messages')
    await send({ i: 'end' }, 'end', name)
    await sub.broadcasts.find((m) => m.event === 'end', 5000, 'the end marker')
    assert.equal(sub.broadcasts.items.filter((m) => m.meta?.replayed).length, 25)
    // and at least 1
    const one = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: 0, limit: 0 } } },
    })
    await send({ i: 'end 2' }, 'end', name)
    await one.broadcasts.find((m) => m.payload.i === 'end 2', 5000, 'the second end marker')
    assert.deepEqual(
      one.broadcasts.items.map((m) => [m.event, m.meta?.replayed ?? false]),
      [
        ['end', true],
        ['end', false],
      ],
      'limit 0 replays the newest one',
    )
  })

  test('binary rows (realtime.send_binary): delivered live as bytes with meta.id, replayed as bytes with meta.replayed', async () => {
    const name = topic('rp', 'binary')
    const live = await joined(await userClient(), name, { config: PRIVATE })
    await db.sql(`select realtime.send_binary('\\x010203'::bytea, 'bin', $1)`, [name])
    const got = await live.broadcasts.find((m) => m.event === 'bin', 5000, 'the binary message')
    assert.ok(got.payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(got.payload)}`)
    assert.deepEqual([...new Uint8Array(got.payload)], [1, 2, 3])
    const [{ id }] = await db.sql(`select id::text as id from realtime.messages where topic = $1`, [name])
    assert.deepEqual(got.meta, { id })

    const replay = await joined(await userClient(), name, {
      config: { ...PRIVATE, broadcast: { replay: { since: 0, limit: 5 } } },
    })
    const again = await replay.broadcasts.find((m) => m.event === 'bin', 5000, 'the replayed binary message')
    assert.ok(again.payload instanceof ArrayBuffer, `payload is ${Object.prototype.toString.call(again.payload)}`)
    assert.deepEqual([...new Uint8Array(again.payload)], [1, 2, 3])
    assert.deepEqual(again.meta, { replayed: true, id })
  })

  test('refusals: public channel, invalid since, no broadcast read', async () => {
    // realtime-js refuses replay on a public channel itself; the gateway does too (raw join)
    assert.throws(
      () => supabaseClient(gw).channel(topic('rp', 'public'), { config: { broadcast: { replay: { since: 0 } } } }),
      /replay on public channel/,
    )
    const sock = await rawSocket(gw)
    try {
      sock.send({
        join_ref: '1',
        ref: '1',
        topic: `realtime:${topic('rp', 'public-raw')}`,
        event: 'phx_join',
        payload: {
          config: {
            broadcast: { ack: false, self: false, replay: { since: 0, limit: 5 } },
            presence: { key: '', enabled: false },
            postgres_changes: [],
            private: false,
          },
        },
      })
      const reply = await sock.frames.find((f) => f.event === 'phx_reply' && f.ref === '1', 5000, 'the join reply')
      assert.deepEqual(reply.payload, {
        status: 'error',
        response: { reason: 'UnableToReplayMessages: Replay is not allowed for public channels' },
      })
    } finally {
      await sock.close()
    }

    assert.equal(
      await refusal(await userClient(), topic('rp', 'bad-since'), {
        ...PRIVATE,
        broadcast: { replay: { since: 'yesterday', limit: 5 } },
      }),
      'UnableToReplayMessages: Replay params are not valid',
    )
    // presence read passes the join, but replay needs broadcast read (§5.6)
    const ponly = topic('ponly', 'replay')
    const supabase = await userClient()
    const ch = supabase.channel(ponly, { config: { ...PRIVATE, broadcast: { replay: { since: 0 } }, presence: { key: 'k' } } })
    ch.on('presence', { event: 'sync' }, () => {})
    const status = new Promise((resolve) => ch.subscribe((s, err) => resolve({ s, err })))
    const first = await within(status, 5000, 'a subscribe status')
    await within(supabase.removeChannel(ch), 3000, 'removeChannel').catch(() => {})
    assert.equal(first.s, 'CHANNEL_ERROR')
    assert.equal(first.err?.message, `Unauthorized: You do not have permissions to read from this Channel topic: ${ponly}`)
  })
})
