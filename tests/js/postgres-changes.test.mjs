// Postgres Changes end to end (protocol.md §4.3–4.5, §7): a throwaway PostgreSQL cluster, the gateway
// streaming its `supabase_realtime` publication, and supabase-js 2.119.1 apps subscribing with
// `.on('postgres_changes', { event, schema, table, filter }, cb)`. Raw sockets check what the client
// hides (the join reply's ids, the system message right after it, `data.columns`, one message per change
// with all matching binding ids).
//
// Filters: pg-filters.test.mjs. Value encodings: pg-values.test.mjs. RLS: pg-rls.test.mjs.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient, v1Client } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { COMMIT_TIMESTAMP, pgChannel, pgJoined, rawChanges, rawPgJoin, startPostgres } from './lib/postgres.mjs'
import { Inbox } from './lib/inbox.mjs'
import { rawSocket } from './lib/raw.mjs'

let db
let gw
const sockets = []

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create schema extra;
    grant usage on schema extra to anon, authenticated, service_role;
    create table public.items (
      id bigint primary key, title text, done bool not null default false, tags text[], meta jsonb,
      created_at timestamptz not null default now());
    create table public.items_full (id int primary key, title text, n int);
    alter table public.items_full replica identity full;
    create table public.other (id int primary key, v text);
    create table extra.things (id int primary key, name text);
    create table public.ordered (id int primary key, n int not null);
    create table public.race (id serial primary key, ch text not null);
    create table public.fanout (id int primary key, note text);
    create table public.not_published (id int primary key);
    grant select on public.items, public.items_full, public.other, public.ordered, public.race,
      public.fanout, public.not_published, extra.things to anon, authenticated;
    alter publication supabase_realtime add table public.items, public.items_full, public.other,
      extra.things, public.ordered, public.race, public.fanout;
  `)
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_main' } })
})

after(async () => {
  await closeClients()
  await Promise.all(sockets.map((s) => s.close().catch(() => {})))
  await gw?.stop()
  await db?.stop()
})

const room = (label) => `pgc-${label}-${randomUUID()}`
let nextId = 1000
const newId = () => ++nextId

async function raw() {
  const sock = await rawSocket(gw)
  sockets.push(sock)
  return sock
}

/** The commit time of the transaction that last wrote the row, formatted as commit_timestamp must be. */
async function commitTimestamp(table, id) {
  const [row] = await db.sql(
    `select to_char(pg_xact_commit_timestamp(xmin) at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') as ts
       from ${table} where id = $1`,
    [id],
  )
  return row.ts
}

const ITEMS_COLUMNS = [
  { name: 'id', type: 'int8' },
  { name: 'title', type: 'text' },
  { name: 'done', type: 'bool' },
  { name: 'tags', type: '_text' },
  { name: 'meta', type: 'jsonb' },
  { name: 'created_at', type: 'timestamptz' },
]

test('join reply echoes each entry verbatim with an integer id; "Subscribed to PostgreSQL" follows at once', async () => {
  const sock = await raw()
  const name = room('join')
  const entries = [
    { event: 'INSERT', schema: 'public', table: 'items' },
    { event: '*', schema: 'public', table: 'items', filter: 'id=eq.1' },
    { event: 'UPDATE', schema: 'extra', table: 'things' },
  ]
  const { topic, ref, reply } = await rawPgJoin(sock, name, entries)
  assert.equal(reply.join_ref, ref)
  assert.equal(reply.payload.status, 'ok', JSON.stringify(reply.payload))
  const echoed = reply.payload.response.postgres_changes
  assert.equal(echoed.length, entries.length)
  echoed.forEach((entry, i) => {
    const { id, ...rest } = entry
    assert.deepEqual(rest, entries[i], `entry ${i} echoed verbatim (no added keys)`)
    assert.ok(Number.isInteger(id), `entry ${i} id is an integer: ${JSON.stringify(id)}`)
  })
  assert.equal(new Set(echoed.map((e) => e.id)).size, 3, 'distinct entries get distinct ids')

  const system = await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000, 'system message')
  assert.deepEqual(system.payload, {
    extension: 'postgres_changes',
    status: 'ok',
    message: 'Subscribed to PostgreSQL',
    channel: name,
  })
  assert.equal(system.join_ref, ref)
  assert.equal(system.ref, null)
  const onTopic = sock.frames.items.filter((f) => f.topic === topic)
  assert.deepEqual(
    onTopic.slice(0, 2).map((f) => f.event),
    ['phx_reply', 'system'],
    'the system message is the first frame after the reply',
  )
})

test('INSERT: payload field by field (supabase-js and the raw frame)', async () => {
  const binding = { event: 'INSERT', schema: 'public', table: 'items' }
  const sub = await pgJoined(supabaseClient(gw), room('insert'), [binding])
  const sock = await raw()
  const { topic, reply } = await rawPgJoin(sock, room('insert-raw'), [binding])
  const bindingId = reply.payload.response.postgres_changes[0].id
  await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000)

  const id = newId()
  const [{ row }] = await db.sql(
    `insert into public.items (id, title, done, tags, meta, created_at)
     values ($1, 'hello', true, '{a,b}', '{"k":1,"nested":{"x":[1,2]}}', '2025-01-01 12:00:00.123456+00')
     returning to_jsonb(items) as row`,
    [id],
  )
  const ts = await commitTimestamp('public.items', id)

  const [payload] = await sub.events[0].count(1, 5000, 'the INSERT')
  assert.deepEqual(Object.keys(payload).sort(), ['commit_timestamp', 'errors', 'eventType', 'new', 'old', 'schema', 'table'])
  assert.equal(payload.schema, 'public')
  assert.equal(payload.table, 'items')
  assert.equal(payload.eventType, 'INSERT')
  assert.match(payload.commit_timestamp, COMMIT_TIMESTAMP)
  assert.equal(payload.commit_timestamp, ts, 'commit_timestamp is the commit time, in ms, UTC')
  assert.deepEqual(payload.new, {
    id,
    title: 'hello',
    done: true,
    tags: ['a', 'b'],
    meta: { k: 1, nested: { x: [1, 2] } },
    created_at: '2025-01-01T12:00:00.123456+00:00',
  })
  assert.deepEqual(payload.new, row, 'record equals to_jsonb(row)')
  assert.deepEqual(payload.old, {})
  assert.equal(payload.errors, null)

  const frame = await sock.frames.find((f) => f.topic === topic && f.event === 'postgres_changes', 5000, 'raw INSERT')
  assert.equal(frame.join_ref, null)
  assert.equal(frame.ref, null)
  assert.deepEqual(frame.payload.ids, [bindingId])
  const data = frame.payload.data
  assert.deepEqual(Object.keys(data).sort(), ['columns', 'commit_timestamp', 'errors', 'record', 'schema', 'table', 'type'])
  assert.equal(data.type, 'INSERT')
  assert.equal(data.schema, 'public')
  assert.equal(data.table, 'items')
  assert.equal(data.commit_timestamp, ts)
  assert.deepEqual(data.columns, ITEMS_COLUMNS)
  assert.deepEqual(data.record, row)
  assert.equal(data.errors, null)
  assert.ok(!('old_record' in data), 'INSERT has no old_record')
})

test('UPDATE and DELETE: new/old with the default replica identity (primary key only)', async () => {
  const bindings = [
    { event: 'UPDATE', schema: 'public', table: 'items' },
    { event: 'DELETE', schema: 'public', table: 'items' },
  ]
  const sub = await pgJoined(supabaseClient(gw), room('upd-del'), bindings)
  const sock = await raw()
  const { topic } = await rawPgJoin(sock, room('upd-del-raw'), bindings)
  await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000)

  const id = newId()
  await db.sql(`insert into public.items (id, title, tags) values ($1, 'before', '{x}')`, [id])
  const [{ row }] = await db.sql(
    `update public.items set title = 'after', done = true, meta = '[1,"two",null]' where id = $1 returning to_jsonb(items) as row`,
    [id],
  )
  const ts = await commitTimestamp('public.items', id)
  await db.sql(`delete from public.items where id = $1`, [id])

  const [upd] = await sub.events[0].count(1, 5000, 'the UPDATE')
  assert.equal(upd.eventType, 'UPDATE')
  assert.equal(upd.schema, 'public')
  assert.equal(upd.table, 'items')
  assert.equal(upd.commit_timestamp, ts)
  assert.deepEqual(upd.new, row)
  assert.equal(upd.new.title, 'after')
  assert.deepEqual(upd.new.meta, [1, 'two', null])
  assert.deepEqual(upd.old, { id }, 'old = identity columns (primary key)')
  assert.equal(upd.errors, null)

  const [del] = await sub.events[1].count(1, 5000, 'the DELETE')
  assert.equal(del.eventType, 'DELETE')
  assert.match(del.commit_timestamp, COMMIT_TIMESTAMP)
  assert.ok(del.commit_timestamp >= ts, 'the DELETE committed after the UPDATE')
  assert.deepEqual(del.new, {})
  assert.deepEqual(del.old, { id })
  assert.equal(del.errors, null)

  const frames = await sock.frames.until(
    () => rawChanges(sock, topic).length >= 2 && rawChanges(sock, topic),
    5000,
    'raw UPDATE and DELETE',
  )
  const [u, d] = frames.map((f) => f.payload.data)
  assert.equal(u.type, 'UPDATE')
  assert.deepEqual(u.columns, ITEMS_COLUMNS)
  assert.deepEqual(u.record, row)
  assert.deepEqual(u.old_record, { id })
  assert.equal(u.errors, null)
  assert.equal(d.type, 'DELETE')
  assert.deepEqual(d.columns, ITEMS_COLUMNS)
  assert.deepEqual(d.old_record, { id })
  assert.ok(!('record' in d), 'DELETE has no record')
  assert.equal(d.errors, null)
})

test('REPLICA IDENTITY FULL: old holds the whole previous row for UPDATE and DELETE', async () => {
  const sub = await pgJoined(supabaseClient(gw), room('full'), [{ event: '*', schema: 'public', table: 'items_full' }])
  const id = newId()
  await db.sql(`insert into public.items_full values ($1, 'one', 1)`, [id])
  await db.sql(`update public.items_full set title = 'two', n = 2 where id = $1`, [id])
  await db.sql(`delete from public.items_full where id = $1`, [id])
  const events = await sub.events[0].count(3, 5000, 'INSERT, UPDATE, DELETE')
  assert.deepEqual(
    events.map((e) => e.eventType),
    ['INSERT', 'UPDATE', 'DELETE'],
  )
  assert.deepEqual(events[0].new, { id, title: 'one', n: 1 })
  assert.deepEqual(events[0].old, {})
  assert.deepEqual(events[1].new, { id, title: 'two', n: 2 })
  assert.deepEqual(events[1].old, { id, title: 'one', n: 1 }, 'UPDATE old = whole previous row')
  assert.deepEqual(events[2].new, {})
  assert.deepEqual(events[2].old, { id, title: 'two', n: 2 }, 'DELETE old = whole deleted row')
})

test("event '*' gets INSERT, UPDATE and DELETE in commit order", async () => {
  const sub = await pgJoined(supabaseClient(gw), room('star'), [{ event: '*', schema: 'public', table: 'items' }])
  const id = newId()
  await db.sql(`insert into public.items (id, title) values ($1, 'a')`, [id])
  await db.sql(`update public.items set title = 'b' where id = $1`, [id])
  await db.sql(`delete from public.items where id = $1`, [id])
  const events = await sub.events[0].until(
    (items) => items.filter((e) => (e.new.id ?? e.old.id) === id).length >= 3 && items.filter((e) => (e.new.id ?? e.old.id) === id),
    5000,
    'three events',
  )
  assert.deepEqual(
    events.map((e) => [e.eventType, e.new.title, e.old.id]),
    [
      ['INSERT', 'a', undefined],
      ['UPDATE', 'b', id],
      ['DELETE', undefined, id],
    ],
  )
})

test("schema-wide { event: '*', schema: 'public' } gets every public table and nothing else", async () => {
  const sub = await pgJoined(supabaseClient(gw), room('schema'), [{ event: '*', schema: 'public' }])
  const id = newId()
  await db.sql(`insert into extra.things values ($1, 'elsewhere')`, [id])
  await db.sql(`insert into public.other values ($1, 'o')`, [id])
  await db.sql(`insert into public.items (id, title) values ($1, 'i')`, [id])
  await db.sql(`update public.other set v = 'o2' where id = $1`, [id])
  const events = await sub.events[0].count(3, 5000, 'three public changes')
  assert.deepEqual(
    events.map((e) => [e.schema, e.table, e.eventType, e.new.id]),
    [
      ['public', 'other', 'INSERT', id],
      ['public', 'items', 'INSERT', id],
      ['public', 'other', 'UPDATE', id],
    ],
    'extra.things (committed first) is not delivered',
  )
})

test('a table in a non-public schema streams', async () => {
  const sub = await pgJoined(supabaseClient(gw), room('extra'), [
    { event: '*', schema: 'extra', table: 'things' },
    { event: 'INSERT', schema: 'extra' },
  ])
  const id = newId()
  await db.sql(`insert into public.other values ($1, 'not extra')`, [id])
  await db.sql(`insert into extra.things values ($1, 'thing')`, [id])
  const [a] = await sub.events[0].count(1, 5000)
  const [b] = await sub.events[1].count(1, 5000)
  for (const e of [a, b]) {
    assert.equal(e.schema, 'extra')
    assert.equal(e.table, 'things')
    assert.equal(e.eventType, 'INSERT')
    assert.deepEqual(e.new, { id, name: 'thing' })
  }
})

test('overlapping bindings on one channel: one message per change carrying every matching id; each binding fires', async () => {
  const id = newId()
  const bindings = [
    { event: '*', schema: 'public', table: 'items' },
    { event: 'INSERT', schema: 'public', table: 'items' },
    { event: 'INSERT', schema: 'public', table: 'items', filter: `id=eq.${id}` },
    { event: 'UPDATE', schema: 'public', table: 'items' },
    { event: '*', schema: 'public' },
    { event: 'DELETE', schema: 'public', table: 'other' },
  ]
  const name = room('overlap')
  const sub = await pgJoined(supabaseClient(gw), name, bindings)
  const sock = await raw()
  const { topic, reply } = await rawPgJoin(sock, `${name}-raw`, bindings)
  const ids = reply.payload.response.postgres_changes.map((e) => e.id)
  await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000)

  await db.sql(`insert into public.items (id, title) values ($1, 'x')`, [id])
  await db.sql(`insert into public.items (id, title) values ($1, 'y')`, [id + 1])
  await db.sql(`update public.items set title = 'z' where id = $1`, [id])
  newId()

  const frames = await sock.frames.until(
    () => rawChanges(sock, topic).length >= 3 && rawChanges(sock, topic),
    5000,
    'three postgres_changes frames',
  )
  const sets = frames.map((f) => [f.payload.data.type, f.payload.data.record.id, [...f.payload.ids].sort((a, b) => a - b)])
  const pick = (...i) => i.map((k) => ids[k]).sort((a, b) => a - b)
  assert.deepEqual(sets, [
    ['INSERT', id, pick(0, 1, 2, 4)],
    ['INSERT', id + 1, pick(0, 1, 4)],
    ['UPDATE', id, pick(0, 3, 4)],
  ])
  for (const f of frames) assert.equal(new Set(f.payload.ids).size, f.payload.ids.length, 'no duplicate ids')

  await sub.all.count(10, 5000, 'ten callbacks')
  // a barrier for the bindings that must not fire: binding 5 fires on this DELETE, after everything above
  await db.sql(`insert into public.other values ($1, 'b')`, [id])
  await db.sql(`delete from public.other where id = $1`, [id])
  await sub.events[5].count(1, 5000, 'the barrier DELETE')
  assert.deepEqual(
    sub.events.map((e) => e.items.length),
    [3, 2, 1, 1, 3 + 2, 1],
    'callbacks per binding (binding 4 also sees the barrier INSERT and DELETE)',
  )
})

test('a 50-row transaction arrives complete and in statement order', async () => {
  const sub = await pgJoined(supabaseClient(gw), room('tx50'), [{ event: 'INSERT', schema: 'public', table: 'ordered' }])
  const base = newId() * 100
  // ids interleaved so neither id order nor n order is the statement order
  const order = Array.from({ length: 50 }, (_, i) => base + ((i * 17) % 50))
  const statements = order.map((id, i) => `insert into public.ordered values (${id}, ${i});`).join('\n')
  await db.sql(`begin;\n${statements}\ncommit;`)
  const events = await sub.events[0].count(50, 10_000, '50 inserts')
  assert.deepEqual(
    events.map((e) => e.new.id),
    order,
  )
  assert.deepEqual(
    events.map((e) => e.new.n),
    order.map((_, i) => i),
  )
  assert.equal(new Set(events.map((e) => e.commit_timestamp)).size, 1, 'one commit_timestamp for the transaction')
})

test('a write made the moment subscribe() reports SUBSCRIBED always arrives (ten fresh channels in a row)', async () => {
  for (let i = 0; i < 10; i++) {
    const name = room(`race${i}`)
    let insert
    const sub = pgChannel(supabaseClient(gw), name, [{ event: 'INSERT', schema: 'public', table: 'race', filter: `ch=eq.${name}` }], {
      onStatus(status) {
        if (status === 'SUBSCRIBED') insert = db.sql(`insert into public.race (ch) values ($1)`, [name])
      },
    })
    await sub.subscribed
    await insert
    const [event] = await sub.events[0].count(1, 5000, `channel ${i}: the insert made at SUBSCRIBED`)
    assert.equal(event.new.ch, name)
  }
})

test('realtime-js 2.11 (V1, strict binding comparison): bindings with and without a filter subscribe and fire', async () => {
  const client = v1Client(gw)
  const id = newId()
  const events = [new Inbox('2.11 binding 0'), new Inbox('2.11 binding 1')]
  const statuses = new Inbox('2.11 statuses')
  const system = new Inbox('2.11 system')
  client
    .channel(room('v1'))
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'other' }, (p) => events[0].push(p))
    .on('postgres_changes', { event: '*', schema: 'public', table: 'other', filter: `id=eq.${id}` }, (p) => events[1].push(p))
    .on('system', {}, (m) => system.push(m))
    .subscribe((status, err) => statuses.push({ status, err: err?.message }))
  const [first] = await statuses.count(1, 5000, 'a status')
  assert.equal(first.status, 'SUBSCRIBED', JSON.stringify(first))
  await system.find((m) => m.extension === 'postgres_changes' && m.status === 'ok', 5000, '"Subscribed to PostgreSQL"')
  await db.sql(`insert into public.other values ($1, 'v1')`, [id])
  const [a] = await events[0].count(1, 5000)
  const [b] = await events[1].count(1, 5000)
  for (const e of [a, b]) {
    assert.equal(e.eventType, 'INSERT')
    assert.equal(e.table, 'other')
    assert.deepEqual(e.new, { id, v: 'v1' })
    assert.match(e.commit_timestamp, COMMIT_TIMESTAMP)
  }
})

test('100 subscribers (100 clients) on one table all receive a change', async () => {
  const subs = Array.from({ length: 100 }, (_, i) =>
    pgChannel(supabaseClient(gw), room(`fan${i}`), [{ event: 'INSERT', schema: 'public', table: 'fanout' }], {
      timeoutMs: 20_000,
    }),
  )
  await Promise.all(subs.map((s) => s.ready))
  const id = newId()
  await db.sql(`insert into public.fanout values ($1, 'to all')`, [id])
  await Promise.all(
    subs.map(async (s, i) => {
      const [e] = await s.events[0].count(1, 10_000, `subscriber ${i}`)
      assert.deepEqual(e.new, { id, note: 'to all' })
    }),
  )
})

test("the seeds' tables (messages, presence, activity_stream) stream", async () => {
  const service = supabaseClient(gw, { key: gw.serviceKey })
  const sub = await pgJoined(service, room('seeds'), [
    { event: 'INSERT', schema: 'public', table: 'messages' },
    { event: 'UPDATE', schema: 'public', table: 'presence' },
    { event: 'INSERT', schema: 'public', table: 'activity_stream' },
  ])
  const alice = '11111111-1111-1111-1111-111111111111'
  const [msg] = await db.sql(
    `insert into public.messages (room_id, sender_id, content) values ('lobby', $1, 'hello from the test') returning id`,
    [alice],
  )
  await db.sql(`update public.presence set status = 'busy', typing_in = 'lobby' where user_id = $1`, [alice])
  const [act] = await db.sql(
    `insert into public.activity_stream (user_id, kind, payload) values ($1, 'level_up', '{"level": 6}') returning id`,
    [alice],
  )
  const [m] = await sub.events[0].count(1, 5000, 'messages INSERT')
  assert.equal(m.table, 'messages')
  assert.equal(m.new.id, Number(msg.id))
  assert.equal(m.new.room_id, 'lobby')
  assert.equal(m.new.sender_id, alice)
  assert.equal(m.new.recipient_id, null)
  assert.equal(m.new.content, 'hello from the test')
  assert.deepEqual(m.new.reactions, {})
  const [p] = await sub.events[1].count(1, 5000, 'presence UPDATE')
  assert.equal(p.table, 'presence')
  assert.equal(p.new.user_id, alice)
  assert.equal(p.new.status, 'busy')
  assert.equal(p.new.typing_in, 'lobby')
  // presence has REPLICA IDENTITY FULL (supabase/): the old record is the whole old row
  assert.equal(p.old.user_id, alice)
  assert.equal(p.old.typing_in, null)
  assert.notEqual(p.old.status, 'busy')
  const [a] = await sub.events[2].count(1, 5000, 'activity_stream INSERT')
  assert.equal(a.table, 'activity_stream')
  assert.equal(a.new.id, Number(act.id))
  assert.equal(a.new.kind, 'level_up')
  assert.deepEqual(a.new.payload, { level: 6 })
  assert.equal(a.new.is_public, true)
})

test('unknown table and table outside the publication: system error, the channel keeps working for broadcast', async () => {
  for (const table of ['nope', 'not_published']) {
    const name = room(`unknown-${table}`)
    const client = supabaseClient(gw)
    const sub = pgChannel(client, name, [{ event: 'INSERT', schema: 'public', table }], {
      config: { broadcast: { self: true } },
    })
    const got = new Inbox(`broadcasts of ${name}`)
    sub.channel.on('broadcast', { event: 'ping' }, (m) => got.push(m))
    await sub.subscribed
    const sys = await sub.system.find((m) => m.extension === 'postgres_changes', 5000, 'postgres_changes system message')
    assert.equal(sys.status, 'error')
    assert.equal(sys.channel, name)
    assert.ok(
      sys.message.startsWith('Unable to subscribe to changes with given parameters'),
      `message: ${sys.message}`,
    )
    if (table === 'nope') {
      assert.match(sys.message, /table: nope/)
    }
    assert.equal(sub.channel.state, 'joined')
    const status = await sub.channel.send({ type: 'broadcast', event: 'ping', payload: { table } })
    assert.equal(status, 'ok')
    const [echo] = await got.count(1, 5000, 'own broadcast')
    assert.deepEqual(echo.payload, { table })
  }
})

test('bad filter → "Error parsing `filter` params: ..." and the channel stays joined', async () => {
  for (const filter of ['id=foo.1', 'id=in.1,2', 'id=eq.1,,title=eq.a']) {
    const name = room('badfilter')
    const sub = pgChannel(supabaseClient(gw), name, [{ event: '*', schema: 'public', table: 'items', filter }])
    await sub.subscribed
    const sys = await sub.system.find((m) => m.extension === 'postgres_changes', 5000, 'postgres_changes system message')
    assert.equal(sys.status, 'error', `filter ${filter}`)
    assert.ok(sys.message.startsWith('Error parsing `filter` params: '), `filter ${filter}: ${sys.message}`)
    assert.equal(sub.channel.state, 'joined')
  }
})
