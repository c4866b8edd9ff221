// The resume drills of resume.test.mjs with the Python SDK (realtime-py, tests/py/resume_client.py
// run in the venv scripts/test-js.sh makes): kill -9 of the gateway and a restart, the client's
// socket closed, a silent cut, and a rejoin after the window. A writer keeps inserting throughout;
// the answer is 0 missing and 0 duplicated.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { after, before, test } from 'node:test'
import { startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'
import { startPostgres } from './lib/postgres.mjs'
import { startProxy } from './lib/proxy.mjs'
import { FEED_TABLE, resumeEnv, sleep, startWriter, subscribedTimes, tally } from './lib/resume.mjs'

const REPO = fileURLToPath(new URL('../../', import.meta.url))
const PYTHON = process.env.PYTHON_SDK || `${REPO}tests/py/.venv/bin/python`
const CLIENT = `${REPO}tests/py/resume_client.py`

let db
const clients = new Set()

before(async () => {
  if (!existsSync(PYTHON)) {
    throw new Error(`no Python with realtime-py at ${PYTHON}: run scripts/test-js.sh (it makes tests/py/.venv)`)
  }
  db = await startPostgres()
  await db.sql(FEED_TABLE)
})

after(async () => {
  for (const c of clients) c.child.kill('SIGKILL')
  await db?.stop()
})

/** Starts resume_client.py against `url` for `run`; its events land in inboxes. */
function pythonClient(url, token, run, { keepalive } = {}) {
  const args = [CLIENT, `${url}/realtime/v1`, token, run]
  if (keepalive) args.push(String(keepalive))
  const child = spawn(PYTHON, args, { stdio: ['pipe', 'pipe', 'pipe'] })
  const rows = new Inbox(`rows of ${run}`)
  const statuses = new Inbox(`statuses of ${run}`)
  const errors = new Inbox(`errors of ${run}`)
  const system = new Inbox(`system messages of ${run}`)
  const log = []
  let partial = ''
  child.stdout.setEncoding('utf8')
  child.stdout.on('data', (chunk) => {
    const lines = (partial + chunk).split('\n')
    partial = lines.pop()
    for (const line of lines) {
      if (!line.trim()) continue
      const event = JSON.parse(line)
      if ('n' in event) rows.push(event.n)
      else if ('status' in event) statuses.push(event)
      else if ('error' in event) errors.push(event.error)
      else if ('system' in event) system.push(event.system)
    }
  })
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (chunk) => {
    log.push(chunk)
    if (process.env.GATEWAY_LOG) process.stderr.write(`[python] ${chunk}`)
  })
  const client = {
    child,
    rows,
    statuses,
    errors,
    system,
    log,
    command: (line) => child.stdin.write(`${line}\n`),
    async stop() {
      child.stdin.end()
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000)
      await new Promise((resolve) => child.once('exit', resolve))
      clearTimeout(timer)
      clients.delete(client)
    },
  }
  clients.add(client)
  return client
}

/** Row `n` arrived, then the next one, then 20 ms: nothing in flight (see resume.test.mjs). */
async function quietMoment(rows, n) {
  await rows.find((got) => got >= n, 15_000, `row ${n}`)
  const seen = rows.length
  await rows.until((items) => items.length > seen, 10_000, 'the next row')
  await sleep(20)
}

/** Stops the writer, waits for its last row on `py`, and counts. */
async function finish(writer, py) {
  await sleep(1000)
  const last = await writer.stop()
  await py.rows.find((n) => n === last, 15_000, `row ${last}`)
  await sleep(300)
  return { last, ...tally(py.rows.items, last) }
}

test('python: kill -9 of the gateway and a restart lose nothing and repeat nothing', { timeout: 90_000 }, async () => {
  const env = resumeEnv(db, 'resume_py_kill')
  let gw = await startGateway({ env })
  const py = pythonClient(gw.wsUrl, gw.anonKey, 'pykill')
  await subscribedTimes(py.statuses, 1, 15_000, 'SUBSCRIBED')
  await sleep(300)
  const writer = startWriter(db, 'pykill')
  await quietMoment(py.rows, 10)
  gw.signal('SIGKILL')
  await gw.exited
  await sleep(1500)
  gw = await startGateway({ env, port: gw.port, secret: gw.secret })
  await subscribedTimes(py.statuses, 2, 20_000, 'the rejoin after the restart')
  const result = await finish(writer, py)
  console.log(`python kill -9: ${result.last} rows, missing ${result.missing.length}, duplicated ${result.duplicated.length}`)
  assert.deepEqual(result.missing, [])
  assert.deepEqual(result.duplicated, [])
  assert.ok(result.ordered)
  await py.stop()
  await gw.stop()
})

