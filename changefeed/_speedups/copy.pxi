# Back-fill chunks read through COPY (`changefeed.backends.postgres.copy`): the text rows taken
# from libpq one by one, split and unescaped here, each value loaded by its column's kernel
# loader or, for the other types and the values a kernel loader declines, by the Python loaders
# (a `RelationPlan` made from the chunk's columns, as from a pgoutput Relation message).

from libc.string cimport memchr


cdef Py_ssize_t copy_unescape(const char* p, Py_ssize_t n, char* out) noexcept nogil:
    """COPY's text escapes undone (as `copy.copy_fields` does): ``out`` holds at least ``n``
    bytes; returns the length written."""
    cdef Py_ssize_t i = 0, length = 0, digits
    cdef int value, d
    cdef char c
    while i < n:
        c = p[i]
        if c != b"\\" or i + 1 == n:
            out[length] = c
            length += 1
            i += 1
            continue
        c = p[i + 1]
        i += 2
        if b"0" <= c <= b"7":
            value = c - 48
            digits = 1
            while digits < 3 and i < n and b"0" <= p[i] <= b"7":
                value = value * 8 + (p[i] - 48)
                i += 1
                digits += 1
            c = <char>(value & 0xFF)
        elif c == b"x" and i < n and hex_value(p[i]) >= 0:
            value = hex_value(p[i])
            i += 1
            if i < n:
                d = hex_value(p[i])
                if d >= 0:
                    value = value * 16 + d
                    i += 1
            c = <char>value
        elif c == b"b":
            c = b"\b"
        elif c == b"f":
            c = b"\f"
        elif c == b"n":
            c = b"\n"
        elif c == b"r":
            c = b"\r"
        elif c == b"t":
            c = b"\t"
        elif c == b"v":
            c = b"\v"
        out[length] = c
        length += 1
    return length


