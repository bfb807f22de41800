# TupleData, decoded by a plan made per Relation message (what `tuples.row_decoder` generates
# in Python): the values' places first, then each value loaded by its column's kernel loader or,
# for the other types and the values a kernel loader declines, by the Python loaders.

@cython.final
cdef class RelationPlan:
    """How to decode the rows of one table, from the Python decoder's `Relation`."""

    cdef readonly object relation
    cdef readonly bint watched
    cdef object table, schema_version, loaders
    cdef tuple columns
    cdef Py_ssize_t count, key_count
    cdef int* kinds
    cdef uint32_t* oids
    cdef Py_ssize_t* key_indexes
    cdef Py_ssize_t* starts  # per column, for the row being decoded: offset, or NULL/UNCHANGED
    cdef Py_ssize_t* lengths
    cdef list python_loaders  # per column: (fast load, tolerant load), made when first needed
    cdef list name_prefixes  # per column: its name in JSON and a colon
    cdef tuple delta_start  # the table's delta lines up to their row (`DeltaEncoder.start`)
    cdef tuple change_start  # the table's change lines up to the key, per operation (I, U, D)
    cdef bytes change_end  # and from after the snapshot flag
    cdef object matcher  # the direct path's row filter for this table (`RowMatcher`), if any
    # The results of `parse_tuple` and `decode_row`:
    cdef bint any_unchanged
    cdef dict row, key
    cdef list unchanged

    def __cinit__(self, relation, loaders):
        self.relation = relation
        self.watched = relation.watched
        self.table = relation.qualified_name
        self.schema_version = relation.schema_version
        self.loaders = loaders
        self.columns = tuple(relation.columns)
        self.count = len(self.columns)
        self.key_count = len(relation.key_indexes)
        size = max(self.count, 1)
        self.kinds = <int*>malloc(size * sizeof(int))
        self.oids = <uint32_t*>malloc(size * sizeof(uint32_t))
        self.starts = <Py_ssize_t*>malloc(size * sizeof(Py_ssize_t))
        self.lengths = <Py_ssize_t*>malloc(size * sizeof(Py_ssize_t))
        self.key_indexes = <Py_ssize_t*>malloc(max(self.key_count, 1) * sizeof(Py_ssize_t))
        if not (self.kinds and self.oids and self.starts and self.lengths and self.key_indexes):
            raise MemoryError()
        for i, oid in enumerate(relation.type_oids):
            self.oids[i] = oid
            self.kinds[i] = kind_of(loaders, oid)
        for i, index in enumerate(relation.key_indexes):
            self.key_indexes[i] = index
        self.python_loaders = [None] * self.count

    def __dealloc__(self):
        free(self.kinds)
        free(self.oids)
        free(self.starts)
        free(self.lengths)
        free(self.key_indexes)

    cdef Py_ssize_t parse_tuple(self, const unsigned char* data, Py_ssize_t size,
                                Py_ssize_t offset) except -1:
        """Find the values of the TupleData at ``offset`` (``starts``, ``lengths``, and
        ``any_unchanged``); returns the offset after it."""
        cdef Py_ssize_t i, start, length, count = self.count
        cdef int16_t found
        cdef unsigned char kind
        self.any_unchanged = False
        if offset + 2 > size:
            raise DecodeError(f"{self.table}: tuple cut short")
        found = <int16_t>read_u16(data + offset)
        if found != count:
            raise DecodeError(f"{self.table}: tuple has {found} columns, relation {count}")
        offset += 2
        for i in range(count):
            if offset >= size:
                raise DecodeError(f"{self.table}: tuple cut short")
            kind = data[offset]
            if kind == b"t":
                if offset + 5 > size:
                    raise DecodeError(f"{self.table}: tuple cut short")
                length = <int32_t>read_u32(data + offset + 1)
                start = offset + 5
                if length < 0 or start + length > size:
                    raise DecodeError(f"{self.table}: tuple cut short")
                self.starts[i] = start
                self.lengths[i] = length
                offset = start + length
            elif kind == b"n":
                self.starts[i] = -1
                offset += 1
            elif kind == b"u":
                self.starts[i] = -2
                self.any_unchanged = True
                offset += 1
            else:
                raise DecodeError(f"unknown tuple value kind {chr(kind)!r}")
        return offset

    cdef Py_ssize_t decode_row(self, const unsigned char* data, Py_ssize_t size,
                               Py_ssize_t offset) except -1:
        """Decode the TupleData at ``offset`` into ``row``, ``key`` and ``unchanged`` (the
        names of unchanged TOASTed columns, or None); returns the offset after it."""
        cdef Py_ssize_t i, start, count = self.count
        offset = self.parse_tuple(data, size, offset)
        row = {}
        columns = self.columns
        for i in range(count):
            start = self.starts[i]
            if start >= 0:
                value = DECLINE
                if self.kinds[i] != KIND_PYTHON:
                    value = load_value(self.kinds[i], <const char*>data + start, self.lengths[i])
                if value is DECLINE:
                    value = self.python_value(i, <const char*>data + start, self.lengths[i])
            elif start == -2:
                value = UNCHANGED
            else:
                value = None
            PyDict_SetItem(row, columns[i], value)
        key = {}
        for i in range(self.key_count):
            name = columns[self.key_indexes[i]]
            PyDict_SetItem(key, name, <object>PyDict_GetItem(row, name))
        self.row = row
        self.key = key
        self.unchanged = None
        if self.any_unchanged:
            self.unchanged = [columns[i] for i in range(count) if self.starts[i] == -2]
        return offset

    # -- writing JSON straight from the text (the direct path, see `Decoder.encode`) ----------

    cdef int write_row(self, JsonWriter out, const unsigned char* data, bint key_only) except -1:
        """The row (or its key columns) of the tuple last parsed, as `JsonWriter.row` writes
        the dict `decode_row` would make. No UNCHANGED values (the caller checks)."""
        cdef Py_ssize_t j, i, n = self.key_count if key_only else self.count
        if self.name_prefixes is None:
            self.name_prefixes = [python_dumps(name) + b":" for name in self.columns]
        out.char_(b"{")
        for j in range(n):
            i = self.key_indexes[j] if key_only else j
            if j:
                out.char_(b",")
            out.bytes_(<bytes>self.name_prefixes[i])
            self.write_value(out, i, data)
        return out.char_(b"}")

    cdef inline tuple change_starts(self):
        """``{"operation":"insert","table":"public.t","key":`` and the same for updates and
        deletes; and `change_end`, the end of the line: the schema version if any."""
        if self.change_start is None:
            self.make_change_parts()
        return self.change_start

    cdef int make_change_parts(self) except -1:
        table = python_dumps(self.table)
        self.change_start = (b'{"operation":"insert","table":' + table + b',"key":',
                             b'{"operation":"update","table":' + table + b',"key":',
                             b'{"operation":"delete","table":' + table + b',"key":')
        self.change_end = (b',"schema_version":' + python_dumps(self.schema_version)
                           if self.schema_version is not None else b"") + b"}\n"
        return 0

    cdef int write_value(self, JsonWriter out, Py_ssize_t i, const unsigned char* data) except -1:
        cdef Py_ssize_t start = self.starts[i]
        if start < 0:
            return out.raw(b"null", 4)
        cdef const char* text = <const char*>data + start
        cdef Py_ssize_t n = self.lengths[i]
        if write_text_value(out, self.kinds[i], text, n) == 0:
            return 0
        value = DECLINE
        if self.kinds[i] != KIND_PYTHON:
            value = load_value(self.kinds[i], text, n)
        if value is DECLINE:
            value = self.python_value(i, text, n)
        return out.value(value)

    cdef object python_value(self, Py_ssize_t i, const char* text, Py_ssize_t length):
        """The value as the Python decoder loads it: psycopg's loader (ours for some types);
        if that fails, the tolerant one; if that fails too, the text (see `loading`)."""
        raw = PyBytes_FromStringAndSize(text, length)
        oid = self.oids[i]
        loaders = self.python_loaders[i]
        if loaders is None:
            fast = Transformer(self.loaders.fast).get_loader(C_FLOAT.get(oid, oid), TEXT_FORMAT)
            tolerant = Transformer(self.loaders.tolerant).get_loader(oid, TEXT_FORMAT)
            loaders = self.python_loaders[i] = (fast.load, tolerant.load)
        # A float column's NaN or Infinity (text ending in a letter) skips psycopg's loader,
        # which would make it a plain float (see `loading`).
        if not (oid in C_FLOAT and length and <unsigned char>text[length - 1] > 57):
            try:
                return loaders[0](raw)
            except Exception:
                pass
        try:
            return loaders[1](raw)
        except Exception:
            return PostgresText(raw.decode(errors="replace"), self.loaders.type_name(oid))
