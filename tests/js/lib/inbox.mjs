// Awaiting events with a deadline instead of sleeping.
//
// An Inbox records everything a callback delivers; `until(check)` re-runs `check(items)` on every new
// item and resolves with its first truthy result, or rejects on the deadline (showing what did arrive).
// A `check` that throws rejects at once, so "stop waiting, this is already wrong" is expressible.

export class Inbox {
  constructor(name = 'inbox') {
    this.name = name
    this.items = []
    this.waiters = new Set()
  }

  push(item) {
    this.items.push(item)
    for (const waiter of [...this.waiters]) waiter()
  }

  get length() {
    return this.items.length
  }

  /** Resolves with the first truthy `check(items)`; rejects after `ms` or when `check` throws. */
  until(check, ms, what) {
    return new Promise((resolve, reject) => {
      let timer
      const settle = (fn, value) => {
        this.waiters.delete(run)
        clearTimeout(timer)
        fn(value)
      }
      const run = () => {
        let result
        try {
          result = check(this.items)
        } catch (error) {
          settle(reject, error)
          return
        }
        if (result) settle(resolve, result)
      }
      timer = setTimeout(() => {
        settle(
          reject,
          new Error(
            `timed out after ${ms} ms waiting for ${what ?? 'an item'} in ${this.name}; ` +
              `got ${this.items.length}: ${preview(this.items)}`,
          ),
        )
      }, ms)
      this.waiters.add(run)
      run()
    })
  }

  /** Resolves with the first item matching `match`. */
  find(match, ms, what) {
    return this.until((items) => items.find(match), ms, what)
  }

  /** Resolves with the items once there are at least `n`. */
  count(n, ms, what) {
    return this.until((items) => items.length >= n && items.slice(), ms, what ?? `${n} items`)
  }
}

function preview(items) {
  const text = JSON.stringify(items.slice(-5), (key, value) => {
    if (value instanceof Error) return `Error(${value.message})`
    if (value instanceof ArrayBuffer) return `ArrayBuffer(${value.byteLength})`
    if (Buffer.isBuffer(value)) return `Buffer(${value.toString('hex')})`
    return value
  })
  return text && text.length > 600 ? `${text.slice(0, 600)}…` : text
}

/** Rejects if `promise` has not settled after `ms`. */
export function within(promise, ms, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

/** A plain delay, only for letting wall-clock time pass (rate windows, expiry), never to wait for an event. */
export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
