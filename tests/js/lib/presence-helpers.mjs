// Presence members built the way an app builds them: `.on('presence', {event: 'sync'|'join'|'leave'})`
// registered before `subscribe()` (which is what makes realtime-js send `presence.enabled: true`), then
// `track()` / `untrack()` and `presenceState()`.
//
// Every sync, join and leave is recorded in an Inbox, so tests await a state instead of sleeping.
// `lib/clients.mjs`'s `channel()` subscribes at once, leaving no room for presence listeners, hence this file.

import { Inbox } from './inbox.mjs'
import { untilSubscribed } from './clients.mjs'


/**
 * Creates a channel on `client` (supabase-js client or RealtimeClient), listens to presence (unless
 * `listen: false`), records system messages and statuses, and subscribes.
 *
 * Returns `{ channel, syncs, joins, leaves, broadcasts, system, statuses, subscribed, state, untilState }`.
 * `syncs` records the sync count only (a `presenceState()` snapshot per sync is O(members) and adds up
 * in the big rooms); `untilState(check, ms, what)` re-evaluates `check(channel.presenceState())` on every
 * sync and resolves with the state once it holds.
 */
export function presenceChannel(client, name, { key, config = {}, listen = true, timeoutMs = 5000 } = {}) {
  const presence = { ...(config.presence ?? {}) }
  if (key !== undefined) presence.key = key
  const ch = client.channel(name, { config: { ...config, presence } })
  const syncs = new Inbox(`presence syncs of ${name}`)
  const joins = new Inbox(`presence joins of ${name}`)
  const leaves = new Inbox(`presence leaves of ${name}`)
  const system = new Inbox(`system messages of ${name}`)
  const statuses = new Inbox(`statuses of ${name}`)
  const broadcasts = new Inbox(`broadcasts of ${name}`)
  ch.on('broadcast', { event: '*' }, (message) => broadcasts.push(message))
  if (listen) {
    ch.on('presence', { event: 'sync' }, () => syncs.push(syncs.length + 1))
    ch.on('presence', { event: 'join' }, (payload) => joins.push(payload))
    ch.on('presence', { event: 'leave' }, (payload) => leaves.push(payload))
  }
  ch.on('system', {}, (message) => system.push(message))
  ch.subscribe((status, err) => statuses.push({ status, err }))
  const subscribed = untilSubscribed(statuses, name, timeoutMs)
  subscribed.catch(() => {})
  const state = () => ch.presenceState()
  const untilState = (check, ms, what) =>
    syncs
      .until(
        () => {
          const current = state()
          return check(current) ? current : false
        },
        ms,
        what,
      )
      .catch((error) => {
        error.message += `\n  presenceState() was ${preview(state())}`
        throw error
      })
  return { channel: ch, syncs, joins, leaves, broadcasts, system, statuses, subscribed, state, untilState }
}

/** `presenceChannel()` and wait for SUBSCRIBED. */
export async function presenceJoined(client, name, options) {
  const member = presenceChannel(client, name, options)
  await member.subscribed
  return member
}

/** The keys of a `presenceState()` result, sorted. */
export const keysOf = (state) => Object.keys(state).sort()

/** A meta with `presence_ref` removed (what the app tracked). */
export function bare(meta) {
  const { presence_ref, ...rest } = meta
  return rest
}

/** `state[key]` stripped of presence_refs, or undefined. */
export const metasOf = (state, key) => state[key]?.map(bare)

/** The raw `ws` WebSocket under a supabase-js client (realtime-js 2.119 + @supabase/phoenix). */
export function wsOf(supabase) {
  const conn = supabase.realtime.socketAdapter.getSocket().conn
  if (!conn) throw new Error('the client has no open WebSocket')
  return conn
}

/** Closes the given supabase-js clients' sockets (channels are left without phx_leave). */
export async function closeAll(clients) {
  await Promise.all(
    clients.map(async (client) => {
      try {
        await client.realtime.disconnect()
      } catch {
        // already gone
      }
    }),
  )
}

function preview(value) {
  const text = JSON.stringify(value)
  return text && text.length > 600 ? `${text.slice(0, 600)}…` : text
}
