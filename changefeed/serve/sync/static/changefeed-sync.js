// changefeed-sync.js: a small client for `changefeed serve`, an ES module with no build step.
//
//   import { ShapeStore, SyncQueue } from '/static/changefeed-sync.js'
//
// ShapeStore keeps a local copy of one shape (a table, a `where`, columns) through Electric's
// HTTP shape API (GET /v1/shape): the initial rows, then live changes by long-polling, resuming
// from its handle and offset after a disconnection (and after a reload, when given a storage).
// SyncQueue is Mobync's side (POST /sync): writes are applied locally at once and queued as
// diffs (kept in storage while offline), sent when the server can be reached, and the answer
// brings every change of the device's rows since its logical clock.

const STORAGE_PREFIX = 'changefeed-sync:'

function parseValue(text, column) {
  if (text === null || text === undefined || !column) return text
  if (column.dims) return text // arrays stay PostgreSQL's text here
  switch (column.type) {
    case 'int2': case 'int4': case 'float4': case 'float8': case 'oid':
      return Number(text)
    case 'bool':
      return text === 'true' || text === 't'
    case 'json': case 'jsonb':
      return JSON.parse(text)
    default:
      return text
  }
}

function parseRow(value, schema) {
  const row = {}
  for (const [name, text] of Object.entries(value)) row[name] = parseValue(text, schema[name])
  return row
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms)
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve() }, { once: true })
  })
}

function load(storage, key) {
  if (!storage) return null
  try { return JSON.parse(storage.getItem(STORAGE_PREFIX + key) ?? 'null') } catch { return null }
}

function save(storage, key, value) {
  if (storage) storage.setItem(STORAGE_PREFIX + key, JSON.stringify(value))
}

