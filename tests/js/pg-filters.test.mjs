// Postgres Changes filters (protocol.md §7.2): every operator, the `not.` prefix, quoting, comma-AND,
// compared with Postgres' own semantics for the column's type. Postgres is the oracle: for each filter the
// expected rows are what `select id from f where <equivalent SQL>` returns.
//
// Each filter gets its own supabase-js channel with two bindings: the filtered one on `f` and an
// unfiltered one on `barrier`. Rows are written to `f` in one transaction, then one row to `barrier`;
// changes reach a channel in commit order, so once the barrier row has arrived everything the filter was
// going to let through has arrived too.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgChannel, startPostgres } from './lib/postgres.mjs'

let db
let gw

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create table public.f (
      id int primary key, n int, price numeric, name text, flag bool, note text, at timestamptz, u uuid,
      label varchar(20));
    create table public.f_full (id int primary key, n int, name text);
    alter table public.f_full replica identity full;
    create table public.barrier (id serial primary key);
    grant select on public.f, public.f_full, public.barrier to anon, authenticated;
    alter publication supabase_realtime add table public.f, public.f_full, public.barrier;
  `)
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_filters' } })
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const room = (label) => `pgf-${label}-${randomUUID()}`

const U1 = '0b7a1b9e-6c4f-4a39-9d0e-2f1c3a4b5c6d'

// id, n, price, name, flag, note, at, u, label
const ROWS = `
  (1, 1, 1.5, 'alpha', true, 'x', '2024-06-01 00:00:00+00', '${U1}', 'abc'),
  (2, 2, 10.50, 'Alpine', false, null, '2025-01-01 00:00:00+00', null, 'ABC'),
  (3, 3, 10.5, 'beta', null, 'y', '2025-01-01 00:00:00.000001+00', null, null),
  (4, 5, 100, 'bat', true, 'X', '2025-06-01 12:00:00+02', gen_random_uuid(), 'b'),
  (5, null, null, null, null, null, null, null, null),
  (6, 5, -3, 'a,b', false, 'x', '2023-01-01 00:00:00+00', null, 'a,b'),
  (7, 7, 9.99, 'Beta"q', true, 'z', '2026-01-01 00:00:00+00', null, 'c'),
  (8, 10, 1e3, 'gamma', true, '', '2024-12-31 23:59:59.999999+00', null, 'abc')
