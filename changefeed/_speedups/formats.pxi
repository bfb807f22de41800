# The JSON lines of the built-in formats, written straight from a `Change`: what
# `delta_line_encoder`, `change_line` and `DebeziumEncoder.line` give, without
# building their dicts. The constant parts are made once (per table) by the Python code itself;
# whatever is unusual (another operation, a MongoDB change) goes to that code.

cdef object delta_module, debezium_module, time_module, codec_dumps, codec_dumps_line
cdef bytes OPERATION_INSERT = b'{"operation":"insert","table":'
cdef bytes OPERATION_UPDATE = b'{"operation":"update","table":'
cdef bytes OPERATION_DELETE = b'{"operation":"delete","table":'


cdef int bind_formats() except -1:
    global delta_module, debezium_module, time_module, codec_dumps, codec_dumps_line
    if delta_module is not None:
        return 0
    bind_core()
    bind_json()
    import time

    from changefeed.formats import codec, debezium, delta

    delta_module, debezium_module, time_module = delta, debezium, time
    codec_dumps, codec_dumps_line = codec.dumps, codec.dumps_line
    return 0


cdef list unchanged_names(dict row):
    if not row:
        return []
    return [name for name, value in row.items() if value is UNCHANGED]


cdef inline bint has_unchanged(object row):
    if type(row) is not dict:
        return False
    for value in (<dict>row).values():
        if value is UNCHANGED:
            return True
    return False


@cython.final
cdef class DeltaEncoder:
    """``delta_line_encoder(model)``: a change's Snorky delta as one JSON line."""

    cdef object model
    cdef dict starts  # table -> (insert start, delete start, update start)
    cdef JsonWriter out

    def __cinit__(self, model=None):
        bind_formats()
        self.model = model
        self.starts = {}
        self.out = JsonWriter()

    cdef tuple start(self, object table):
        insert, delete = delta_module._delta_starts(table, self.model)
        model = self.model
        if model is None or not isinstance(model, str):
            model = delta_module.model_for(table, model)
        update = <bytes>codec_dumps({"type": "update", "model": model})
        update = update[:len(update) - 1] + b',"newData":'
        start = self.starts[table] = (insert, delete, update)
        return start

    def __call__(self, change):
        if type(change) is not Change:
            return codec_dumps_line(delta_module.delta_of(change, self.model))
        operation = change_field(change, 0)
        table = change_field(change, 1)
        found = PyDict_GetItem(self.starts, table)
        start = <tuple>found if found is not NULL else self.start(table)
        out = self.out
        out.length = 0  # what a failed call left
        if operation is INSERT or operation is DELETE:
            row = change_field(change, 2) if operation is INSERT else change_field(change, 3)
            if type(row) is not dict:
                return codec_dumps_line(delta_module.delta_of(change, self.model))
            out.bytes_(start[0] if operation is INSERT else start[1])
            out.row(row, False)
        elif operation is UPDATE:
            new, old = change_field(change, 2), change_field(change, 3)
            if (new is not None and type(new) is not dict) or (old is not None
                                                                and type(old) is not dict):
                return codec_dumps_line(delta_module.delta_of(change, self.model))
            out.bytes_(start[2])
            out.value(new) if not has_unchanged(new) else out.row(new, True)
            out.raw(b',"oldData":', 11)
            out.value(old) if not has_unchanged(old) else out.row(old, True)
            if has_unchanged(new):
                out.raw(b',"unchanged":', 13)
                out.value(unchanged_names(new))
        else:
            return codec_dumps_line(delta_module.delta_of(change, self.model))
        out.raw(b"}\n", 2)
        return out.take()


@cython.final
cdef class ChangeEncoder:
    """`change_line`: the whole change (or another item a feed yields, such as a
    `SnapshotState`) as the JSON line of its ``to_dict()``."""

    cdef JsonWriter out

    def __cinit__(self):
        bind_formats()
        self.out = JsonWriter()

    def __call__(self, change):
        if type(change) is not Change:
            return codec_dumps_line(change.to_dict())
        operation = change_field(change, 0)
        # (by identity: an operation's hash is a Python call)
        found = <PyObject*>(OPERATION_INSERT if operation is INSERT else (
            OPERATION_UPDATE if operation is UPDATE else (
                OPERATION_DELETE if operation is DELETE else None)))
        if <object>found is None:
            found = NULL
        new, old = change.new, change.old
        if found is NULL or not (new is None or type(new) is dict) \
                or not (old is None or type(old) is dict):
            return codec_dumps_line(change.to_dict())
        out = self.out
        out.length = 0  # what a failed call left
        out.bytes_(<bytes>found)
        out.value(change.table)
        out.raw(b',"key":', 7)
        out.value(change.key)
        out.raw(b',"new":', 7)
        out.value(new) if not has_unchanged(new) else out.row(new, True)
        out.raw(b',"old":', 7)
        out.value(old) if not has_unchanged(old) else out.row(old, True)
        out.raw(b',"position":', 12)
        out.value(change.position)
        out.raw(b',"committed_at":', 16)
        out.value(change.committed_at)
        out.raw(b',"transaction":', 15)
        out.value(change.transaction)
        out.raw(b',"snapshot":', 12)
        out.value(change.snapshot)
        unchanged = unchanged_names(new)
        if unchanged:
            out.raw(b',"unchanged":', 13)
            out.value(unchanged)
        if change.meta:
            out.raw(b',"meta":', 8)
            out.value(change.meta)
        if change.schema_version is not None:
            out.raw(b',"schema_version":', 18)
            out.value(change.schema_version)
        out.raw(b"}\n", 2)
        return out.take()


