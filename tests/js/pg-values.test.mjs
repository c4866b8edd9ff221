// Value encodings in `record` / `old_record` (protocol.md §7.6): each value is what Postgres' own
// `to_jsonb(value)` gives, except bytea (hex digits without `\x`). Postgres is the oracle: the expected
// record is `to_jsonb(row)` of the same row. Raw frames are also checked as text for the values that
// JSON.parse would round (int8 beyond 2^53, numeric with many digits), and `columns` against the
// catalog (`pg_type.typname` in attribute order).

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgJoined, rawChanges, rawPgJoin, startPostgres } from './lib/postgres.mjs'
import { rawSocket } from './lib/raw.mjs'

let db
let gw
let sock
let topic
let sub

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create type public.mood as enum ('sad', 'ok', 'happy');
    create domain public.posint as int check (value > 0);
    create table public.vals (
      id int primary key,
      i2 int2, i4 int4, i8 int8, i8_big int8,
      num numeric, num_small numeric(6,2), num_nan numeric,
      f4 float4, f4_tenth float4, f8 float8, f8_nan float8, f8_inf float8, f8_ninf float8,
      b bool, b_false bool,
      t text, vc varchar(10), ch char(3),
      u uuid,
      j json, jb jsonb, jb_num jsonb, jb_str jsonb, jb_arr jsonb,
      ts timestamp, tstz timestamptz, d date, tm time, tmtz timetz,
      by bytea, by_empty bytea,
      ai int4[], at text[], ab bool[],
      m mood, p posint,
      iv interval, ip inet,
      nul text
    );
    alter table public.vals replica identity full;
    grant select on public.vals to anon, authenticated;
    alter publication supabase_realtime add table public.vals;
  `)
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_values' } })
  const binding = { event: '*', schema: 'public', table: 'vals' }
  sub = await pgJoined(supabaseClient(gw), `pgv-${randomUUID()}`, [binding])
  sock = await rawSocket(gw)
  ;({ topic } = await rawPgJoin(sock, `pgv-raw-${randomUUID()}`, [binding]))
  await sock.frames.find((f) => f.topic === topic && f.event === 'system', 5000)
})

after(async () => {
  await closeClients()
  await sock?.close()
  await gw?.stop()
  await db?.stop()
})

const VALUES = `(1,
  32767, -2147483648, 9007199254740993, -9223372036854775808,
  12345678901234567890.123456789012345678901234567890, 1234.5, 'NaN',
  1.5, 0.1, 3.141592653589793, 'NaN', 'Infinity', '-Infinity',
  true, false,
  E'héllo "quoted" \\\\ back\\nline 🚀', 'varchar', 'ab',
  '6f1c1b9e-0c4f-4a39-9d0e-2f1c3a4b5c6d',
  '{"b": 1, "a": [1, 2, {"c": null}], "s": "x"}', '{"k": {"n": 1.50, "t": true}}', '42', '"str"', '[1, "two", null]',
  '2025-01-01 12:00:00.123456', '2025-01-01 12:00:00.123456+02', '2025-01-01', '12:34:56.789', '12:00:00+05:30',
  '\\x0102030405ff', '',
  '{1,NULL,3}', '{a,NULL,"b c","d,e","\\"q\\""}', '{t,f,NULL}',
  'happy', 7,
  '1 day 02:03:04', '192.168.0.1/24',
  null)`

const NUMERIC_TYPES = new Set(['int2', 'int4', 'int8', 'float4', 'float8', 'numeric', 'oid'])

/** to_jsonb(row) with bytea as bare hex, as §7.6 says, and the same row's to_jsonb text per column. */
async function expected(id) {
  const [r] = await db.sql(
    `select to_jsonb(v) as row,
            (select jsonb_object_agg(key, value::text) from jsonb_each(to_jsonb(v))) as texts,
            encode(v.by, 'hex') as by_hex, encode(v.by_empty, 'hex') as by_empty_hex
       from public.vals v where id = $1`,
    [id],
  )
  r.row.by = r.by_hex
  r.row.by_empty = r.by_empty_hex
  return { row: r.row, texts: r.texts }
}

async function catalogColumns() {
  return db.sql(`
    select a.attname as name, t.typname as type
      from pg_attribute a join pg_type t on t.oid = a.atttypid
     where a.attrelid = 'public.vals'::regclass and a.attnum > 0 and not a.attisdropped
     order by a.attnum`)
}

/** What supabase-js hands the app for a raw record (lib/transformers.ts: only strings are converted). */
function clientView(columns, record) {
  const out = {}
  for (const { name, type } of columns) {
    if (!(name in record)) continue
    const value = record[name]
    const number = typeof value === 'string' && NUMERIC_TYPES.has(type) ? Number.parseFloat(value) : Number.NaN
    out[name] = Number.isNaN(number) ? value : number // 'NaN' stays a string
  }
  return out
}

function assertSameRecord(actual, wanted, what) {
  const diffs = []
  for (const key of new Set([...Object.keys(wanted), ...Object.keys(actual)])) {
    try {
      assert.deepStrictEqual(actual[key], wanted[key])
    } catch {
      diffs.push(`${key}: got ${JSON.stringify(actual[key])}, Postgres to_jsonb ${JSON.stringify(wanted[key])}`)
    }
  }
  assert.deepEqual(diffs, [], `${what} differs from to_jsonb(row)`)
}

let before1
test('INSERT: every value encoding equals to_jsonb (bytea as hex); columns carry the catalog type names', async () => {
  await db.sql(`insert into public.vals values ${VALUES}`)
  const { row, texts } = await expected(1)
  before1 = row
  const frame = await sock.frames.until(
    () => rawChanges(sock, topic).find((f) => f.payload.data.type === 'INSERT' && f.payload.data.record.id === 1),
    5000,
    'raw INSERT',
  )
  const data = frame.payload.data
  assert.deepEqual(data.columns, await catalogColumns())
  assertSameRecord(data.record, row, 'record')

  // spot checks against protocol.md §7.6, so a wrong oracle cannot hide a wrong encoding
  assert.equal(row.by, '0102030405ff')
  assert.equal(row.by_empty, '')
  assert.equal(row.ts, '2025-01-01T12:00:00.123456')
  assert.equal(row.tstz, '2025-01-01T10:00:00.123456+00:00')
  assert.equal(row.d, '2025-01-01')
  assert.equal(row.tm, '12:34:56.789')
  assert.equal(row.tmtz, '12:00:00+05:30')
  assert.deepEqual(row.ai, [1, null, 3])
  assert.deepEqual(row.at, ['a', null, 'b c', 'd,e', '"q"'])
  assert.equal(row.f8_nan, 'NaN')
  assert.equal(row.f8_inf, 'Infinity')
  assert.equal(row.f4_tenth, 0.1)
  assert.equal(row.m, 'happy')
  assert.equal(row.p, 7)
  assert.equal(row.ch, 'ab ')

  // exact digits on the wire, as Postgres writes them
  for (const column of ['i8', 'i8_big', 'num', 'num_small', 'f4', 'f4_tenth', 'f8']) {
    assert.ok(
      frame.text.includes(`"${column}":${texts[column]}`),
      `${column} is written ${texts[column]} on the wire: ${frame.text.match(new RegExp(`"${column}":[^,]*`))?.[0]}`,
    )
  }

  const [event] = await sub.events[0].count(1, 5000, 'supabase-js INSERT')
  assert.equal(event.eventType, 'INSERT')
  assert.deepEqual(event.new, clientView(data.columns, row))
  assert.ok(event.new.f8_nan === 'NaN' && event.new.f8_inf === Infinity && event.new.f8_ninf === -Infinity)
})

test('a row of NULLs: every column null', async () => {
  await db.sql(`insert into public.vals (id) values (2)`)
  const frame = await sock.frames.until(
    () => rawChanges(sock, topic).find((f) => f.payload.data.type === 'INSERT' && f.payload.data.record.id === 2),
    5000,
    'raw INSERT of row 2',
  )
  const columns = await catalogColumns()
  assert.deepEqual(
    frame.payload.data.record,
    Object.fromEntries(columns.map(({ name }) => [name, name === 'id' ? 2 : null])),
  )
})

test('UPDATE and DELETE with REPLICA IDENTITY FULL: old_record encodes the old values the same way', async () => {
  await db.sql(`update public.vals set t = 'changed', ai = '{}', jb = 'null', tstz = '1999-12-31 23:59:59+00' where id = 1`)
  const { row: after1 } = await expected(1)
  await db.sql(`delete from public.vals where id = 1`)
  const update = await sock.frames.until(
    () => rawChanges(sock, topic).find((f) => f.payload.data.type === 'UPDATE' && f.payload.data.record.id === 1),
    5000,
    'raw UPDATE',
  )
  assertSameRecord(update.payload.data.record, after1, 'UPDATE record')
  assertSameRecord(update.payload.data.old_record, before1, 'UPDATE old_record')
  assert.deepEqual(update.payload.data.record.ai, [])
  assert.equal(update.payload.data.record.jb, null)
  const del = await sock.frames.until(
    () => rawChanges(sock, topic).find((f) => f.payload.data.type === 'DELETE' && f.payload.data.old_record.id === 1),
    5000,
    'raw DELETE',
  )
  assertSameRecord(del.payload.data.old_record, after1, 'DELETE old_record')

  const events = await sub.events[0].until((items) => items.length >= 4 && items, 5000, 'supabase-js UPDATE and DELETE')
  const columns = update.payload.data.columns
  assert.deepEqual(events[2].new, clientView(columns, after1))
  assert.deepEqual(events[2].old, clientView(columns, before1))
  assert.deepEqual(events[3].old, clientView(columns, after1))
  assert.deepEqual(events[3].new, {})
})
