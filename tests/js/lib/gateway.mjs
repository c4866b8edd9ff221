// Starts one realtime-gateway process for a test file and signs the JWTs the tests use.
//
// The binary comes from env GATEWAY_BIN, else <repo>/target/debug/realtime-gateway. Each gateway gets a
// free 127.0.0.1 port and a fresh random HS256 secret; the child is stopped by `stop()` and, as a last
// resort, when the test process exits. Set GATEWAY_LOG=1 to see the gateway's own output.

import { spawn } from 'node:child_process'
import { createHmac, randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { get as httpGet } from 'node:http'
import { connect, createServer } from 'node:net'
import { fileURLToPath } from 'node:url'

const REPO = fileURLToPath(new URL('../../../', import.meta.url))
const READY_TIMEOUT_MS = 20_000

const children = new Set()

function killAll() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  }
  children.clear()
}
process.on('exit', killAll)
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => {
    killAll()
    process.exit(130)
  })
}

export function gatewayBinary() {
  return process.env.GATEWAY_BIN || `${REPO}target/debug/realtime-gateway`
}

/** A port the kernel just handed out on 127.0.0.1 (released again before the gateway binds it). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

const b64url = (value) => Buffer.from(value).toString('base64url')

const HMAC = { HS256: 'sha256', HS384: 'sha384', HS512: 'sha512' }

/**
 * Signs a JWT with `secret`.
 *
 * `expiresIn` (seconds, default 3600) sets `exp` relative to now unless the claims carry their own
 * `exp`; `expiresIn: null` leaves `exp` out. `alg: 'none'` gives an unsigned token (empty signature).
 */
export function signJwt(secret, claims = {}, { alg = 'HS256', expiresIn = 3600, header = {} } = {}) {
  const now = Math.floor(Date.now() / 1000)
  const body = { iat: now, ...claims }
  if (expiresIn !== null && claims.exp === undefined) body.exp = now + expiresIn
  const head = b64url(JSON.stringify({ alg, typ: 'JWT', ...header }))
  const input = `${head}.${b64url(JSON.stringify(body))}`
  if (alg === 'none') return `${input}.`
  const hash = HMAC[alg]
  if (!hash) throw new Error(`signJwt: unsupported alg ${alg}`)
  return `${input}.${createHmac(hash, secret).update(input).digest('base64url')}`
}

/** Whether something accepts TCP connections on 127.0.0.1:`port`. */
export function listening(port) {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => {
      socket.destroy()
      resolve(true)
    })
    socket.on('error', () => resolve(false))
  })
}

/**
 * GET /healthcheck on a connection of its own that is closed afterwards (unlike fetch's pooled
 * keep-alive connections, which would linger in the gateway). `{ status: 0 }` when nothing answers.
 */
export function healthcheck(port) {
  return new Promise((resolve) => {
    const req = httpGet(
      { host: '127.0.0.1', port, path: '/healthcheck', agent: false, headers: { Connection: 'close' } },
      (res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (chunk) => (body += chunk))
        res.on('end', () => resolve({ status: res.statusCode, body }))
        res.on('error', () => resolve({ status: 0, body: '' }))
      },
    )
    req.setTimeout(1000, () => req.destroy())
    req.on('error', () => resolve({ status: 0, body: '' }))
  })
}

function pipeLines(stream, sink, prefix) {
  let partial = ''
  stream.setEncoding('utf8')
  stream.on('data', (chunk) => {
    const lines = (partial + chunk).split('\n')
    partial = lines.pop()
    for (const line of lines) {
      sink.push(line)
      if (sink.length > 2000) sink.shift()
      if (process.env.GATEWAY_LOG) process.stderr.write(`${prefix}${line}\n`)
    }
  })
}

/**
 * Starts the gateway and waits for `GET /healthcheck` to answer 200.
 *
 * `port` and `secret` start it again where a stopped one was (a restart, with the tokens its
 * clients hold still valid).
 *
 * @param {{ env?: Record<string, string>, port?: number, secret?: string }} [options]
 */
export async function startGateway({ env = {}, port: wantedPort, secret: wantedSecret } = {}) {
  const bin = gatewayBinary()
  if (!existsSync(bin)) {
    throw new Error(
      `gateway binary not found at ${bin}: run \`cargo build -p realtime-gateway\` or set GATEWAY_BIN`,
    )
  }
  const port = wantedPort ?? (await freePort())
  const secret = wantedSecret ?? randomBytes(30).toString('base64url') // 40 characters
  const childEnv = { ...process.env }
  delete childEnv.JWT_SECRET
  Object.assign(
    childEnv,
    {
      HOST: '127.0.0.1',
      PORT: String(port),
      API_JWT_SECRET: secret,
      CONNECT_ERROR_BACKOFF_MS: '0',
      CHANNEL_ERROR_BACKOFF_MS: '50',
      RUST_LOG: process.env.RUST_LOG || 'warn',
    },
    env,
  )

  const output = []
  const child = spawn(bin, [], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] })
  children.add(child)
  pipeLines(child.stdout, output, `[gateway:${port}] `)
  pipeLines(child.stderr, output, `[gateway:${port}] `)
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      children.delete(child)
      resolve({ code, signal })
    })
    child.once('error', (error) => {
      children.delete(child)
      resolve({ code: null, signal: null, error })
    })
  })

  const url = `http://127.0.0.1:${port}`
  const started = Date.now()
  for (;;) {
    const early = await Promise.race([exited, new Promise((r) => setTimeout(() => r(null), 50))])
    if (early) {
      throw new Error(
        `gateway exited before it was ready (${JSON.stringify(early)}):\n${output.slice(-40).join('\n')}`,
      )
    }
    const health = await healthcheck(port)
    if (health.status === 200 && health.body.trim() === 'ok') break
    if (Date.now() - started > READY_TIMEOUT_MS) {
      child.kill('SIGKILL')
      throw new Error(
        `gateway on ${url} not healthy after ${READY_TIMEOUT_MS} ms:\n${output.slice(-40).join('\n')}`,
      )
    }
  }

  const sign = (claims = {}, options = {}) => signJwt(secret, claims, options)

  return {
    url,
    /** The gateway process id (for measurements of its memory). */
    pid: child.pid,
    /** The value of one series of `GET /metrics` (0 when absent). */
    async metric(series) {
      const text = await (await fetch(`${url}/metrics`)).text()
      const line = text.split('\n').find((l) => l.startsWith(`${series} `))
      return Number(line?.split(' ')[1] ?? 0)
    },
    wsUrl: `ws://127.0.0.1:${port}`,
    port,
    secret,
    sign,
    anonKey: sign({ role: 'anon', iss: 'supabase' }),
    serviceKey: sign({ role: 'service_role', iss: 'supabase' }),
    /** The gateway's recent stdout/stderr lines. */
    logs: () => output.slice(),
    /** Resolves with `{ code, signal }` once the process has exited. */
    exited,
    /** Sends `signal` to the gateway process (for shutdown tests); see `exited`. */
    signal: (signal) => child.kill(signal),
    /** Sends SIGTERM, waits up to 5 s for the exit (then SIGKILL); resolves to the exit status. */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
      const status = await exited
      clearTimeout(timer)
      return status
    },
  }
}