@cython.final
cdef class DebeziumEncoder:
    """`DebeziumEncoder(source).line`: Debezium's envelope as one JSON line, counting
    ``transaction.data_collection_order`` per table as that class does."""

    cdef object source, transaction
    cdef dict per_table, tables
    cdef bytes version_and_connector, name_and_ts, database
    cdef object last_committed_at, last_committed_ms
    cdef JsonWriter out

    def __cinit__(self, source=None):
        bind_formats()
        self.source = source if source is not None else debezium_module.Source()
        self.transaction = None
        self.per_table = {}
        self.tables = {}
        dumps = codec_dumps
        self.version_and_connector = (
            b',"source":{"version":' + dumps(debezium_module._version())
            + b',"connector":"postgresql","name":' + dumps(self.source.name) + b',"ts_ms":'
        )
        self.database = b',"db":' + dumps(self.source.database) + b',"sequence":'
        self.last_committed_at = self.last_committed_ms = None
        self.out = JsonWriter()

    def __call__(self, change):
        order = None
        if change.transaction is not None and not change.snapshot:
            if change.transaction != self.transaction:
                self.transaction = change.transaction
                self.per_table = {}
            order = self.per_table[change.table] = self.per_table.get(change.table, 0) + 1
        connector = self.source.connector or debezium_module.connector_of(change)
        if connector != "postgresql" or type(change) is not Change or not (
                change.operation is INSERT or change.operation is UPDATE
                or change.operation is DELETE) or not (
                change.new is None or type(change.new) is dict) or not (
                change.old is None or type(change.old) is dict):
            return codec_dumps_line(debezium_module.envelope(
                change, self.source, data_collection_order=order))
        return self.relational(change, order)

    cdef object relational(self, object change, object order):
        table_parts = PyDict_GetItem(self.tables, change.table)
        if table_parts is NULL:
            schema, _, name = change.table.rpartition(".")
            parts = self.tables[change.table] = (
                b',"schema":' + codec_dumps(schema or "public") + b',"table":'
                + codec_dumps(name) + b',"txId":')
            table_parts = <PyObject*>parts
        lsn, index = debezium_module._lsn_and_index(change.position)
        committed_at = change.committed_at
        if committed_at is not self.last_committed_at:
            self.last_committed_at = committed_at
            self.last_committed_ms = debezium_module._ms(committed_at)
        before = change.old
        if change.operation is UPDATE and before is not None and debezium_module._only_key(change):
            before = None
        out = self.out
        out.length = 0  # what a failed call left
        out.raw(b'{"before":', 10)
        self.debezium_row(before)
        out.raw(b',"after":', 9)
        self.debezium_row(change.new)
        out.bytes_(self.version_and_connector)
        out.value(self.last_committed_ms)
        out.raw(b',"snapshot":', 12)
        out.value(debezium_module._snapshot(change))
        out.bytes_(self.database)
        out.value(f'[null,"{lsn}"]' if lsn else None)
        out.bytes_(<bytes>table_parts)
        out.value(change.transaction)
        out.raw(b',"lsn":', 7)
        out.value(lsn)
        out.raw(b',"xmin":null},"transaction":', 28)
        if change.transaction is not None and lsn is not None and not change.snapshot:
            out.raw(b'{"id":', 6)
            out.value(f"{change.transaction}:{lsn}")
            out.raw(b',"total_order":', 15)
            out.value(index + 1)
            out.raw(b',"data_collection_order":', 25)
            out.value(order or index + 1)
            out.char_(b"}")
        else:
            out.raw(b"null", 4)
        out.raw(b',"op":"', 7)
        out.raw(b"r" if change.snapshot else (b"c" if change.operation is INSERT else (
            b"u" if change.operation is UPDATE else b"d")), 1)
        out.raw(b'","ts_ms":', 10)
        out.value(time_module.time_ns() // 1_000_000)
        out.raw(b"}\n", 2)
        return out.take()

    cdef int debezium_row(self, object row) except -1:
        if row is None or not has_unchanged(row):
            return self.out.value(row)
        return self.out.value({name: debezium_module.UNAVAILABLE if value is UNCHANGED
                               else value for name, value in row.items()})
