// Measurement, not a test: N (default 200) supabase-js members join one room and track; prints
//   - the time until every member's presenceState() holds all N keys (wall clock from the first connect;
//     clients and gateway share this machine, so client-side CPU is included),
//   - the bytes one raw observer's WebSocket receives per member join (presence_diff text bytes, and
//     TCP bytes including WebSocket framing), and the size of presence_state for a joiner at N members.
//
// Run: cd tests/js && node bench/presence-200.mjs [members]   (needs target/debug/realtime-gateway)

import { randomUUID } from 'node:crypto'
import { closeClients, supabaseClient } from '../lib/clients.mjs'
import { startGateway } from '../lib/gateway.mjs'
import { rawSocket } from '../lib/raw.mjs'

const N = Number(process.argv[2] ?? 200)
const gw = await startGateway()
const name = `presence-bench-${randomUUID()}`
const topic = `realtime:${name}`

const joinFrame = (key) => ({
  join_ref: '1',
  ref: '1',
  topic,
  event: 'phx_join',
  payload: {
    config: { broadcast: { ack: false, self: false }, presence: { enabled: true, key }, postgres_changes: [], private: false },
    access_token: gw.anonKey,
  },
})

// the observer: a raw V2 socket that joins first and never tracks
const observer = await rawSocket(gw)
observer.send(joinFrame('observer'))
await observer.frames.find((f) => f.event === 'presence_state', 5000, 'the observer presence_state')
let diffBytes = 0
let diffFrames = 0
let diffJoins = 0
observer.ws.on('message', (data, isBinary) => {
  const text = isBinary ? '' : data.toString('utf8')
  if (text.includes('"presence_diff"')) {
    diffBytes += data.length
    diffFrames++
    diffJoins += Object.keys(JSON.parse(text)[4].joins).length
  }
})
const tcpBefore = observer.ws._socket.bytesRead

const started = Date.now()
let lastAck = 0
const members = await Promise.all(
  Array.from({ length: N }, async (_, i) => {
    const supabase = supabaseClient(gw, { realtime: { timeout: 60_000 } })
    const channel = supabase.channel(name, { config: { presence: { key: `user-${i}` } } })
    // converged when the raw Presence state holds N keys; counting join events keeps the check O(1)
    const keys = new Set()
    let resolve
    const converged = new Promise((r) => (resolve = r))
    channel.on('presence', { event: 'join' }, ({ key }) => {
      keys.add(key)
      if (keys.size === N) resolve(Date.now())
    })
    channel.on('presence', { event: 'leave' }, ({ key, currentPresences }) => {
      if (currentPresences.length === 0) keys.delete(key)
    })
    await new Promise((ok, fail) =>
      channel.subscribe((status, err) => {
        if (status === 'SUBSCRIBED') ok()
        else fail(new Error(`member ${i}: ${status} ${err?.message ?? ''}`))
      }),
    )
    const reply = await channel.track({ user_id: `user-${i}`, online_at: new Date().toISOString() })
    if (reply !== 'ok') throw new Error(`member ${i}: track ${reply}`)
    lastAck = Math.max(lastAck, Date.now())
    return { channel, converged }
  }),
)
const times = await Promise.race([
  Promise.all(members.map((m) => m.converged)),
  new Promise((_, fail) => setTimeout(() => fail(new Error('no convergence within 120 s')), 120_000)),
])
const allConverged = Math.max(...times)
// the full check, once, after the fact
for (const [i, m] of members.entries()) {
  const count = Object.keys(m.channel.presenceState()).length
  if (count !== N) throw new Error(`member ${i} shows ${count} keys`)
}
// wait until the observer has every join, then read its byte counters
const deadline = Date.now() + 10_000
while (diffJoins < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
const tcpBytes = observer.ws._socket.bytesRead - tcpBefore

// presence_state a newcomer gets at N members
const late = await rawSocket(gw)
late.send(joinFrame('late'))
const state = await late.frames.find((f) => f.event === 'presence_state', 5000, 'presence_state at N')

console.log(`members: ${N}`)
console.log(`convergence: ${allConverged - started} ms from the first connect until all ${N} members see ${N} keys`)
console.log(`             ${allConverged - lastAck} ms after the last track was acknowledged`)
console.log(`observer: ${diffJoins} joins in ${diffFrames} presence_diff frames, ${diffBytes} text bytes, ${tcpBytes} TCP bytes`)
console.log(`bytes per member join (one observer): ${(diffBytes / diffJoins).toFixed(1)} payload, ${(tcpBytes / diffJoins).toFixed(1)} on the wire`)
console.log(`fan-out per join at ${N} members: ~${Math.round((diffBytes / diffJoins) * N)} bytes in total`)
console.log(`presence_state for a joiner at ${N} members: ${Buffer.byteLength(state.text)} bytes (${Object.keys(state.payload).length} keys)`)

await late.close()
await observer.close()
await closeClients()
await gw.stop()
process.exit(0)
