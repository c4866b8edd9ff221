// Postgres Changes visibility (protocol.md §7.5, §7.7, §8.2) on the seeds' RLS tables
// (supabase/migrations/0002_app_tables.sql): a signed-in user (role authenticated, its own `sub`) sees
// only the rows its policies let it select, anon sees none of the messages, service_role (BYPASSRLS)
// sees all, and `setAuth()` with another user's token switches what is seen.
//
// Apps are built as third-party-auth apps are (the `accessToken` option; see README.md for why the
// default auth is not used). Changes reach a channel in commit order, so a final row every subscriber
// may see (a public activity) is the barrier after which "not seen" is final.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgJoined, startPostgres } from './lib/postgres.mjs'

let db
let gw

before(async () => {
  db = await startPostgres()
  await db.sql(`
    create table public.notes (id int primary key, owner uuid not null, body text);
    alter table public.notes replica identity full;
    alter table public.notes enable row level security;
    create policy "own notes" on public.notes for select to authenticated using (owner = auth.uid());
    grant select on public.notes to anon, authenticated, service_role;
    alter publication supabase_realtime add table public.notes;
  `)
  gw = await startGateway({ env: { DATABASE_URL: db.url, SLOT_NAME: 'pgc_rls' } })
})

after(async () => {
  await closeClients()
  await gw?.stop()
  await db?.stop()
})

const room = (label) => `pgr-${label}-${randomUUID()}`
const userToken = (sub) => gw.sign({ role: 'authenticated', sub, aud: 'authenticated' })

/** supabase-js with `accessToken` returning the current JWT, realtime auth set before subscribing. */
async function appWithToken(initial) {
  const state = { token: initial }
  const supabase = supabaseClient(gw, { accessToken: async () => state.token })
  await supabase.realtime.setAuth()
  return {
    supabase,
    async switchTo(token) {
      state.token = token
      await supabase.realtime.setAuth(token)
    },
  }
}

const BINDINGS = [
  { event: '*', schema: 'public', table: 'messages' },
  { event: 'INSERT', schema: 'public', table: 'activity_stream' },
]

async function insertMessage(sender, { to = null, room: roomId = null, content }) {
  const [row] = await db.sql(
    `insert into public.messages (sender_id, recipient_id, room_id, content) values ($1, $2, $3, $4) returning id`,
    [sender, to, roomId, content],
  )
  return Number(row.id)
}

async function insertActivity(user, kind, isPublic) {
  const [row] = await db.sql(
    `insert into public.activity_stream (user_id, kind, is_public) values ($1, $2, $3) returning id`,
    [user, kind, isPublic],
  )
  return Number(row.id)
}

test('messages: each user sees only its direct messages and the rooms; anon sees none; service_role sees all', async () => {
  const [A, B, C] = [randomUUID(), randomUUID(), randomUUID()]
  const alice = await pgJoined((await appWithToken(userToken(A))).supabase, room('alice'), BINDINGS)
  const bob = await pgJoined((await appWithToken(userToken(B))).supabase, room('bob'), BINDINGS)
  const anon = await pgJoined(supabaseClient(gw), room('anon'), BINDINGS)
  const service = await pgJoined(supabaseClient(gw, { key: gw.serviceKey }), room('service'), BINDINGS)

  await insertMessage(A, { to: C, content: 'a→c' })
  await insertMessage(B, { to: A, content: 'b→a' })
  await insertMessage(C, { to: B, content: 'c→b' })
  await insertMessage(C, { room: 'lobby', content: 'c in lobby' })
  await db.sql(`update public.messages set content = 'a→c edited' where content = 'a→c'`)
  await insertActivity(A, 'private of a', false)
  await insertActivity(B, 'private of b', false)
  const barrier = await insertActivity(C, 'public barrier', true)

  const seen = async (sub, who) => {
    await sub.events[1].find((e) => e.new.id === barrier, 5000, `the barrier at ${who}`)
    return {
      messages: sub.events[0].items.map((e) => `${e.eventType} ${e.new.content}`),
      activity: sub.events[1].items.map((e) => e.new.kind),
    }
  }
  assert.deepEqual(await seen(alice, 'alice'), {
    messages: ['INSERT a→c', 'INSERT b→a', 'INSERT c in lobby', 'UPDATE a→c edited'],
    activity: ['private of a', 'public barrier'],
  })
  assert.deepEqual(await seen(bob, 'bob'), {
    messages: ['INSERT b→a', 'INSERT c→b', 'INSERT c in lobby'],
    activity: ['private of b', 'public barrier'],
  })
  assert.deepEqual(await seen(anon, 'anon'), { messages: [], activity: ['public barrier'] })
  assert.deepEqual(await seen(service, 'service_role'), {
    messages: ['INSERT a→c', 'INSERT b→a', 'INSERT c→b', 'INSERT c in lobby', 'UPDATE a→c edited'],
    activity: ['private of a', 'private of b', 'public barrier'],
  })
  // what a user sees is the whole row, as its policy lets it select it
  const dm = alice.events[0].items.find((e) => e.new.content === 'b→a')
  assert.equal(dm.new.sender_id, B)
  assert.equal(dm.new.recipient_id, A)
  assert.equal(dm.new.room_id, null)
  assert.equal(dm.errors, null)
})

