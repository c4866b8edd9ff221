// Resume from positions (issue 13): a client that loses its connection, or whose gateway is killed
// and started again, gets every change committed meanwhile, once, in order, after it is subscribed
// again; past the resume window it is told of the gap instead. Each drill keeps a writer inserting
// rows throughout and counts what the client missed and what it got twice.
//
// The moment of each cut is taken while nothing is in flight (a while after a row arrived and was
// confirmed, well before the next is written): a row written within the ping interval before a
// connection dies is the one case no server can settle without the client's acknowledgement
// (README, "Reconnects and restarts").

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { pgChannel, pgJoined, startPostgres } from './lib/postgres.mjs'
import { startProxy } from './lib/proxy.mjs'
import { FEED_TABLE, binding, resumeEnv, sleep, startWriter, subscribedTimes, tally } from './lib/resume.mjs'

let db

before(async () => {
  db = await startPostgres()
  await db.sql(FEED_TABLE)
})

after(async () => {
  await closeClients()
  await db?.stop()
})

/** Waits for row `n`, then for the next row to arrive and 20 ms more: the row after it is ~100 ms
 * away, and the ping that followed this one has its pong (rows come slower than the gateway's
 * ping interval, 100 ms), so nothing is in flight. */
async function quietMoment(inbox, n) {
  await inbox.find((e) => e.new.n >= n, 10_000, `row ${n}`)
  const seen = inbox.length
  await inbox.until((items) => items.length > seen, 10_000, 'the next row')
  await sleep(20)
}

test('kill -9 of the gateway and a restart: every row committed meanwhile arrives once, in order; a first-time join gets what follows it', async () => {
  const env = resumeEnv(db, 'resume_kill')
  let gw = await startGateway({ env })
  const sub = await pgJoined(supabaseClient(gw), `resume-kill-${randomUUID()}`, [binding('kill')])
  const writer = startWriter(db, 'kill')
  await quietMoment(sub.events[0], 10)
  gw.signal('SIGKILL')
  await gw.exited
  const killedAt = Date.now()
  await sleep(1500)
  const { port, secret } = gw
  const beforeRestart = sub.events[0].length
  const restartedAt = Date.now()
  gw = await startGateway({ env, port, secret })
  // A client that joins for the first time now.
  const fresh = pgChannel(supabaseClient(gw), `resume-fresh-${randomUUID()}`, [binding('kill')])
  await fresh.ready
  const freshAt = Date.now()
  await subscribedTimes(sub.statuses, 2, 15_000, 'the rejoin after the restart')
  const rejoinedAt = Date.now()
  await sub.events[0].until((items) => items.length > beforeRestart, 15_000, 'a change after the restart')
  const firstResumedAt = Date.now()
  await sleep(1500)
  const last = await writer.stop()
  await sub.events[0].find((e) => e.new.n === last, 15_000, `row ${last}`)
  await sleep(300)
  const got = sub.events[0].items.map((e) => e.new.n)
  const { missing, duplicated, ordered } = tally(got, last)
  const downRows = writer.committed.filter((c) => c.at > killedAt && c.at < restartedAt).length
  console.log(
    `kill -9: ${last} rows, ${downRows} committed while down; rejoined ${rejoinedAt - restartedAt} ms after the restart; ` +
      `first resumed change ${firstResumedAt - restartedAt} ms after the restart; missing ${missing.length}, duplicated ${duplicated.length}`,
  )
  assert.ok(downRows > 0, 'rows were committed while the gateway was down')
  assert.deepEqual(missing, [], 'no row missing')
  assert.deepEqual(duplicated, [], 'no row twice')
  assert.ok(ordered, 'in commit order')
  assert.ok(rejoinedAt - restartedAt < 10_000, 'subscribed again within 10 s')
  assert.ok(firstResumedAt - restartedAt < 15_000, 'changes flowing again within 15 s')
  // The first-time join: everything committed after it was subscribed, nothing from before the kill.
  await fresh.events[0].find((e) => e.new.n === last, 5_000, `row ${last} on the fresh channel`)
  const freshGot = fresh.events[0].items.map((e) => e.new.n)
  const beforeKill = writer.committed.filter((c) => c.at < killedAt).map((c) => c.n)
  const afterJoin = writer.committed.filter((c) => c.at > freshAt + 50).map((c) => c.n)
  assert.deepEqual(freshGot.filter((n) => beforeKill.includes(n)), [], 'a first-time join gets nothing from before')
  for (const n of afterJoin) assert.ok(freshGot.includes(n), `fresh channel got row ${n}`)
  assert.deepEqual(tally(freshGot, last).duplicated, [], 'the fresh channel gets no row twice')
  await gw.stop()
})

