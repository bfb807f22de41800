// Real @electric-sql/client streams syncing shapes, for the serve tests.
//
// node shape_client.mjs '<json: one options object, or a list of them>'
//   {url, table, where?, params?, columns?, replica?, sse?, token?, handle?, offset?, rows?}
// `rows` (key -> row) seeds the local copy when resuming from a saved handle and offset.
// Prints one JSON line per event on stdout, `shape` being the index of its options:
//   {"shape": i, "event": "up-to-date", "rows": {...}, "offset": ..., "handle": ...,
//    "refetches": n, "messages": n, "shapeRows": {...} (the client's own Shape, fresh syncs)}
//   {"shape": i, "event": "must-refetch"} and {"shape": i, "event": "error", ...}
import { ShapeStream, Shape } from '@electric-sql/client'

const given = JSON.parse(process.argv[2])

function print(object) {
  process.stdout.write(JSON.stringify(object, (_, v) => (typeof v === 'bigint' ? v.toString() : v)) + '\n')
}

function follow(options, index) {
  const params = { table: options.table }
  if (options.where) params.where = options.where
  if (options.params) params.params = options.params
  if (options.columns) params.columns = options.columns
  if (options.replica) params.replica = options.replica
  const rows = new Map(Object.entries(options.rows ?? {}))
  let refetches = 0
  let messagesSeen = 0
  const stream = new ShapeStream({
    url: options.url,
    params,
    offset: options.offset,
    handle: options.handle,
    liveSse: !!options.sse,
    headers: options.token ? { Authorization: `Bearer ${options.token}` } : undefined,
    backoffOptions: { initialDelay: 50, maxDelay: 500, multiplier: 1.5 },
    onError: (error) => {
      print({ shape: index, event: 'error', status: error.status ?? null, message: String(error.message ?? error) })
      // Keep going on a dropped connection (the server restarts in some tests); stop on 4xx.
      if (error.status && error.status >= 400 && error.status < 500) return
      return {}
    },
  })
  const shape = options.handle ? null : new Shape(stream)
  stream.subscribe((messages) => {
    let upToDate = false
    for (const message of messages) {
      const headers = message.headers
      if (headers.control === 'must-refetch') {
        refetches += 1
        rows.clear()
        print({ shape: index, event: 'must-refetch', refetches })
        continue
      }
      if (headers.control === 'up-to-date') {
        upToDate = true
        continue
      }
      if (!('key' in message)) continue
      messagesSeen += 1
      if (headers.operation === 'insert') rows.set(message.key, message.value)
      else if (headers.operation === 'update') rows.set(message.key, { ...rows.get(message.key), ...message.value })
      else if (headers.operation === 'delete') rows.delete(message.key)
    }
    if (upToDate) {
      const event = {
        shape: index, event: 'up-to-date', rows: Object.fromEntries(rows),
        offset: stream.lastOffset, handle: stream.shapeHandle, refetches, messages: messagesSeen,
      }
      if (shape) event.shapeRows = Object.fromEntries(shape.currentValue)
      print(event)
    }
  }, (error) => print({ shape: index, event: 'error', status: error.status ?? null, message: String(error.message ?? error) }))
}

;(Array.isArray(given) ? given : [given]).forEach(follow)
process.on('SIGTERM', () => process.exit(0))