// Listeners shared by both classes: `subscribe(fn)` returns the function that unsubscribes.
class Observable {
  #listeners = new Set()
  subscribe(listener) { this.#listeners.add(listener); return () => this.#listeners.delete(listener) }
  notify() { for (const listener of this.#listeners) listener(this) }
}

export class ShapeStore extends Observable {
  // options: {url: server base URL, table, where?, columns?: [..], params?: {1: ..}, token?,
  //           storage?: localStorage or null, key?: storage key, retryMs?: 500}
  constructor(options) {
    super()
    this.options = options
    this.key = options.key ?? `shape:${options.table}:${options.where ?? ''}:${options.columns ?? ''}`
    const saved = load(options.storage, this.key)
    this.rows = new Map(saved?.rows ?? [])
    this.handle = saved?.handle
    this.offset = saved?.offset ?? '-1'
    this.schema = saved?.schema ?? {}
    this.cursor = undefined
    this.status = 'connecting' // connecting | syncing | live | offline | error
    this.error = null
    this.refetches = 0
    this.#onOnline = () => this.#wake?.abort()
  }

  #abort = null
  #wake = null
  #onOnline

  start() {
    if (this.#abort) return this
    this.#abort = new AbortController()
    globalThis.addEventListener?.('online', this.#onOnline)
    this.#loop(this.#abort.signal)
    return this
  }

  stop() {
    this.#abort?.abort()
    this.#abort = null
    globalThis.removeEventListener?.('online', this.#onOnline)
  }

  #url(live) {
    const url = new URL('/v1/shape', this.options.url)
    const params = url.searchParams
    params.set('table', this.options.table)
    if (this.options.where) params.set('where', this.options.where)
    if (this.options.columns) params.set('columns', this.options.columns.join(','))
    for (const [n, v] of Object.entries(this.options.params ?? {})) params.set(`params[${n}]`, v)
    params.set('offset', this.offset)
    if (this.handle && this.offset !== '-1') params.set('handle', this.handle)
    if (live) {
      params.set('live', 'true')
      if (this.cursor) params.set('cursor', this.cursor)
    }
    return url
  }

  async #loop(signal) {
    let failures = 0
    let live = false
    while (!signal.aborted) {
      const headers = this.options.token ? { Authorization: `Bearer ${this.options.token}` } : {}
      let response
      try {
        response = await fetch(this.#url(live), { headers, signal })
      } catch (error) {
        if (signal.aborted) return
        failures += 1
        live = false
        this.#set('offline', error)
        this.#wake = new AbortController()
        await sleep(Math.min(10000, (this.options.retryMs ?? 500) * 2 ** failures), this.#wake.signal)
        continue
      }
      if (response.status === 409) { // the server cannot serve our offset: start again
        this.handle = response.headers.get('electric-handle') ?? undefined
        this.offset = '-1'
        this.rows.clear()
        this.refetches += 1
        live = false
        await response.body?.cancel()
        continue
      }
      if (!response.ok) {
        let message = `HTTP ${response.status}`
        try { message = (await response.json()).message ?? message } catch {}
        if (response.status >= 500) {
          failures += 1
          this.#set('offline', new Error(message))
          await sleep(Math.min(10000, 500 * 2 ** failures), signal)
          continue
        }
        this.#set('error', new Error(message))
        return
      }
      failures = 0
      const schema = response.headers.get('electric-schema')
      if (schema) this.schema = JSON.parse(schema)
      this.handle = response.headers.get('electric-handle') ?? this.handle
      this.cursor = response.headers.get('electric-cursor') ?? this.cursor
      let messages
      try { messages = await response.json() } catch (error) {
        if (signal.aborted) return
        continue // the connection dropped mid-body: ask again from the same offset
      }
      let upToDate = false
      for (const message of messages) {
        if (message.headers?.control === 'up-to-date') upToDate = true
        if (!('key' in message)) continue
        const value = parseRow(message.value, this.schema)
        const operation = message.headers.operation
        if (operation === 'insert') this.rows.set(message.key, value)
        else if (operation === 'update') this.rows.set(message.key, { ...this.rows.get(message.key), ...value })
        else if (operation === 'delete') this.rows.delete(message.key)
      }
      this.offset = response.headers.get('electric-offset') ?? this.offset
      live = upToDate
      save(this.options.storage, this.key, {
        rows: [...this.rows], handle: this.handle, offset: this.offset, schema: this.schema,
      })
      this.#set(upToDate ? 'live' : 'syncing', null)
    }
  }

  #set(status, error) {
    this.status = status
    this.error = error
    this.notify()
  }
}

function newId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`
}

export class SyncQueue extends Observable {
  // options: {url: server base URL, token?, owner?, storage?, key?, intervalMs?: 2000,
  //           keyOf?: (model, row) => string (default: row.id)}
  constructor(options) {
    super()
    this.options = options
    this.key = options.key ?? `mobync:${options.token ?? ''}`
    const saved = load(options.storage, this.key)
    this.clock = saved?.clock ?? 0
    this.pending = saved?.pending ?? []
    this.rows = new Map((saved?.rows ?? []).map(([model, rows]) => [model, new Map(rows)]))
    this.rejected = []
    this.status = 'idle' // idle | syncing | offline | error
    this.error = null
    this.#onOnline = () => this.sync()
  }

  #timer = null
  #running = null
  #onOnline

  start() {
    globalThis.addEventListener?.('online', this.#onOnline)
    this.#timer = setInterval(() => this.sync(), this.options.intervalMs ?? 2000)
    this.sync()
    return this
  }

  stop() {
    clearInterval(this.#timer)
    globalThis.removeEventListener?.('online', this.#onOnline)
  }

  table(model) {
    if (!this.rows.has(model)) this.rows.set(model, new Map())
    return this.rows.get(model)
  }

  #keyOf(model, row) {
    return String(this.options.keyOf ? this.options.keyOf(model, row) : row.id)
  }

  // Writes: applied to the local rows at once, queued for the server.
  create(model, data) {
    const row = { id: data.id ?? newId(), ...data }
    return this.#queue(0, model, row)
  }

  update(model, data) { return this.#queue(1, model, data) }

  delete(model, key) { return this.#queue(2, model, key) }

  #queue(type, model, data) {
    const table = this.table(model)
    const key = this.#keyOf(model, data)
    if (type === 2) table.delete(key)
    else table.set(key, { ...table.get(key), ...data })
    this.pending.push({
      id: newId(), owner: this.options.owner ?? null, logical_clock: this.clock,
      utc_timestamp: Date.now(), type, model, json_data: JSON.stringify(data),
    })
    this.#persist()
    this.notify()
    queueMicrotask(() => this.sync())
    return data
  }

  // Send the queue and take the server's changes; concurrent calls share one request.
  sync() {
    if (!this.#running) this.#running = this.#sync().finally(() => { this.#running = null })
    return this.#running
  }

  async #sync() {
    const sending = this.pending.slice()
    let response
    try {
      this.status = 'syncing'
      response = await fetch(new URL('/sync', this.options.url), {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ auth_token: this.options.token, logical_clock: this.clock, diffs: sending }),
      })
    } catch (error) {
      this.status = 'offline'
      this.error = error
      this.notify()
      return false
    }
    const answer = await response.json().catch(() => ({ message: `HTTP ${response.status}` }))
    if (response.status === 409) { // the server no longer has our clock: take everything anew
      this.clock = 0
      this.rows.clear()
      this.#persist()
      return this.#sync()
    }
    if (!response.ok) {
      this.status = 'error'
      this.error = new Error(answer.message)
      this.notify()
      return false
    }
    const sent = new Set(sending.map((diff) => diff.id))
    this.pending = this.pending.filter((diff) => !sent.has(diff.id))
    this.rejected = answer.rejected ?? []
    if (this.rejected.length) { // our local guess was wrong somewhere: take the server's rows
      this.clock = 0
      this.rows.clear()
    } else {
      for (const diff of answer.diffs) this.#apply(diff)
      this.clock = answer.logical_clock
    }
    this.status = 'idle'
    this.error = null
    this.#persist()
    this.notify()
    if (this.clock === 0 && this.rejected.length) return this.#sync()
    return true
  }

  #apply(diff) {
    const data = typeof diff.json_data === 'string' ? JSON.parse(diff.json_data) : diff.json_data
    const table = this.table(diff.model)
    const key = this.#keyOf(diff.model, data)
    if (diff.type === 2) table.delete(key)
    else table.set(key, { ...table.get(key), ...data })
  }

  #persist() {
    save(this.options.storage, this.key, {
      clock: this.clock, pending: this.pending,
      rows: [...this.rows].map(([model, rows]) => [model, [...rows]]),
    })
  }
}