test('python: the socket closed by the client, twice, loses nothing and repeats nothing', { timeout: 90_000 }, async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_py_close') })
  const py = pythonClient(gw.wsUrl, gw.anonKey, 'pyclose')
  await subscribedTimes(py.statuses, 1, 15_000, 'SUBSCRIBED')
  await sleep(300)
  const writer = startWriter(db, 'pyclose')
  for (const [n, times] of [
    [8, 2],
    [25, 3],
  ]) {
    await quietMoment(py.rows, n)
    py.command('close')
    await subscribedTimes(py.statuses, times, 20_000, `rejoin ${times - 1}`)
  }
  const result = await finish(writer, py)
  console.log(`python clean close ×2: ${result.last} rows, missing ${result.missing.length}, duplicated ${result.duplicated.length}`)
  assert.deepEqual(result.missing, [])
  assert.deepEqual(result.duplicated, [])
  assert.ok(result.ordered)
  await py.stop()
  await gw.stop()
})

test('python: a silent cut noticed by the keepalive loses nothing and repeats nothing', { timeout: 90_000 }, async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_py_cut') })
  const proxy = await startProxy(gw.port)
  const py = pythonClient(`ws://127.0.0.1:${proxy.port}`, gw.anonKey, 'pycut', { keepalive: 1.5 })
  await subscribedTimes(py.statuses, 1, 15_000, 'SUBSCRIBED')
  await sleep(300)
  const writer = startWriter(db, 'pycut')
  await quietMoment(py.rows, 10)
  proxy.cut()
  await subscribedTimes(py.statuses, 2, 30_000, 'the rejoin over a new connection')
  const result = await finish(writer, py)
  console.log(`python silent cut: ${result.last} rows, missing ${result.missing.length}, duplicated ${result.duplicated.length}`)
  assert.deepEqual(result.missing, [])
  assert.deepEqual(result.duplicated, [])
  assert.ok(result.ordered)
  await py.stop()
  await proxy.stop()
  await gw.stop()
})

test('python: a rejoin after the window is told of the gap and gets nothing of it', { timeout: 90_000 }, async () => {
  const gw = await startGateway({ env: resumeEnv(db, 'resume_py_window', { RESUME_WINDOW_MS: '1000' }) })
  const proxy = await startProxy(gw.port)
  const py = pythonClient(`ws://127.0.0.1:${proxy.port}`, gw.anonKey, 'pywindow')
  await subscribedTimes(py.statuses, 1, 15_000, 'SUBSCRIBED')
  await sleep(300)
  const writer = startWriter(db, 'pywindow')
  await quietMoment(py.rows, 5)
  const cutAt = Date.now()
  proxy.refuse(3000)
  const backAt = cutAt + 3000
  const gap = await py.system.find((m) => m.message.startsWith('ResumeGap'), 20_000, 'the ResumeGap message')
  const settledAt = Date.now()
  await sleep(1000)
  const last = await writer.stop()
  await py.rows.find((n) => n === last, 15_000, `row ${last}`)
  await sleep(300)
  const got = py.rows.items
  const inGap = writer.committed.filter((c) => c.at > cutAt + 50 && c.at < backAt).map((c) => c.n)
  const afterRejoin = writer.committed.filter((c) => c.at > settledAt + 50).map((c) => c.n)
  console.log(`python after the window: ${inGap.length} rows in the gap; ${gap.message}`)
  assert.match(gap.message, /^ResumeGap: window_expired: /)
  assert.deepEqual(py.errors.items, [], 'no channel error: the channel stays subscribed')
  assert.equal(py.statuses.items.at(-1).status, 'SUBSCRIBED')
  assert.ok(inGap.length > 0)
  assert.deepEqual(got.filter((n) => inGap.includes(n)), [], 'nothing of the gap is delivered')
  for (const n of afterRejoin) assert.ok(got.includes(n), `row ${n} after the rejoin`)
  assert.deepEqual(tally(got, last).duplicated, [])
  await py.stop()
  await proxy.stop()
  await gw.stop()
})