@cython.final
cdef class CopyParser:
    """`copy.RowParser`, compiled: reads a chunk's COPY rows from libpq (``PQgetCopyData``,
    found as the frame reader finds it; else through psycopg) and loads them into the row
    dicts the Python code makes, value for value."""

    cdef RelationPlan plan
    cdef object pgconn_error
    cdef readonly object key
    """The key (as text) of a row's line: `copy.KeyReader`."""
    cdef char* scratch  # a value's unescaped text
    cdef Py_ssize_t scratch_size
    cdef Py_ssize_t leading  # the fields of key text before the columns
    cdef char* last_key  # the last row's line, as received (without its newline)
    cdef Py_ssize_t last_key_size, last_key_capacity
    cdef bint any_row
    cdef GetCopyData libpq_get_copy_data
    cdef FreeMem libpq_freemem

    def __cinit__(self, shape, loaders):
        bind_python()
        from changefeed._speedups import libpq_functions
        from changefeed.backends.postgres.copy import KeyReader
        import psycopg

        self.plan = RelationPlan(shape, loaders)
        self.key = KeyReader(shape, loaders)
        self.leading = shape.leading
        self.pgconn_error = psycopg.OperationalError
        libpq = libpq_functions()
        if libpq is not None:
            self.libpq_get_copy_data = <GetCopyData><size_t>libpq[0]
            self.libpq_freemem = <FreeMem><size_t>libpq[1]

    def __dealloc__(self):
        PyMem_Free(self.scratch)
        PyMem_Free(self.last_key)

    cdef char* room(self, Py_ssize_t size) except NULL:
        cdef char* grown
        if size > self.scratch_size or self.scratch is NULL:
            grown = <char*>PyMem_Realloc(self.scratch, max(size, 256))
            if grown is NULL:
                raise MemoryError()
            self.scratch, self.scratch_size = grown, max(size, 256)
        return self.scratch

    def read(self, pgconn, Py_ssize_t limit, Py_ssize_t max_bytes):
        """As `copy.RowParser.read`: (rows, the last line, the bytes read, whether the COPY
        ended)."""
        rows = []
        nbytes, finished = self.read_rows(pgconn, limit, max_bytes, rows, None)
        return rows, self.key_bytes(), nbytes, finished

    def read_lines(self, pgconn, Py_ssize_t limit, Py_ssize_t max_bytes, bint keys_json=True):
        """The direct path's `read`: the rows as JSON (`CopiedLines`), not dicts; their keys'
        JSON only if ``keys_json`` (the change format's lines need it, the delta format's do
        not; without key, a row's key is the whole row): (lines, the last line, the bytes
        read, whether the COPY ended)."""
        cdef CopiedLines lines = CopiedLines.__new__(CopiedLines, self.plan, keys_json)
        nbytes, finished = self.read_rows(pgconn, limit, max_bytes, None, lines)
        return lines, self.key_bytes(), nbytes, finished

    cdef tuple read_rows(self, pgconn, Py_ssize_t limit, Py_ssize_t max_bytes, list rows,
                         CopiedLines lines):
        cdef Py_ssize_t nbytes = 0, count = 0
        cdef int size
        cdef char* buffer
        cdef void* conn = NULL
        address = getattr(pgconn, "pgconn_ptr", None)
        if self.libpq_get_copy_data is not NULL and address:
            conn = <void*><size_t>address
        self.any_row = False
        while True:
            if nbytes >= max_bytes and count < limit:
                return nbytes, False
            if conn is not NULL:
                # A row libpq holds already comes without giving up the GIL; only a read
                # from the socket (which may block) is made without it.
                buffer = NULL
                size = self.libpq_get_copy_data(conn, &buffer, 1)
                if size == 0:
                    with nogil:
                        size = self.libpq_get_copy_data(conn, &buffer, 0)
                if size < 0:
                    if size == -2:
                        raise self.pgconn_error(
                            f"receiving copy data failed: {pgconn.get_error_message()}")
                    return nbytes, True
                try:
                    if lines is None:
                        rows.append(self.parse_row(buffer, size))
                    else:
                        self.parse_line(buffer, size, lines)
                finally:
                    self.libpq_freemem(buffer)
            else:
                size, data = pgconn.get_copy_data(1)
                if size == 0:  # wait in select(), without the GIL (see `copy._wait`)
                    wait_readable(pgconn)
                    continue
                if size < 0:
                    if size == -2:
                        raise self.pgconn_error(
                            f"receiving copy data failed: {pgconn.get_error_message()}")
                    return nbytes, True
                data = bytes(data)
                if lines is None:
                    rows.append(self.parse_row(PyBytes_AS_STRING(data), size))
                else:
                    self.parse_line(PyBytes_AS_STRING(data), size, lines)
            nbytes += size
            count += 1

    def rows(self, lines):
        """The rows of COPY lines and the last line (as `copy.RowParser.rows`)."""
        cdef list rows = []
        self.any_row = False
        for line in lines:
            line = bytes(line)
            rows.append(self.parse_row(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line)))
        return rows, self.key_bytes()

    cdef object key_bytes(self):
        if not self.any_row:
            return None
        return PyBytes_FromStringAndSize(self.last_key, self.last_key_size)

    def lines_of(self, lines, bint keys_json=True):
        """`read_lines` of COPY lines at hand (for tests): (lines, the last line)."""
        cdef CopiedLines copied = CopiedLines.__new__(CopiedLines, self.plan, keys_json)
        self.any_row = False
        for line in lines:
            line = bytes(line)
            self.parse_line(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line), copied)
        return copied, self.key_bytes()

    cdef const char* take_key(self, const char* p, const char* end) except NULL:
        """Keep the row's line (`last_key`: its key's text, taken once the chunk is read);
        returns where its leading fields of key text end (just before its first column)."""
        cdef Py_ssize_t k, length = end - p
        cdef char* grown
        cdef const char* field_end = p - 1
        if length > self.last_key_capacity or self.last_key is NULL:
            grown = <char*>PyMem_Realloc(self.last_key, max(length, 64))
            if grown is NULL:
                raise MemoryError()
            self.last_key, self.last_key_capacity = grown, max(length, 64)
        memcpy(self.last_key, p, length)
        self.last_key_size = length
        self.any_row = True
        for k in range(self.leading):
            if field_end == end:
                break
            field_end = <const char*>memchr(field_end + 1, b"\t", end - field_end - 1)
            if field_end is NULL:
                field_end = end
        return field_end

    cdef dict parse_row(self, const char* p, Py_ssize_t n):
        """One COPY text row: its line kept (`last_key`), the row's values loaded."""
        cdef RelationPlan plan = self.plan
        cdef Py_ssize_t i, length, count = plan.count
        cdef const char* text
        if n and p[n - 1] == b"\n":
            n -= 1
        cdef const char* line = p
        cdef const char* end = p + n
        cdef const char* field_end = self.take_key(p, end)
        row = {}
        columns = plan.columns
        for i in range(count):
            if field_end == end:
                raise copy_width_error(plan, line, n, self.leading)
            p = field_end + 1
            field_end = <const char*>memchr(p, b"\t", end - p)
            if field_end is NULL:
                field_end = end
            length = field_end - p
            if length == 2 and p[0] == b"\\" and p[1] == b"N":
                value = None
            else:
                text = p
                if memchr(p, b"\\", length) is not NULL:
                    text = self.room(length)
                    length = copy_unescape(p, length, self.scratch)
                value = DECLINE
                if plan.kinds[i] != KIND_PYTHON:
                    value = load_value(plan.kinds[i], text, length)
                if value is DECLINE:
                    value = plan.python_value(i, text, length)
            PyDict_SetItem(row, columns[i], value)
        if field_end != end:
            raise copy_width_error(plan, line, n, self.leading)
        return row

    cdef int parse_line(self, const char* p, Py_ssize_t n, CopiedLines lines) except -1:
        """One COPY text row as JSON (as the encoders write the dict `parse_row` makes), and
        its key's text (its token is made only if a window needs it: `CopiedLines.tokens`)."""
        cdef RelationPlan plan = self.plan
        cdef Py_ssize_t i, length, used = 0, count = plan.count
        cdef char* text = self.room(n + 1)  # every value, unescaped, one after the other
        if n and p[n - 1] == b"\n":
            n -= 1
        cdef const char* line = p
        cdef const char* end = p + n
        cdef const char* field_end = self.take_key(p, end)
        for i in range(count):
            if field_end == end:
                raise copy_width_error(plan, line, n, self.leading)
            p = field_end + 1
            field_end = <const char*>memchr(p, b"\t", end - p)
            if field_end is NULL:
                field_end = end
            length = field_end - p
            if length == 2 and p[0] == b"\\" and p[1] == b"N":
                plan.starts[i] = -1
                continue
            plan.starts[i] = used
            if memchr(p, b"\\", length) is NULL:
                memcpy(text + used, p, length)
            else:
                length = copy_unescape(p, length, text + used)
            plan.lengths[i] = length
            used += length
        if field_end != end:
            raise copy_width_error(plan, line, n, self.leading)
        lines.add_row(plan, <const unsigned char*>text)
        return 0


