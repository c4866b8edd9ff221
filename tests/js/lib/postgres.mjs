// One throwaway PostgreSQL cluster per test file, and Postgres Changes helpers for supabase-js.
//
// `startPostgres()` finds initdb / pg_ctl (PATH, else the newest /usr/lib/postgresql/*/bin), creates a
// cluster in a fresh directory under os.tmpdir() (owned by the unprivileged user `postgres` when we run
// as root, as CI does: the server refuses to run as root), configured for logical replication
// (wal_level=logical, 20 slots / senders, fsync off, UTC, track_commit_timestamp on so tests can
// read a transaction's commit time), listening on 127.0.0.1 on a free port with its
// unix socket in that directory. It creates database `app`, applies supabase/migrations/*.sql and
// supabase/seed.sql, and returns `{ url, sql, connect, stop, ... }`. `stop()` (pg_ctl stop -m immediate,
// then the directory is removed) also runs at process exit, so a failing file leaves nothing behind.
//
// `pgChannel()` builds a channel the way apps do (`.on('postgres_changes', filter, cb)` per binding,
// then `.subscribe()`) and records events per binding, `system` messages and subscribe statuses.

import { execFileSync, spawnSync } from 'node:child_process'
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync, appendFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import { freePort } from './gateway.mjs'
import { Inbox } from './inbox.mjs'
import { untilSubscribed } from './clients.mjs'

const REPO = fileURLToPath(new URL('../../../', import.meta.url))
const DATABASE = 'app'

/** The directory holding initdb and pg_ctl, or null. */
export function postgresBinDir() {
  for (const dir of (process.env.PATH || '').split(delimiter)) {
    if (dir && existsSync(join(dir, 'initdb')) && existsSync(join(dir, 'pg_ctl'))) {
      return realpathSync(join(dir, 'initdb')).replace(/\/initdb$/, '')
    }
  }
  const root = '/usr/lib/postgresql'
  if (!existsSync(root)) return null
  const versions = readdirSync(root)
    .filter((v) => existsSync(join(root, v, 'bin', 'initdb')))
    .sort((a, b) => Number.parseFloat(b) - Number.parseFloat(a))
  return versions.length ? join(root, versions[0], 'bin') : null
}

const isRoot = () => typeof process.getuid === 'function' && process.getuid() === 0

function run(bin, args, { asPostgres, check = true } = {}) {
  const [cmd, argv] = asPostgres ? ['runuser', ['-u', 'postgres', '--', bin, ...args]] : [bin, args]
  const result = spawnSync(cmd, argv, { encoding: 'utf8', timeout: 60_000 })
  if (check && result.status !== 0) {
    throw new Error(`${bin} ${args.join(' ')} failed (${result.status}): ${result.stderr || result.stdout || result.error}`)
  }
  return result
}

const clusters = new Set()
process.on('exit', () => {
  for (const cluster of clusters) cluster.stopSync()
})

/**
 * Starts a cluster, creates database `app`, applies supabase/ (unless `supabase: false`) and returns
 * `{ url, port, dir, sql(text, params?) → rows, query(text, params?) → result, connect() → pg.Client,
 * admin (a connected pg.Client), halt() / resume() (server down and up again), stop() }`.
 */
export async function startPostgres({ supabase = true } = {}) {
  const bin = postgresBinDir()
  if (!bin) throw new Error('PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin')
  const asPostgres = isRoot()
  const dir = mkdtempSync(join(tmpdir(), 'rtgw-pg-'))
  if (asPostgres) {
    const uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim())
    const gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim())
    chownSync(dir, uid, gid)
  }
  const data = join(dir, 'data')
  const log = join(dir, 'postgres.log')
  let started = false
  const cluster = {
    stopSync() {
      clusters.delete(cluster)
      if (started) {
        run(join(bin, 'pg_ctl'), ['stop', '-D', data, '-m', 'immediate', '-w'], { asPostgres, check: false })
        started = false
      }
      rmSync(dir, { recursive: true, force: true })
    },
  }
  clusters.add(cluster)
  try {
    run(join(bin, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--locale=C', '--no-sync'], {
      asPostgres,
    })
    let port
    for (let attempt = 0; ; attempt++) {
      port = await freePort()
      const conf = [
        `listen_addresses = '127.0.0.1'`,
        `port = ${port}`,
        `unix_socket_directories = '${dir}'`,
        `wal_level = logical`,
        `max_replication_slots = 20`,
        `max_wal_senders = 20`,
        `max_connections = 200`,
        `fsync = off`,
        `track_commit_timestamp = on`,
        `full_page_writes = off`,
        `timezone = 'UTC'`,
        `log_timezone = 'UTC'`,
        '',
      ].join('\n')
      writeFileSync(join(data, 'postgresql.auto.conf'), conf)
      if (asPostgres) run('chown', ['postgres:', join(data, 'postgresql.auto.conf')])
      const result = run(join(bin, 'pg_ctl'), ['start', '-D', data, '-l', log, '-w', '-t', '30'], {
        asPostgres,
        check: false,
      })
      if (result.status === 0) break
      if (attempt >= 2) {
        let tail = ''
        try {
          tail = readFileSync(log, 'utf8').split('\n').slice(-20).join('\n')
        } catch {}
        throw new Error(`pg_ctl start failed: ${result.stderr}\n${tail}`)
      }
    }
    started = true

    const base = `postgres://postgres@127.0.0.1:${port}`
    const bootstrap = new pg.Client({ connectionString: `${base}/postgres` })
    await bootstrap.connect()
    await bootstrap.query(`create database ${DATABASE}`)
    await bootstrap.end()

    const url = `${base}/${DATABASE}`
    const connect = async () => {
      const client = new pg.Client({ connectionString: url })
      await client.connect()
      client.on('error', () => {}) // the cluster may be stopped under an idle client
      return client
    }
    let admin = await connect()
    if (supabase) {
      const migrations = join(REPO, 'supabase', 'migrations')
      for (const file of readdirSync(migrations).filter((f) => f.endsWith('.sql')).sort()) {
        await admin.query(readFileSync(join(migrations, file), 'utf8'))
      }
      await admin.query(readFileSync(join(REPO, 'supabase', 'seed.sql'), 'utf8'))
    }
    const others = new Set()
    return {
      url,
      port,
      dir,
      get admin() {
        return admin
      },
      bin,
      /** Runs `text` (several statements allowed when there are no params) and returns the rows. */
      async sql(text, params) {
        return (await admin.query(text, params)).rows
      },
      /** The whole pg result. */
      query: (text, params) => admin.query(text, params),
      /** A new connected client (closed by `stop()`). */
      async connect() {
        const client = await connect()
        others.add(client)
        return client
      },
      /** The server log so far (for failure messages). */
      log: () => {
        try {
          return readFileSync(log, 'utf8')
        } catch {
          return ''
        }
      },
      /** Stops the server (fast shutdown: sessions and the replication stream are cut), keeping the data. */
      async halt() {
        await Promise.race([admin.end().catch(() => {}), new Promise((r) => setTimeout(r, 1000))])
        run(join(bin, 'pg_ctl'), ['stop', '-D', data, '-m', 'fast', '-w'], { asPostgres })
        started = false
      },
      /** Starts the halted server again on the same port; `sql` gets a new connection. */
      async resume() {
        run(join(bin, 'pg_ctl'), ['start', '-D', data, '-l', log, '-w', '-t', '30'], { asPostgres })
        started = true
        admin = await connect()
      },
      async stop() {
        for (const client of [admin, ...others]) {
          await Promise.race([client.end().catch(() => {}), new Promise((r) => setTimeout(r, 1000))])
        }
        cluster.stopSync()
      },
    }
  } catch (error) {
    cluster.stopSync()
    throw error
  }
}


