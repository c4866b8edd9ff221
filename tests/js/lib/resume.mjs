// Helpers of the resume drills (resume.test.mjs with supabase-js, resume-python.test.mjs with
// realtime-py): a table of numbered rows, a writer that keeps inserting, and the count of what a
// client missed and got twice.

import { randomUUID } from 'node:crypto'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

export const FEED_TABLE = `
  create table public.feed (id bigserial primary key, run text not null, n int not null);
  grant select on public.feed to anon, authenticated;
  alter publication supabase_realtime add table public.feed;
`

/** Gateway settings of one drill on `db`: its own slot and state file. */
export function resumeEnv(db, slot, extra = {}) {
  return {
    DATABASE_URL: db.url,
    SLOT_NAME: slot,
    RESUME_STATE_PATH: join(tmpdir(), `realtime-resume-${slot}-${randomUUID()}.state`),
    ...extra,
  }
}

/** The binding of a drill: INSERTs of its own rows. */
export const binding = (run) => ({ event: 'INSERT', schema: 'public', table: 'feed', filter: `run=eq.${run}` })

/** Inserts rows n = 1, 2, … of `run` every `everyMs` until stopped; remembers when each committed. */
export function startWriter(db, run, everyMs = 120) {
  const committed = [] // { n, at }
  let stopped = false
  let n = 0
  const done = (async () => {
    while (!stopped) {
      n += 1
      await db.sql(`insert into public.feed (run, n) values ($1, $2)`, [run, n])
      committed.push({ n, at: Date.now() })
      await sleep(everyMs)
    }
  })()
  return {
    committed,
    /** Stops; resolves to the last n committed. */
    async stop() {
      stopped = true
      await done
      return n
    },
  }
}

/** Missing and duplicated values of `got` against 1..last, and whether `got` is in order. */
export function tally(got, last) {
  const seen = new Map()
  for (const n of got) seen.set(n, (seen.get(n) ?? 0) + 1)
  const missing = []
  for (let n = 1; n <= last; n++) if (!seen.has(n)) missing.push(n)
  const duplicated = [...seen].filter(([, c]) => c > 1).map(([n]) => n)
  const ordered = got.every((n, i) => i === 0 || n > got[i - 1])
  return { missing, duplicated, ordered }
}

/** Resolves when `statuses` shows SUBSCRIBED for the `count`-th time. */
export function subscribedTimes(statuses, count, ms, what) {
  return statuses.until((items) => items.filter((s) => s.status === 'SUBSCRIBED').length >= count, ms, what)
}