test('setAuth() with another user’s token switches what is seen', async () => {
  const [A, B, C] = [randomUUID(), randomUUID(), randomUUID()]
  const app = await appWithToken(userToken(A))
  const sub = await pgJoined(app.supabase, room('switch'), [{ event: 'INSERT', schema: 'public', table: 'messages' }])
  await insertMessage(C, { to: A, content: 'for a, before' })
  await sub.events[0].find((e) => e.new.content === 'for a, before', 5000, 'A’s message while signed in as A')

  await app.switchTo(userToken(B))
  // the refresh is not answered: write to B until B's rows arrive, then the switch has taken effect
  let switched = false
  for (let i = 0; i < 20 && !switched; i++) {
    await insertMessage(C, { to: B, content: `probe ${i}` })
    switched = await sub.events[0]
      .find((e) => e.new.content === `probe ${i}`, 500, `probe ${i}`)
      .then(() => true, () => false)
  }
  assert.ok(switched, 'rows for B arrive after setAuth(B)')
  await insertMessage(C, { to: A, content: 'for a, after' })
  await insertMessage(C, { to: B, content: 'for b, after' })
  await sub.events[0].find((e) => e.new.content === 'for b, after', 5000, 'B’s message')
  const contents = sub.events[0].items.map((e) => e.new.content)
  assert.ok(!contents.includes('for a, after'), `A’s rows are no longer seen: ${JSON.stringify(contents)}`)
  assert.equal(contents.filter((c) => c === 'for a, before').length, 1)
})

async function notesSubscribers(label) {
  const [A, B] = [randomUUID(), randomUUID()]
  const bindings = [
    { event: '*', schema: 'public', table: 'notes' },
    { event: 'INSERT', schema: 'public', table: 'activity_stream' },
  ]
  const alice = await pgJoined((await appWithToken(userToken(A))).supabase, room(`${label}-a`), bindings)
  const bob = await pgJoined((await appWithToken(userToken(B))).supabase, room(`${label}-b`), bindings)
  const service = await pgJoined(supabaseClient(gw, { key: gw.serviceKey }), room(`${label}-s`), bindings)
  const barrier = async () => {
    const id = await insertActivity(B, `${label} barrier`, true)
    for (const [sub, who] of [[alice, 'alice'], [bob, 'bob'], [service, 'service_role']]) {
      await sub.events[1].find((e) => e.new.id === id, 5000, `the barrier at ${who}`)
    }
  }
  return { A, B, alice, bob, service, barrier }
}