cdef extern from "Python.h":
    object PyTuple_New(Py_ssize_t size)
    void PyTuple_SET_ITEM(object p, Py_ssize_t pos, object o)


cdef struct RowSpan:
    Py_ssize_t start  # the row's JSON in the buffer
    Py_ssize_t key  # its key's JSON (up to the next row's start; empty without keys' JSON)
    Py_ssize_t key_text  # its key values' text in `keys`


@cython.final
cdef class CopiedLines:
    """A chunk's rows as JSON, for the direct path (`CopyParser.read_lines`): each row (and
    its key, for the change format) as `JsonWriter.row` writes their dicts, and its key
    values' text; made into `Lines` batches of their delta or change lines once the chunk's
    window closes (`lines`). The key tokens are made only when asked (`tokens`): most windows
    see no change of the stream, and need none."""

    cdef JsonWriter out
    cdef JsonWriter keys  # per row and key column: its text's length (int32, -1: NULL), text
    cdef RowSpan* spans
    cdef Py_ssize_t count, capacity
    cdef RelationPlan plan
    cdef readonly bint keys_json
    """Whether the rows' keys were written as JSON (the change format's lines need them)."""
    cdef object key_token

    def __cinit__(self, RelationPlan plan, bint keys_json):
        self.out = JsonWriter()
        self.keys = JsonWriter()
        self.plan = plan
        self.keys_json = keys_json
        from changefeed.backends.postgres.chunks import key_token

        self.key_token = key_token

    def __dealloc__(self):
        PyMem_Free(self.spans)

    def __len__(self):
        return self.count

    cdef int add_row(self, RelationPlan plan, const unsigned char* text) except -1:
        cdef RowSpan* grown
        cdef Py_ssize_t k, i
        cdef int32_t length
        if self.count == self.capacity:
            self.capacity = self.capacity * 2 if self.capacity else 1024
            grown = <RowSpan*>PyMem_Realloc(self.spans, self.capacity * sizeof(RowSpan))
            if grown is NULL:
                raise MemoryError()
            self.spans = grown
        self.spans[self.count].start = self.out.length
        plan.write_row(self.out, text, False)
        self.spans[self.count].key = self.out.length
        if self.keys_json:
            plan.write_row(self.out, text, True)
        self.spans[self.count].key_text = self.keys.length
        for k in range(plan.key_count):
            i = plan.key_indexes[k]
            length = -1 if plan.starts[i] < 0 else <int32_t>plan.lengths[i]
            self.keys.raw(<const char*>&length, 4)
            if length > 0:
                self.keys.raw(<const char*>text + plan.starts[i], length)
        self.count += 1
        return 0

    def tokens(self, Py_ssize_t start, Py_ssize_t stop):
        """The key tokens of rows ``start`` to ``stop`` (`chunks.key_token` of their key
        values, loaded as `CopyParser.parse_row` loads them)."""
        cdef Py_ssize_t r
        return [self.token_of(r) for r in range(max(start, 0), min(stop, self.count))]

    def by_token(self):
        """The rows' indexes by key token: an index, a list where a token repeats (a key given
        by the user need not be unique); what `chunks.ChunkWindow` looks a change's key up in."""
        cdef dict found_by = {}
        cdef Py_ssize_t r
        cdef PyObject* found
        for r in range(self.count):
            token = self.token_of(r)
            found = PyDict_GetItem(found_by, token)
            if found is NULL:
                PyDict_SetItem(found_by, token, r)
            elif type(<object>found) is list:
                (<list>found).append(r)
            else:
                PyDict_SetItem(found_by, token, [<object>found, r])
        return found_by

    cdef object token_of(self, Py_ssize_t r):
        cdef RelationPlan plan = self.plan
        cdef Py_ssize_t k, i, at = self.spans[r].key_text
        cdef int32_t length
        cdef const char* text
        cdef bint plain = True
        token = PyTuple_New(plan.key_count)
        for k in range(plan.key_count):
            i = plan.key_indexes[k]
            memcpy(&length, self.keys.data + at, 4)
            at += 4
            value = None
            if length >= 0:
                text = self.keys.data + at
                at += length
                value = DECLINE
                if plan.kinds[i] != KIND_PYTHON:
                    value = load_value(plan.kinds[i], text, length)
                if value is DECLINE:
                    value = plan.python_value(i, text, length)
                cls = type(value)
                if not (cls is int or cls is str or cls is bytes or cls is bool):
                    plain = False
            Py_INCREF(value)
            PyTuple_SET_ITEM(token, k, value)
        return token if plain else self.key_token(token)

    def held_bytes(self):
        """The bytes its rows' JSON, key texts and spans hold (allocated)."""
        return (self.out.capacity + self.keys.capacity
                + self.capacity * <Py_ssize_t>sizeof(RowSpan))

    cdef inline Py_ssize_t end_of(self, Py_ssize_t i):
        return self.spans[i + 1].start if i + 1 < self.count else self.out.length

    def lines(self, indexes, fmt, model, table, schema_version, lsn, first_index):
        """The ``fmt`` lines (``"delta"``, with ``model``, or ``"change"``) of rows
        ``indexes`` (a range, or ints in order) as snapshot inserts into ``table``, at
        positions ``first_index`` on of the transaction at ``lsn``: what the format's encoder
        writes of the `Change` objects `chunks.window_changes` makes."""
        cdef JsonWriter out = JsonWriter()
        cdef Lines lines = new_lines(lsn, None)
        cdef Py_ssize_t i, first, last, step
        cdef uint64_t index = first_index
        cdef bint delta = fmt == "delta"
        cdef bytes start, end
        if delta:
            start = (<DeltaEncoder>DeltaEncoder(model)).start(table)[0]
            end = b"}\n"
        elif fmt == "change":
            if not self.keys_json:
                raise ValueError("change lines need the keys' JSON (read with keys_json)")
            start = b'{"operation":"insert","table":' + python_dumps(table) + b',"key":'
            end = (b',"schema_version":' + python_dumps(schema_version)
                   if schema_version is not None else b"") + b"}\n"
        else:
            raise ValueError(f"no direct path for {fmt!r} lines: use delta or change")
        if type(indexes) is range and (<object>indexes).step == 1:
            first, last = (<object>indexes).start, (<object>indexes).stop
            if first < last and (first < 0 or last > self.count):
                raise IndexError(indexes)
            if delta and first < last:  # its size at once: no growing copy after copy
                out.reserve(self.spans[last - 1].key - self.spans[first].start
                            + (last - first) * (len(start) + len(end)))
            for i in range(first, last):
                self.add_line(out, lines, i, delta, start, end, lsn, index)
                index += 1
        else:
            for item in indexes:
                i = item
                if i < 0 or i >= self.count:
                    raise IndexError(i)
                self.add_line(out, lines, i, delta, start, end, lsn, index)
                index += 1
        if lines.count:
            lines.any_seen, lines.seen_index = True, index - 1
        out.hand_over(lines)
        return lines

    cdef inline int add_line(self, JsonWriter out, Lines lines, Py_ssize_t i, bint delta,
                             bytes start, bytes end, lsn, uint64_t index) except -1:
        cdef RowSpan span = self.spans[i]
        out.bytes_(start)
        if delta:
            out.raw(self.out.data + span.start, span.key - span.start)
        else:
            out.raw(self.out.data + span.key, self.end_of(i) - span.key)
            out.raw(b',"new":', 7)
            out.raw(self.out.data + span.start, span.key - span.start)
            out.raw(b',"old":null,"position":', 23)
            out.position(lsn, index)
            out.raw(b',"committed_at":null,"transaction":null,"snapshot":true', 55)
        out.bytes_(end)
        return lines.add(out.length, index)


