// The edges of the Postgres Changes payload (protocol.md §7.1 `select`, §7.4 errors, §7.5): the record
// size cap (413 with the ≤ 64-byte field rule, still delivered), tables without a primary key (400),
// column privileges (unselectable columns left out; 401 when the key is not selectable), unchanged TOAST
// values in an UPDATE (absent, or filled from the old row with REPLICA IDENTITY FULL), and `select`.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgJoined, rawChanges, rawPgJoin, startPostgres } from './lib/postgres.mjs'
import { rawSocket } from './lib/raw.mjs'

const MAX_RECORD_BYTES = 100_000

let db
let gw
const sockets = []

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create table public.big (id int primary key, small text, medium text, huge text);
    create table public.nopk (a int, b text);
    alter table public.nopk replica identity full;
    create table public.colpriv (id int primary key, visible text, secret text);
    create table public.keyhidden (id int primary key, name text);
    create table public.toasty (id int primary key, n int, blob text);
    create table public.toasty_full (id int primary key, n int, blob text);
    alter table public.toasty_full replica identity full;
    create table public.sel (id int primary key, title text, body text, extra int);
    grant select on public.big, public.nopk, public.toasty, public.toasty_full, public.sel to anon, authenticated;
    grant select (id, visible) on public.colpriv to anon, authenticated;
    grant select (name) on public.keyhidden to anon, authenticated;
    alter publication supabase_realtime add table public.big, public.nopk, public.colpriv, public.keyhidden,
      public.toasty, public.toasty_full, public.sel;
  `)
  gw = await startGateway({
    env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_limits', MAX_RECORD_BYTES: String(MAX_RECORD_BYTES) },
  })
})

after(async () => {
  await closeClients()
  await Promise.all(sockets.map((s) => s.close().catch(() => {})))
  await gw?.stop()
  await db?.stop()
})

const room = (label) => `pgl-${label}-${randomUUID()}`

/** A raw socket joined with `entries`; resolves once "Subscribed to PostgreSQL" (or an error) arrived. */
async function rawJoined(label, entries) {
  const sock = await rawSocket(gw)
  sockets.push(sock)
  const { topic, reply } = await rawPgJoin(sock, room(label), entries)
  assert.equal(reply.payload.status, 'ok', JSON.stringify(reply.payload))
  const system = await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000, 'system message')
  return { sock, topic, system: system.payload, next: (n, what) => nextChanges(sock, topic, n, what) }
}

const nextChanges = (sock, topic, n, what) =>
  sock.frames.until(() => rawChanges(sock, topic).length >= n && rawChanges(sock, topic).map((f) => f.payload.data), 5000, what)

/** Incompressible text of `n` characters (so Postgres has to store it out of line). */
const noise = (n) => {
  let s = ''
  while (s.length < n) s += randomUUID().replaceAll('-', '')
  return s.slice(0, n)
}

test('over MAX_RECORD_BYTES: delivered with errors ["Error 413: Payload Too Large"], fields of ≤ 64 JSON bytes kept', async () => {
  const { system, next } = await rawJoined('big', [{ event: '*', schema: 'public', table: 'big' }])
  assert.equal(system.status, 'ok')
  const huge = noise(MAX_RECORD_BYTES + 1000)
  const fits = 'x'.repeat(62) // "x…x" is 64 bytes of JSON text
  const over = 'y'.repeat(63) // 65 bytes
  await db.sql(`insert into public.big values (1, $1, $2, $3)`, [fits, over, huge])
  await db.sql(`insert into public.big values (2, 'small', $1, 'not huge')`, [over])
  const [first, second] = await next(2, 'two INSERTs')
  assert.deepEqual(first.errors, ['Error 413: Payload Too Large'])
  assert.deepEqual(first.record, { id: 1, small: fits }, 'only fields whose JSON text is ≤ 64 bytes')
  assert.deepEqual(
    first.columns.map((c) => c.name),
    ['id', 'small', 'medium', 'huge'],
  )
  assert.equal(second.errors, null, 'a row under the cap is whole')
  assert.deepEqual(second.record, { id: 2, small: 'small', medium: over, huge: 'not huge' })
})

test('a table without a primary key: INSERT and UPDATE give the 400 payload', async () => {
  const { next } = await rawJoined('nopk', [{ event: '*', schema: 'public', table: 'nopk' }])
  await db.sql(`insert into public.nopk values (1, 'a')`)
  await db.sql(`update public.nopk set b = 'b'`)
  const [ins, upd] = await next(2, 'INSERT and UPDATE')
  assert.deepEqual(ins, {
    schema: 'public',
    table: 'nopk',
    type: 'INSERT',
    columns: [],
    record: {},
    commit_timestamp: null,
    errors: ['Error 400: Bad Request, no primary key'],
  })
  assert.deepEqual(upd, {
    schema: 'public',
    table: 'nopk',
    type: 'UPDATE',
    columns: [],
    record: {},
    old_record: {},
    commit_timestamp: null,
    errors: ['Error 400: Bad Request, no primary key'],
  })
})

test('column privileges: unselectable columns are left out; an unselectable key gives the 401 payload', async () => {
  const a = await rawJoined('colpriv', [{ event: 'INSERT', schema: 'public', table: 'colpriv' }])
  const b = await rawJoined('keyhidden', [{ event: 'INSERT', schema: 'public', table: 'keyhidden' }])
  await db.sql(`insert into public.colpriv values (1, 'shown', 'hidden')`)
  await db.sql(`insert into public.keyhidden values (1, 'name')`)
  const [row] = await a.next(1, 'colpriv INSERT')
  assert.deepEqual(row.columns, [
    { name: 'id', type: 'int4' },
    { name: 'visible', type: 'text' },
  ])
  assert.deepEqual(row.record, { id: 1, visible: 'shown' })
  assert.equal(row.errors, null)
  const [hidden] = await b.next(1, 'keyhidden INSERT')
  assert.deepEqual(hidden, {
    schema: 'public',
    table: 'keyhidden',
    type: 'INSERT',
    columns: [],
    record: {},
    commit_timestamp: null,
    errors: ['Error 401: Unauthorized'],
  })
})

test('unchanged TOAST value in an UPDATE: absent from record (still in columns); filled from the old row with REPLICA IDENTITY FULL', async () => {
  const { next } = await rawJoined('toast', [
    { event: 'UPDATE', schema: 'public', table: 'toasty' },
    { event: 'UPDATE', schema: 'public', table: 'toasty_full' },
  ])
  const blob = noise(20_000)
  await db.sql(`insert into public.toasty values (1, 1, $1)`, [blob])
  await db.sql(`insert into public.toasty_full values (1, 1, $1)`, [blob])
  await db.sql(`update public.toasty set n = 2 where id = 1`)
  await db.sql(`update public.toasty_full set n = 2 where id = 1`)
  const [plain, full] = await next(2, 'two UPDATEs')
  assert.equal(plain.table, 'toasty')
  assert.deepEqual(plain.record, { id: 1, n: 2 }, 'the unchanged TOAST column is absent')
  assert.deepEqual(
    plain.columns.map((c) => c.name),
    ['id', 'n', 'blob'],
  )
  assert.deepEqual(plain.old_record, { id: 1 })
  assert.equal(full.table, 'toasty_full')
  assert.deepEqual(full.record, { id: 1, n: 2, blob }, 'filled from the old row')
  assert.deepEqual(full.old_record, { id: 1, n: 1, blob })
})

test('`select`: only the listed columns plus the primary key, through supabase-js', async () => {
  const binding = { event: '*', schema: 'public', table: 'sel', select: ['title', 'extra'] }
  const sub = await pgJoined(supabaseClient(gw), room('select'), [binding])
  const raw = await rawJoined('select-raw', [binding])
  await db.sql(`insert into public.sel values (1, 't', 'long body', 7)`)
  await db.sql(`update public.sel set body = 'changed', title = 't2' where id = 1`)
  const [ins, upd] = await sub.events[0].count(2, 5000, 'INSERT and UPDATE')
  assert.deepEqual(ins.new, { id: 1, title: 't', extra: 7 })
  assert.deepEqual(upd.new, { id: 1, title: 't2', extra: 7 })
  assert.deepEqual(upd.old, { id: 1 })
  const [frame] = await raw.next(1, 'raw INSERT')
  assert.deepEqual(frame.columns, [
    { name: 'id', type: 'int4' },
    { name: 'title', type: 'text' },
    { name: 'extra', type: 'int4' },
  ])
})