/**
 * A channel with one `postgres_changes` listener per entry of `bindings` (objects passed to `.on()`
 * unchanged), subscribed at once. Returns `{ channel, events, all, system, statuses, subscribed, ready }`:
 * `events[i]` records binding i's callbacks, `all` every callback in order as `{ i, payload }`,
 * `subscribed` resolves on SUBSCRIBED, `ready` once the system message "Subscribed to PostgreSQL"
 * (extension postgres_changes, status ok) has arrived as well. `onStatus(status)` runs inside the
 * subscribe callback (for writes made the moment SUBSCRIBED is reported).
 */
export function pgChannel(client, name, bindings, { config = {}, timeoutMs = 10_000, onStatus } = {}) {
  const ch = client.channel(name, { config })
  const events = bindings.map((_, i) => new Inbox(`postgres_changes of ${name} binding ${i}`))
  const all = new Inbox(`postgres_changes of ${name}`)
  const system = new Inbox(`system messages of ${name}`)
  const statuses = new Inbox(`statuses of ${name}`)
  bindings.forEach((binding, i) => {
    ch.on('postgres_changes', binding, (payload) => {
      events[i].push(payload)
      all.push({ i, payload })
    })
  })
  ch.on('system', {}, (message) => system.push(message))
  ch.subscribe((status, err) => {
    statuses.push({ status, err })
    if (onStatus) onStatus(status, err)
  })
  const subscribed = untilSubscribed(statuses, name, timeoutMs)
  subscribed.catch(() => {})
  const ready = subscribed.then(() =>
    system.until(
      (items) => {
        for (const m of items) {
          if (m.extension === 'postgres_changes' && m.status === 'ok') return m
          if (m.extension === 'postgres_changes' && m.status === 'error') {
            throw new Error(`channel ${name}: postgres_changes error: ${m.message}`)
          }
        }
        return false
      },
      timeoutMs,
      '"Subscribed to PostgreSQL"',
    ),
  )
  ready.catch(() => {})
  return { channel: ch, events, all, system, statuses, subscribed, ready }
}

/** `pgChannel()` and wait for the "Subscribed to PostgreSQL" system message. */
export async function pgJoined(client, name, bindings, options) {
  const result = pgChannel(client, name, bindings, options)
  await result.ready
  return result
}

/** `YYYY-MM-DDTHH:MM:SS.mmmZ` */
export const COMMIT_TIMESTAMP = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/

/**
 * Joins `realtime:<name>` on a raw socket (`lib/raw.mjs`) with `entries` as `config.postgres_changes`,
 * exactly as realtime-js 2.119.1 builds the join. Resolves with `{ topic, ref, reply }` (the phx_reply
 * frame); the caller reads later frames from `sock.frames`.
 */
export async function rawPgJoin(sock, name, entries, { accessToken, timeoutMs = 10_000 } = {}) {
  const ref = sock.nextRef()
  const topic = `realtime:${name}`
  sock.send({
    join_ref: ref,
    ref,
    topic,
    event: 'phx_join',
    payload: {
      config: {
        broadcast: { ack: false, self: false },
        presence: { key: '', enabled: false },
        postgres_changes: entries,
        private: false,
      },
      ...(accessToken ? { access_token: accessToken } : {}),
    },
  })
  const reply = await sock.frames.find(
    (f) => f.topic === topic && f.event === 'phx_reply' && f.ref === ref,
    timeoutMs,
    `phx_reply to the join of ${topic}`,
  )
  return { topic, ref, reply }
}

/** The `postgres_changes` frames a raw socket received on `topic`. */
export const rawChanges = (sock, topic) => sock.frames.items.filter((f) => f.topic === topic && f.event === 'postgres_changes')