test('a client whose socket is closed gets the rows of its gap once, in order, after it is subscribed again', async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_close') })
  const client = supabaseClient(gw)
  const sub = await pgJoined(client, `resume-close-${randomUUID()}`, [binding('close')])
  const writer = startWriter(db, 'close')
  for (const at of [8, 25]) {
    await quietMoment(sub.events[0], at)
    client.realtime.socketAdapter.socket.conn.close()
  }
  await subscribedTimes(sub.statuses, 3, 15_000, 'two rejoins')
  await sleep(1000)
  const last = await writer.stop()
  await sub.events[0].find((e) => e.new.n === last, 10_000, `row ${last}`)
  await sleep(300)
  const { missing, duplicated, ordered } = tally(
    sub.events[0].items.map((e) => e.new.n),
    last,
  )
  console.log(`clean close ×2: ${last} rows, missing ${missing.length}, duplicated ${duplicated.length}`)
  assert.deepEqual(missing, [])
  assert.deepEqual(duplicated, [])
  assert.ok(ordered)
  assert.ok((await gw.metric('realtime_resumes_total')) >= 2, 'both rejoins resumed')
  await gw.stop()
})

test('a connection cut silently (only heartbeats notice): the new connection takes the channel over and gets the gap once', async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_cut') })
  const proxy = await startProxy(gw.port)
  const client = supabaseClient({ ...gw, url: proxy.url }, { realtime: { heartbeatIntervalMs: 1500 } })
  const sub = await pgJoined(client, `resume-cut-${randomUUID()}`, [binding('cut')])
  const writer = startWriter(db, 'cut')
  await quietMoment(sub.events[0], 10)
  proxy.cut()
  await subscribedTimes(sub.statuses, 2, 20_000, 'the rejoin over a new connection')
  await sleep(1000)
  const last = await writer.stop()
  await sub.events[0].find((e) => e.new.n === last, 10_000, `row ${last}`)
  await sleep(300)
  const { missing, duplicated, ordered } = tally(
    sub.events[0].items.map((e) => e.new.n),
    last,
  )
  console.log(`silent cut: ${last} rows, missing ${missing.length}, duplicated ${duplicated.length}`)
  assert.deepEqual(missing, [])
  assert.deepEqual(duplicated, [])
  assert.ok(ordered)
  assert.ok((await gw.metric('realtime_socket_closes_total{reason="replaced"}')) >= 1, 'the silent socket was replaced')
  await proxy.stop()
  await gw.stop()
})

test('a rejoin after the resume window gets one ResumeGap system message, none of the rows of its gap, and live rows after', async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_window', { RESUME_WINDOW_MS: '1000' }) })
  const proxy = await startProxy(gw.port)
  const client = supabaseClient(
    { ...gw, url: proxy.url },
    { realtime: { reconnectAfterMs: () => 500 } },
  )
  const sub = await pgJoined(client, `resume-window-${randomUUID()}`, [binding('window')])
  const writer = startWriter(db, 'window')
  await quietMoment(sub.events[0], 5)
  const cutAt = Date.now()
  proxy.refuse(3000)
  const backAt = cutAt + 3000
  await subscribedTimes(sub.statuses, 2, 15_000, 'the rejoin after the window')
  const resubscribedAt = Date.now()
  const gap = await sub.system.find((m) => m.message?.startsWith('ResumeGap'), 5_000, 'the ResumeGap message')
  await sleep(1000)
  const last = await writer.stop()
  await sub.events[0].find((e) => e.new.n === last, 10_000, `row ${last}`)
  await sleep(300)
  const got = sub.events[0].items.map((e) => e.new.n)
  const inGap = writer.committed.filter((c) => c.at > cutAt + 50 && c.at < backAt).map((c) => c.n)
  const afterRejoin = writer.committed.filter((c) => c.at > resubscribedAt + 50).map((c) => c.n)
  console.log(`after the window: ${inGap.length} rows in the gap; gap message: ${gap.message}`)
  assert.match(gap.message, /^ResumeGap: window_expired: /)
  assert.equal(gap.extension, 'postgres_changes')
  assert.equal(gap.status, 'ok', 'the channel is subscribed and stays so')
  assert.equal(sub.system.items.filter((m) => m.message?.startsWith('ResumeGap')).length, 1, 'told once')
  assert.deepEqual(sub.system.items.filter((m) => m.status === 'error'), [], 'no error')
  assert.ok(inGap.length > 0)
  assert.deepEqual(got.filter((n) => inGap.includes(n)), [], 'nothing of the gap is delivered')
  for (const n of afterRejoin) assert.ok(got.includes(n), `row ${n} after the rejoin`)
  assert.deepEqual(tally(got, last).duplicated, [])
  await proxy.stop()
  await gw.stop()
})
