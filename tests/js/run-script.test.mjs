// The README's command to run the stack, `scripts/run.sh`, as a user runs it on a fresh machine:
// a throwaway Postgres, keys printed at start that supabase-js connects with; and with
// CLUSTER_NODES=2, two nodes and a nats-server that share Broadcast. SIGTERM stops everything it
// started. (GATEWAY_BIN points it at the debug binary instead of a release build.)

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { after, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { freePort, gatewayBinary, healthcheck, listening } from './lib/gateway.mjs'
import { delay as sleep } from './lib/inbox.mjs'

const script = fileURLToPath(new URL('../../scripts/run.sh', import.meta.url))
const running = new Set()
after(async () => {
  await closeClients()
  for (const child of running) child.kill('SIGKILL')
})

async function healthy(port) {
  const { status, body } = await healthcheck(port)
  return status === 200 && body === 'ok'
}

/** Two free ports in a row (the script puts node n on PORT + n - 1). */
async function freePair() {
  for (;;) {
    const port = await freePort()
    if (port < 65535 && !(await listening(port + 1))) return port
  }
}

/** Starts the script; resolves once every node answers its health check and the keys are out. */
async function runScript(env, ports) {
  const childEnv = { ...process.env, GATEWAY_BIN: gatewayBinary(), RUST_LOG: 'warn', ...env }
  delete childEnv.API_JWT_SECRET
  delete childEnv.DATABASE_URL
  const child = spawn('bash', [script], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] })
  running.add(child)
  let output = ''
  for (const stream of [child.stdout, child.stderr]) {
    stream.setEncoding('utf8')
    stream.on('data', (chunk) => (output += chunk))
  }
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  const started = Date.now()
  for (;;) {
    if (child.exitCode !== null) throw new Error(`run.sh exited: ${output}`)
    const up = await Promise.all(ports.map(healthy))
    if (up.every(Boolean) && /anon key:\s+\S+/.test(output)) break
    if (Date.now() - started > 60_000) throw new Error(`run.sh not up within 60 s: ${output}`)
    await sleep(200)
  }
  const anonKey = output.match(/anon key:\s+(\S+)/)[1]
  const nodes = ports.map((port) => ({ url: `http://127.0.0.1:${port}`, anonKey }))
  return {
    nodes,
    output: () => output,
    async stop() {
      child.kill('SIGTERM')
      const result = await Promise.race([exited, sleep(30_000).then(() => 'timeout')])
      running.delete(child)
      return result
    },
  }
}

test('scripts/run.sh serves a throwaway stack with printed keys, and SIGTERM stops it', async () => {
  const port = await freePort()
  const run = await runScript({ PORT: String(port) }, [port])
  const [node] = run.nodes
  const name = `run-${randomUUID()}`
  const a = await joined(supabaseClient(node), name, { config: { broadcast: { self: true } } })
  await a.channel.send({ type: 'broadcast', event: 'hi', payload: { x: 1 } })
  await a.broadcasts.find((m) => m.event === 'hi', 5000, 'the broadcast')
  await closeClients()
  const result = await run.stop()
  assert.notEqual(result, 'timeout', `run.sh did not stop: ${run.output()}`)
  assert.equal(await listening(port), false, 'the gateway is gone')
})

test('CLUSTER_NODES=2 scripts/run.sh: two nodes and a nats-server that share Broadcast, all stopped by SIGTERM', async () => {
  const port = await freePair()
  const natsPort = await freePort()
  const ports = [port, port + 1]
  const run = await runScript({ PORT: String(port), CLUSTER_NODES: '2', NATS_PORT: String(natsPort) }, ports)
  assert.ok(await listening(natsPort), 'nats-server is up')
  const name = `run-cluster-${randomUUID()}`
  const onFirst = await joined(supabaseClient(run.nodes[0]), name, {})
  const onSecond = await joined(supabaseClient(run.nodes[1]), name, {})
  await onFirst.channel.send({ type: 'broadcast', event: 'across', payload: { from: 1 } })
  const got = await onSecond.broadcasts.find((m) => m.event === 'across', 5000, 'the broadcast on node 2')
  assert.deepEqual(got.payload, { from: 1 })
  await closeClients()
  const result = await run.stop()
  assert.notEqual(result, 'timeout', `run.sh did not stop: ${run.output()}`)
  for (const p of [...ports, natsPort]) assert.equal(await listening(p), false, `port ${p} is closed`)
})