`
const TOTAL = 8

/** [filter as an app writes it, the same condition in SQL] */
const FILTERS = [
  ['n=eq.5', 'n = 5'],
  ['n=neq.5', 'n <> 5'],
  ['n=lt.5', 'n < 5'],
  ['n=lte.5', 'n <= 5'],
  ['n=gt.5', 'n > 5'],
  ['n=gte.5', 'n >= 5'],
  ['n=in.(1,3,5)', `n = any('{1,3,5}'::int[])`],
  ['name=in.(alpha,beta)', `name = any('{alpha,beta}'::text[])`],
  ['name=in.(alpha,"a,b")', `name = any('{alpha,"a,b"}'::text[])`],
  ['name=like.al%', `name like 'al%'`],
  ['name=ilike.AL%', `name ilike 'AL%'`],
  ['name=match.^b.t$', `name ~ '^b.t$'`],
  ['name=imatch.^BETA', `name ~* '^BETA'`],
  ['note=is.null', 'note is null'],
  ['flag=is.true', 'flag is true'],
  ['flag=is.false', 'flag is false'],
  ['flag=is.unknown', 'flag is unknown'],
  ['note=isdistinct.x', `note is distinct from 'x'`],
  ['n=not.eq.5', 'not (n = 5)'],
  ['n=not.lt.5', 'not (n < 5)'],
  ['n=not.in.(1,3,5)', `not (n = any('{1,3,5}'::int[]))`],
  ['name=not.like.a%', `not (name like 'a%')`],
  ['name=not.ilike.a%', `not (name ilike 'a%')`],
  ['name=not.match.^b', `not (name ~ '^b')`],
  ['note=not.is.null', 'note is not null'],
  ['flag=not.is.true', 'flag is not true'],
  ['note=not.isdistinct.x', `note is not distinct from 'x'`],
  ['price=eq.10.5', 'price = 10.5'],
  ['price=gt.9.999', 'price > 9.999'],
  ['price=lt.1e2', 'price < 1e2'],
  ['at=gte.2025-01-01T00:00:00Z', `at >= '2025-01-01T00:00:00Z'`],
  ['at=gt.2025-01-01 00:00:00+00', `at > '2025-01-01 00:00:00+00'`],
  ['at=lt.2025-06-01T11:00:00+01:00', `at < '2025-06-01T11:00:00+01:00'`],
  [`u=eq.${U1.toUpperCase()}`, `u = '${U1}'`],
  ['flag=eq.true', 'flag = true'],
  ['flag=neq.true', 'flag <> true'],
  ['name=eq."a,b"', `name = 'a,b'`],
  ['name=eq."Beta\\"q"', `name = 'Beta"q'`],
  ['label=eq.abc', `label = 'abc'`],
  ['note=eq.', `note = ''`],
  ['n=gte.2,n=lte.6,flag=eq.false', 'n >= 2 and n <= 6 and flag = false'],
  ['n=gt.1,name=like.%a%,note=not.is.null', `n > 1 and name like '%a%' and note is not null`],
]

test('every filter operator selects exactly the rows Postgres selects', async (t) => {
  const client = supabaseClient(gw)
  const subs = FILTERS.map(([filter], i) =>
    pgChannel(client, room(`f${i}`), [
      { event: 'INSERT', schema: 'public', table: 'f', filter },
      { event: 'INSERT', schema: 'public', table: 'barrier' },
    ], { timeoutMs: 15_000 }),
  )
  const ready = await Promise.allSettled(subs.map((s) => s.ready))
  await db.sql(`insert into public.f (id, n, price, name, flag, note, at, u, label) values ${ROWS}`)
  await db.sql(`insert into public.barrier default values`)
  await Promise.allSettled(subs.map((s, i) => ready[i].status === 'fulfilled' && s.events[1].count(1, 10_000)))

  for (const [i, [filter, predicate]] of FILTERS.entries()) {
    await t.test(`${filter}  ≡  ${predicate}`, async () => {
      if (ready[i].status === 'rejected') throw ready[i].reason
      const [{ ids }] = await db.sql(`select coalesce(array_agg(id order by id), '{}') as ids from public.f where ${predicate}`)
      assert.ok(ids.length > 0 && ids.length < TOTAL, `the oracle selects some rows but not all (${ids})`)
      assert.equal(subs[i].events[1].length, 1, 'the barrier arrived')
      const got = subs[i].events[0].items.map((e) => e.new.id).sort((a, b) => a - b)
      assert.deepEqual(got, ids)
      for (const e of subs[i].events[0].items) {
        assert.equal(e.eventType, 'INSERT')
        assert.equal(e.table, 'f')
      }
    })
  }
})

test('UPDATE is matched against the new row', async () => {
  const sub = pgChannel(supabaseClient(gw), room('upd'), [
    { event: 'UPDATE', schema: 'public', table: 'f_full', filter: 'n=eq.42' },
    { event: 'INSERT', schema: 'public', table: 'barrier' },
  ])
  await sub.ready
  await db.sql(`insert into public.f_full values (101, 1, 'a'), (102, 42, 'b')`)
  await db.sql(`update public.f_full set n = 42 where id = 101`) // becomes 42: matches
  await db.sql(`update public.f_full set n = 43 where id = 102`) // was 42: does not match
  await db.sql(`insert into public.barrier default values`)
  await sub.events[1].count(1, 5000, 'barrier')
  assert.deepEqual(
    sub.events[0].items.map((e) => [e.new.id, e.new.n, e.old.n]),
    [[101, 42, 1]],
  )
})

test('DELETE filtered on the primary key; on other columns only with REPLICA IDENTITY FULL', async () => {
  const sub = pgChannel(supabaseClient(gw), room('del'), [
    { event: 'DELETE', schema: 'public', table: 'f', filter: 'id=eq.6' },
    { event: 'DELETE', schema: 'public', table: 'f', filter: 'id=in.(7,8)' },
    { event: 'DELETE', schema: 'public', table: 'f', filter: 'n=eq.5' },
    { event: 'DELETE', schema: 'public', table: 'f_full', filter: 'name=eq.a' },
    { event: 'INSERT', schema: 'public', table: 'barrier' },
  ])
  await sub.ready
  // rows 4 and 6 have n = 5; f has the default replica identity, so the old record is just the key
  await db.sql(`delete from public.f where id in (4, 5, 6, 7)`)
  await db.sql(`delete from public.f_full where id in (101, 102)`)
  await db.sql(`insert into public.barrier default values`)
  await sub.events[4].count(1, 5000, 'barrier')
  const olds = (i) => sub.events[i].items.map((e) => e.old)
  assert.deepEqual(olds(0), [{ id: 6 }], 'id=eq.6')
  assert.deepEqual(olds(1), [{ id: 7 }], 'id=in.(7,8)')
  assert.deepEqual(olds(2), [], 'n=eq.5 cannot match a DELETE whose old record holds only the key')
  assert.deepEqual(olds(3), [{ id: 101, n: 42, name: 'a' }], 'REPLICA IDENTITY FULL: filters see the whole old row')
  for (const e of sub.events.slice(0, 4).flatMap((x) => x.items)) {
    assert.equal(e.eventType, 'DELETE')
    assert.deepEqual(e.new, {})
  }
})