test('RLS table with REPLICA IDENTITY FULL: INSERT/UPDATE reach the owner and service_role only', async () => {
  const { A, alice, bob, service, barrier } = await notesSubscribers('notes-iu')
  // RLS is checked against the table's state after the commit (§7.7): let each change arrive before
  // the next one could change what it is checked against
  await db.sql(`insert into public.notes values (1, $1, 'secret of a')`, [A])
  await alice.events[0].find((e) => e.eventType === 'INSERT', 5000, 'alice: INSERT of her note')
  await db.sql(`update public.notes set body = 'still secret' where id = 1`)
  await alice.events[0].find((e) => e.eventType === 'UPDATE', 5000, 'alice: UPDATE of her note')
  await barrier()
  const view = (sub) => sub.events[0].items.map((e) => [e.eventType, e.new.body, e.old])
  const full = { id: 1, owner: A, body: 'secret of a' }
  assert.deepEqual(view(alice), [['INSERT', 'secret of a', {}], ['UPDATE', 'still secret', full]])
  assert.deepEqual(view(bob), [])
  assert.deepEqual(view(service), [['INSERT', 'secret of a', {}], ['UPDATE', 'still secret', full]])
})

test('DELETE on an RLS table reaches every subscriber, old holding only the primary key (§7.5, §7.7 step 5)', async () => {
  const { A, alice, bob, service, barrier } = await notesSubscribers('notes-d')
  await db.sql(`insert into public.notes values (2, $1, 'to be deleted')`, [A])
  await alice.events[0].find((e) => e.eventType === 'INSERT', 5000, 'alice: INSERT of her note')
  await db.sql(`delete from public.notes where id = 2`)
  await barrier()
  const deletes = (sub) => sub.events[0].items.filter((e) => e.eventType === 'DELETE').map((e) => [e.old, e.new])
  assert.deepEqual(
    { alice: deletes(alice), bob: deletes(bob), service_role: deletes(service) },
    { alice: [[{ id: 2 }, {}]], bob: [[{ id: 2 }, {}]], service_role: [[{ id: 2 }, {}]] },
  )
})

test('every row a user may see arrives: 350 single-row transactions on an RLS table, sequential and concurrent', async () => {
  const [A, C] = [randomUUID(), randomUUID()]
  const sub = await pgJoined((await appWithToken(userToken(A))).supabase, room('every'), [
    { event: 'INSERT', schema: 'public', table: 'messages', filter: 'room_id=eq.every-row' },
  ])
  const writers = await Promise.all([0, 1, 2, 3].map(() => db.connect()))
  const insert = async (writer, content) => {
    const { rows } = await writer.query(
      `insert into public.messages (sender_id, room_id, content) values ($1, 'every-row', $2) returning id`,
      [C, content],
    )
    return Number(rows[0].id)
  }
  const sequential = []
  for (let i = 0; i < 150; i++) {
    sequential.push(await insert(writers[0], `row ${i}`))
    if (i < 75 && i % 3 === 0) await new Promise((r) => setTimeout(r, 10)) // some paced, the rest back to back
  }
  // concurrent commits: one backend's WAL flush carries the others' commit records too
  const concurrent = (
    await Promise.all(
      writers.map(async (writer, w) => {
        const ids = []
        for (let i = 0; i < 50; i++) ids.push(await insert(writer, `w${w} row ${i}`))
        return ids
      }),
    )
  ).flat()
  const sent = [...sequential, ...concurrent]
  const lastId = Math.max(...sent)
  // wait for everything, or for the last row committed (changes arrive in commit order); then what is
  // missing is missing
  await sub.events[0]
    .until((items) => items.length >= sent.length || items.some((e) => e.new.id === lastId), 10_000, 'the last row')
    .catch(() => {})
  const got = sub.events[0].items.map((e) => e.new.id)
  const missing = sent.filter((id) => !got.includes(id)).sort((x, y) => x - y)
  // the policy does let this user select the missing rows (checked now, as the user)
  const writer = writers[0]
  await writer.query('begin')
  await writer.query('set local role authenticated')
  await writer.query(`select set_config('request.jwt.claims', $1, true)`, [JSON.stringify({ role: 'authenticated', sub: A })])
  const {
    rows: [{ visible }],
  } = await writer.query(`select coalesce(array_agg(id order by id), '{}') as visible from public.messages where id = any($1)`, [missing])
  await writer.query('commit')
  assert.deepEqual(
    missing,
    [],
    `rows withheld from a user whose policy selects them: ${missing.length} of ${sent.length} (ids ${missing}); ` +
      `selectable by that user now: ${visible}`,
  )
  assert.deepEqual(got.slice(0, sequential.length), sequential, 'the sequential rows in commit order')
})
