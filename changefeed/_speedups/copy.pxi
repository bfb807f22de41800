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
    cdef object key_decode, pgconn_error
    cdef char* scratch  # a value's unescaped text
    cdef Py_ssize_t scratch_size
    cdef char* last_key  # the last row's raw ``__changefeed_key``, unescaped
    cdef Py_ssize_t last_key_size, last_key_capacity
    cdef bint any_row, last_key_null
    cdef GetCopyData libpq_get_copy_data
    cdef FreeMem libpq_freemem

    def __cinit__(self, shape, loaders):
        bind_python()
        from changefeed._speedups import libpq_functions
        from changefeed.backends.postgres.loading import _row_reader
        import psycopg

        self.plan = RelationPlan(shape, loaders)
        self.key_decode = _row_reader(["key"], [shape.key_type], loaders)
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
        """As `copy.RowParser.read`: (rows, the last raw key, the bytes read, whether the COPY
        ended)."""
        cdef list rows = []
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
                return rows, self.key_bytes(), nbytes, False
            if conn is not NULL:
                buffer = NULL
                with nogil:
                    size = self.libpq_get_copy_data(conn, &buffer, 0)
                if size < 0:
                    if size == -2:
                        raise self.pgconn_error(
                            f"receiving copy data failed: {pgconn.get_error_message()}")
                    return rows, self.key_bytes(), nbytes, True
                try:
                    rows.append(self.parse_row(buffer, size))
                finally:
                    self.libpq_freemem(buffer)
            else:
                size, data = pgconn.get_copy_data(0)
                if size < 0:
                    if size == -2:
                        raise self.pgconn_error(
                            f"receiving copy data failed: {pgconn.get_error_message()}")
                    return rows, self.key_bytes(), nbytes, True
                data = bytes(data)
                rows.append(self.parse_row(PyBytes_AS_STRING(data), size))
            nbytes += size
            count += 1

    def rows(self, lines):
        """The rows of COPY lines and the last one's raw key (as `copy.RowParser.rows`)."""
        cdef list rows = []
        self.any_row = False
        for line in lines:
            line = bytes(line)
            rows.append(self.parse_row(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line)))
        return rows, self.key_bytes()

    cdef object key_bytes(self):
        if not self.any_row or self.last_key_null:
            return None
        return PyBytes_FromStringAndSize(self.last_key, self.last_key_size)

    def key(self, raw):
        """The loaded ``__changefeed_key`` (as `copy.RowParser.key`)."""
        return None if raw is None else self.key_decode([raw])["key"]

    cdef dict parse_row(self, const char* p, Py_ssize_t n):
        """One COPY text row: its key kept raw (`last_key`), the row's values loaded."""
        cdef RelationPlan plan = self.plan
        cdef Py_ssize_t i, length, count = plan.count
        cdef const char* end
        cdef const char* text
        cdef const char* field_end
        cdef char* grown
        if n and p[n - 1] == b"\n":
            n -= 1
        end = p + n
        cdef const char* line = p
        # The key: its text, unescaped
        field_end = <const char*>memchr(p, b"\t", n)
        if field_end is NULL:
            field_end = end
        length = field_end - p
        if length > self.last_key_capacity or self.last_key is NULL:
            grown = <char*>PyMem_Realloc(self.last_key, max(length, 64))
            if grown is NULL:
                raise MemoryError()
            self.last_key, self.last_key_capacity = grown, max(length, 64)
        self.last_key_null = length == 2 and p[0] == b"\\" and p[1] == b"N"
        if memchr(p, b"\\", length) is NULL:
            memcpy(self.last_key, p, length)
            self.last_key_size = length
        else:
            self.last_key_size = copy_unescape(p, length, self.last_key)
        self.any_row = True
        row = {}
        columns = plan.columns
        for i in range(count):
            if field_end == end:
                raise copy_width_error(plan, line, n)
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
            raise copy_width_error(plan, line, n)
        return row


cdef object copy_width_error(RelationPlan plan, const char* line, Py_ssize_t n):
    found = PyBytes_FromStringAndSize(line, n).count(b"\t") + 1
    return DecodeError(f"{plan.table}: a COPY row of {found} columns, not {plan.count + 1}")
