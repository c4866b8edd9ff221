// Real clients, built the way an app builds them.
//
// supabase-js 2.119 looks for a global WebSocket, which Node 20 does not have without
// --experimental-websocket; we pass the `ws` package as `realtime.transport` instead (documented in
// README.md). The old realtime-js 2.11.x (V1 serializer only) finds `ws` by itself, but gets the same
// transport for symmetry.

import { createClient } from '@supabase/supabase-js'
import { RealtimeClient as RealtimeClientV1 } from 'realtime-js-v1'
import WebSocket from 'ws'
import { Inbox } from './inbox.mjs'

const open = new Set()

/** A supabase-js client for the gateway `gw`; `realtime` options are passed through. */
export function supabaseClient(gw, { key = gw.anonKey, realtime = {}, ...options } = {}) {
  const client = createClient(gw.url, key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    ...options,
    realtime: { transport: WebSocket, ...realtime },
  })
  open.add(client.realtime)
  return client
}

/** A realtime-js 2.11.x client (always vsn 1.0.0) pointed at the gateway's public path. */
export function v1Client(gw, { key = gw.anonKey, ...options } = {}) {
  const client = new RealtimeClientV1(`${gw.wsUrl}/realtime/v1`, {
    params: { apikey: key },
    transport: WebSocket,
    ...options,
  })
  open.add(client)
  return client
}

/** Removes every channel and closes every socket opened by the two factories above. */
export async function closeClients() {
  const clients = [...open]
  open.clear()
  await Promise.all(
    clients.map(async (client) => {
      try {
        await Promise.race([
          client.removeAllChannels(),
          new Promise((resolve) => setTimeout(resolve, 2000)),
        ])
      } catch {
        // the socket may already be gone
      }
      try {
        await client.disconnect()
      } catch {
        // idem
      }
    }),
  )
}

const FAILED = new Set(['CHANNEL_ERROR', 'TIMED_OUT', 'CLOSED'])

/**
 * Creates a channel on `client` (a supabase-js client or a RealtimeClient), records its broadcasts,
 * `system` messages and subscribe statuses, and subscribes.
 *
 * Returns `{ channel, broadcasts, system, statuses, subscribed }`; `subscribed` resolves on
 * SUBSCRIBED and rejects if the channel reports an error, a timeout or CLOSED first.
 */
export function channel(client, name, { config = {}, event = '*', timeoutMs = 5000 } = {}) {
  const ch = client.channel(name, { config })
  const broadcasts = new Inbox(`broadcasts of ${name}`)
  const system = new Inbox(`system messages of ${name}`)
  const statuses = new Inbox(`statuses of ${name}`)
  ch.on('broadcast', { event }, (message) => broadcasts.push(message))
  ch.on('system', {}, (message) => system.push(message))
  ch.subscribe((status, err) => statuses.push({ status, err }))
  const subscribed = untilSubscribed(statuses, name, timeoutMs)
  subscribed.catch(() => {}) // tests that expect a failure never await it
  return { channel: ch, broadcasts, system, statuses, subscribed }
}

/** `channel()` and wait for SUBSCRIBED. */
export async function joined(client, name, options) {
  const result = channel(client, name, options)
  await result.subscribed
  return result
}

/** Resolves when `statuses` (an Inbox of {status, err}) reaches SUBSCRIBED; rejects on a failure status first. */
export function untilSubscribed(statuses, name, timeoutMs) {
  return statuses.until(
    (items) => {
      for (const { status, err } of items) {
        if (status === 'SUBSCRIBED') return true
        if (FAILED.has(status)) {
          throw new Error(`channel ${name} reported ${status} before SUBSCRIBED: ${err?.message ?? ''}`)
        }
      }
      return false
    },
    timeoutMs,
    'SUBSCRIBED',
  )
}
