// Starts Debian's nats-server (the engine of a gateway cluster) for a test file: 127.0.0.1, a free
// port, core NATS only, short pings so that a dead client is noticed within seconds. `stop()` and
// `start()` again on the same port play a NATS restart.

import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort, listening } from './gateway.mjs'

const children = new Set()
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL')
})

export function natsBinary() {
  if (process.env.NATS_SERVER_BIN) return process.env.NATS_SERVER_BIN
  for (const path of ['/usr/sbin/nats-server', '/usr/bin/nats-server']) if (existsSync(path)) return path
  return 'nats-server'
}

/**
 * A nats-server on 127.0.0.1; `url` is what CLUSTER_NATS_URL takes. With `route` (a port for
 * routes) and `routes` (the others' route ports) it is one server of a NATS cluster; `monitor`
 * (an HTTP port) serves `/connz`, which `connections()` reads.
 */
export async function startNats({ port: wanted, name, route, routes = [], monitor } = {}) {
  const port = wanted ?? (await freePort())
  const dir = mkdtempSync(join(tmpdir(), 'nats-'))
  const config = join(dir, 'nats.conf')
  let text = `max_payload: 8MB\nping_interval: "2s"\nping_max: 2\nwrite_deadline: "2s"\n`
  if (name) text += `server_name: ${name}\n`
  if (monitor) text += `http: "127.0.0.1:${monitor}"\n`
  if (route) {
    const list = routes.map((p) => `nats-route://127.0.0.1:${p}`).join(', ')
    text += `cluster {\n  name: realtime-test\n  listen: "127.0.0.1:${route}"\n  routes: [${list}]\n}\n`
  }
  writeFileSync(config, text)
  let child
  const output = []
  const server = {
    port,
    url: `nats://127.0.0.1:${port}`,
    logs: () => output.slice(),
    async start() {
      child = spawn(natsBinary(), ['-a', '127.0.0.1', '-p', String(port), '-c', config], {
        stdio: ['ignore', 'pipe', 'pipe'],
      })
      children.add(child)
      for (const stream of [child.stdout, child.stderr]) {
        stream.setEncoding('utf8')
        stream.on('data', (chunk) => {
          output.push(chunk)
          if (output.length > 200) output.shift()
        })
      }
      child.once('exit', () => children.delete(child))
      const started = Date.now()
      while (!(await listening(port))) {
        if (child.exitCode !== null) throw new Error(`nats-server exited: ${output.join('')}`)
        if (Date.now() - started > 10_000) throw new Error(`nats-server not listening: ${output.join('')}`)
        await new Promise((r) => setTimeout(r, 50))
      }
    },
    /** Names of the clients connected to this server now (needs `monitor`). */
    async connections() {
      const response = await fetch(`http://127.0.0.1:${monitor}/connz`)
      const body = await response.json()
      return (body.connections ?? []).map((c) => c.name ?? '')
    },
    async stop() {
      if (!child || child.exitCode !== null) return
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGKILL')
      await exited
    },
  }
  await server.start()
  return server
}