cdef object select_function = None


cdef int wait_readable(pgconn) except -1:
    global select_function
    if select_function is None:
        import select

        select_function = select.select
    select_function([pgconn.socket], [], [])
    pgconn.consume_input()
    return 0


def copy_unescaped(bytes text):
    """``text`` with COPY's escapes undone by the kernel (for tests: `copy.copy_fields` does
    the same in Python)."""
    cdef char* out = <char*>PyMem_Malloc(max(PyBytes_GET_SIZE(text), 1))
    if out is NULL:
        raise MemoryError()
    try:
        return PyBytes_FromStringAndSize(
            out, copy_unescape(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), out))
    finally:
        PyMem_Free(out)


def take_positions(next_position, Py_ssize_t count):
    """Take ``count`` positions (at least one) from ``next_position`` (a decoder's): the first
    and the last, the others between them (a chunk's rows, one after the other)."""
    first = last = next_position()
    cdef Py_ssize_t i
    cdef Decoder decoder
    owner = getattr(next_position, "__self__", None)
    if type(owner) is Decoder:  # the compiled decoder's: its index moves on at once
        decoder = <Decoder>owner
        if count > 1:
            decoder.index += <uint64_t>(count - 1)
            last = make_position(decoder.final_lsn, decoder.index - 1)
        return first, last
    for i in range(count - 1):
        last = next_position()
    return first, last


cdef object copy_width_error(RelationPlan plan, const char* line, Py_ssize_t n,
                             Py_ssize_t leading):
    found = PyBytes_FromStringAndSize(line, n).count(b"\t") + 1
    return DecodeError(f"{plan.table}: a COPY row of {found} columns, not {plan.count + leading}")
