// GET /metrics (issue 2): Prometheus text exposition with connections, channels, messages in/out,
// bytes out and closes by reason, and the numbers follow what the clients do. Metric names are matched
// loosely (by meaning), the format strictly.

import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, before, test } from 'node:test'
import { closeClients, joined, supabaseClient } from './lib/clients.mjs'
import { startGateway } from './lib/gateway.mjs'
import { Inbox } from './lib/inbox.mjs'

let gw
before(async () => {
  gw = await startGateway()
})
after(async () => {
  await closeClients()
  await gw?.stop()
})

/** Parses the text format into `{ types: Map(name → type), samples: [{ name, labels, value }] }`. */
function parseExposition(text) {
  const types = new Map()
  const samples = []
  for (const line of text.split('\n')) {
    if (line === '') continue
    if (line.startsWith('#')) {
      const m = line.match(/^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/)
      assert.ok(m, `bad comment line: ${line}`)
      if (m[1] === 'TYPE') types.set(m[2], m[3])
      continue
    }
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)( \d+)?$/)
    assert.ok(m, `bad sample line: ${line}`)
    const labels = {}
    for (const [, k, v] of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v
    const value = Number(m[3])
    assert.ok(!Number.isNaN(value) || m[3] === 'NaN', `bad value: ${line}`)
    samples.push({ name: m[1], labels, value })
  }
  return { types, samples }
}

async function scrape() {
  const res = await fetch(`${gw.url}/metrics`)
  assert.equal(res.status, 200)
  assert.match(res.headers.get('content-type') ?? '', /^text\/plain/)
  return parseExposition(await res.text())
}

/** The single unlabelled sample whose name matches `pattern` and whose TYPE is `type`. */
function metric(m, pattern, type) {
  const names = [...m.types].filter(([name, t]) => pattern.test(name) && t === type).map(([name]) => name)
  assert.equal(names.length >= 1, true, `a ${type} matching ${pattern}; have ${[...m.types.keys()].join(', ')}`)
  const sum = (name) => m.samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0)
  return { name: names[0], value: sum(names[0]) }
}

test('the exposition has the issue\'s families, and they follow the clients', async () => {
  const start = await scrape()
  metric(start, /connections?$/, 'gauge')
  metric(start, /channels?$/, 'gauge')
  metric(start, /messages?_(in|received)/, 'counter')
  metric(start, /messages?_(out|sent)/, 'counter')
  metric(start, /bytes_(out|sent)/, 'counter')
  const closes = [...start.types].find(([name, t]) => /close/.test(name) && t === 'counter')
  assert.ok(closes, 'a counter of socket closes')
  assert.ok(
    start.samples.some((s) => s.name === closes[0] && Object.keys(s.labels).length > 0),
    `${closes[0]} is labelled by reason`,
  )

  const name = `metrics-${randomUUID()}`
  const a = await joined(supabaseClient(gw), name, { config: { broadcast: { self: true } } })
  const b = await joined(supabaseClient(gw), name)
  for (let i = 0; i < 10; i++) await a.channel.send({ type: 'broadcast', event: 'm', payload: { i } })
  await b.broadcasts.count(10, 3000, '10 messages')
  await a.broadcasts.count(10, 3000, '10 own messages')

  const during = await scrape()
  const conn = (m) => metric(m, /connections?$/, 'gauge').value
  const chans = (m) => metric(m, /channels?$/, 'gauge').value
  assert.equal(conn(during) - conn(start), 2, 'two more open connections')
  assert.equal(chans(during) - chans(start), 2, 'two more joined channels')
  const delta = (re, type) => metric(during, re, type).value - metric(start, re, type).value
  assert.ok(delta(/messages?_(in|received)/, 'counter') >= 12, 'joins and broadcasts counted in')
  assert.ok(delta(/messages?_(out|sent)/, 'counter') >= 22, 'replies and 20 deliveries counted out')
  assert.ok(delta(/bytes_(out|sent)/, 'counter') > 0)

  await closeClients()
  // the gauges come back down once the gateway has seen the sockets go
  const settled = new Inbox('scrapes')
  const poll = setInterval(async () => settled.push(await scrape().catch(() => null)), 100)
  try {
    await settled.until(
      (items) => items.some((m) => m && conn(m) === conn(start) && chans(m) === chans(start)),
      5000,
      'connections and channels back to their starting values',
    )
  } finally {
    clearInterval(poll)
  }
})
