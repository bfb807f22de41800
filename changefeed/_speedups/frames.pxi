# The replication stream's frames read in C (`ReplicationStream.frames` where the extension is
# built), and the batches of output lines the direct path hands out (`Lines`).


ctypedef int (*GetCopyData)(void* conn, char** buffer, int async_) noexcept nogil
ctypedef void (*FreeMem)(void* pointer) noexcept nogil

cdef object operational_error = None  # psycopg.OperationalError, bound on first use

cdef enum:
    FRAME_END = -1  # the stream ended
    FRAME_NONE = 0  # nothing more at hand
    FRAME_XLOGDATA = 1  # ``payload`` holds the next pgoutput message
    XLOGDATA_KIND = 119  # b"w"
    KEEPALIVE_KIND = 107  # b"k"
    XLOGDATA_HEADER = 25
    KEEPALIVE_SIZE = 18  # kind, WAL end, send time, reply requested


@cython.final
cdef class FrameReader:
    """`ReplicationStream.frames`, compiled: the pgoutput payloads of the XLogData messages in
    stream order (bytes), None whenever nothing more is at hand, and the end with the stream's;
    what `read_ahead` kept in the backlog first; keepalives read here and answered by the
    stream's `keepalive_at`. The direct path's `Decoder` also takes the row changes that
    follow one another straight from here (`next_row`), without a Python call or a copy per
    message.

    ``libpq``: the addresses of ``PQgetCopyData`` and ``PQfreemem`` in the libpq psycopg uses
    (`changefeed._speedups.libpq_functions`): messages are then read with libpq itself, not
    through psycopg's ``get_copy_data`` (its tuple, buffer object and memoryview cost far more
    than decoding a row); without them, through psycopg."""

    cdef object stream, pgconn, backlog, get_copy_data, keepalive
    # The last message read through Python, as bytes. Not a Py_buffer held on psycopg's
    # memoryview: Cython traverses a buffer's owner, so when the reader sat in a reference
    # cycle the collector cleared that memoryview while it was still exported (a crash).
    cdef bytes message
    cdef bint put_back, ended
    cdef GetCopyData libpq_get_copy_data
    cdef FreeMem libpq_freemem
    cdef void* conn  # the PGconn, while psycopg's connection holds it
    cdef object conn_address
    cdef char* owned  # the last message read with libpq (freed at the next read)
    cdef uint64_t frame_wal_end, frame_sent_at
    cdef readonly uint64_t wal_end
    """The WAL end in the header of the last XLogData message handed out (0: none yet)."""
    cdef readonly uint64_t sent_at
    """The send time in the header of the last XLogData message handed out: microseconds
    since 2000-01-01 on the server's clock (0: none yet)."""
    cdef const unsigned char* payload
    cdef Py_ssize_t payload_size

    def __cinit__(self, stream, libpq=None):
        global operational_error
        self.stream = stream
        self.pgconn = stream.pgconn
        self.backlog = stream.backlog
        self.get_copy_data = self.pgconn.get_copy_data
        self.keepalive = stream.keepalive_at
        self.conn_address = getattr(self.pgconn, "pgconn_ptr", None)
        if libpq is not None and self.conn_address:
            self.libpq_get_copy_data = <GetCopyData><size_t>libpq[0]
            self.libpq_freemem = <FreeMem><size_t>libpq[1]
            self.conn = <void*><size_t>self.conn_address
            if operational_error is None:
                import psycopg

                operational_error = psycopg.OperationalError

    def __dealloc__(self):
        if self.owned is not NULL:
            self.libpq_freemem(self.owned)

    @property
    def reads_libpq(self):
        """Whether messages are read with libpq itself (see the class)."""
        return self.conn is not NULL

    def __iter__(self):
        return self

    def __next__(self):
        # The connection may have been closed since the last call (`read_ahead` lets go of a
        # stream too far behind): then psycopg's own call says so.
        if self.conn is not NULL and self.pgconn.pgconn_ptr != self.conn_address:
            self.conn = NULL
        cdef int status = self.read()
        if status == FRAME_XLOGDATA:
            self.wal_end = self.frame_wal_end
            self.sent_at = self.frame_sent_at
            return PyBytes_FromStringAndSize(<const char*>self.payload, self.payload_size)
        if status == FRAME_NONE:
            return None
        raise StopIteration

    cdef int read(self) except -2:
        """Make the next XLogData message current (FRAME_XLOGDATA, ``payload``); FRAME_NONE
        when nothing more is at hand, FRAME_END once the stream ended."""
        cdef Py_ssize_t nbytes, length
        cdef const unsigned char* p
        cdef char* buffer
        if self.put_back:
            self.put_back = False
            return FRAME_XLOGDATA
        if self.ended:
            return FRAME_END
        while True:
            self.message = None
            if self.owned is not NULL:
                self.libpq_freemem(self.owned)
                self.owned = NULL
            message = None
            if self.backlog:  # read ahead while the consumer was busy: those come first
                nbytes, message = self.backlog.popleft()
                if nbytes > 0 and message[0] == XLOGDATA_KIND:
                    self.stream.backlog_bytes -= nbytes
            elif self.conn is not NULL:
                buffer = NULL
                nbytes = self.libpq_get_copy_data(self.conn, &buffer, 1)
                if nbytes == -2:  # as psycopg says it
                    raise operational_error(
                        f"receiving copy data failed: {self.pgconn.get_error_message()}")
                self.owned = buffer
            else:
                nbytes, message = self.get_copy_data(1)
            if nbytes == 0:
                return FRAME_NONE
            if nbytes < 0:
                self.stream._end = nbytes
                self.ended = True
                return FRAME_END
            if message is None:
                p, length = <const unsigned char*>self.owned, nbytes
            else:
                # A copy (this path is the fallback: the backlog, or no libpq at hand).
                self.message = message if type(message) is bytes else bytes(message)
                p = <const unsigned char*>PyBytes_AS_STRING(self.message)
                length = PyBytes_GET_SIZE(self.message)
            if length < 1:
                continue
            if p[0] == XLOGDATA_KIND:
                if length >= XLOGDATA_HEADER:
                    self.frame_wal_end = read_u64(p + 9)
                    self.frame_sent_at = read_u64(p + 17)
                    self.payload = p + XLOGDATA_HEADER
                    self.payload_size = length - XLOGDATA_HEADER
                else:
                    self.payload, self.payload_size = p, 0
                return FRAME_XLOGDATA
            if p[0] == KEEPALIVE_KIND:
                if length >= KEEPALIVE_SIZE:  # no bytes object, no struct: one nearly every
                    # live transaction (see `keepalive_at`)
                    self.keepalive(read_u64(p + 1), p[17] != 0, False)
                else:  # cut short: the stream's own parser says how
                    if message is None:
                        message = PyBytes_FromStringAndSize(<const char*>p, length)
                    self.stream._keepalive(message, busy=False)

    cdef bint next_row(self) except -1:
        """Take the next message if it is at hand and a row change (insert, update, delete):
        True, ``payload`` holding it. Anything else stays for the next read."""
        cdef int status = self.read()
        if status != FRAME_XLOGDATA:
            return False
        if self.payload_size > 0 and (self.payload[0] == b"I" or self.payload[0] == b"U"
                                      or self.payload[0] == b"D"):
            self.wal_end = self.frame_wal_end
            self.sent_at = self.frame_sent_at
            return True
        self.put_back = True
        return False


cdef struct LineEnd:
    Py_ssize_t end  # where the line ends in the text
    uint64_t index  # its change's index in the transaction


@cython.final
@cython.no_gc
cdef class Lines:
    """Row changes of one transaction as ready output lines, in one buffer: what the direct path
    hands out instead of `Change` objects (``changefeed run`` without stages). Writable as
    bytes (the buffer protocol); ``count`` lines, ``position`` that of the last,
    ``committed_at`` the transaction's commit time."""

    cdef char* data
    cdef Py_ssize_t length
    cdef LineEnd* ends
    cdef Py_ssize_t capacity
    cdef readonly Py_ssize_t count
    """How many lines (changes) it holds."""
    cdef uint64_t lsn, seen_index
    cdef bint any_seen
    cdef readonly object committed_at
    """The commit time of the changes' transaction."""
    cdef object position_made

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.ends)

    cdef int add(self, Py_ssize_t end, uint64_t index) except -1:
        cdef LineEnd* grown
        if self.count == self.capacity:
            self.capacity = self.capacity * 2 if self.capacity else 64
            grown = <LineEnd*>PyMem_Realloc(self.ends, self.capacity * sizeof(LineEnd))
            if grown is NULL:
                raise MemoryError()
            self.ends = grown
        self.ends[self.count].end = end
        self.ends[self.count].index = index
        self.count += 1
        return 0

    @property
    def position(self):
        """The position of the last change (None when it holds none)."""
        if self.count == 0:
            return None
        if self.position_made is None:
            self.position_made = make_position(self.lsn, self.ends[self.count - 1].index)
        return self.position_made

    @property
    def seen(self):
        """The position of the last change the decoder took into it or dropped as delivered
        before (None if none): the stream loop's last change handed out. Mostly the last
        line's: then the same object as `position` (one `PgPosition` per live transaction)."""
        if not self.any_seen:
            return None
        if self.count and self.ends[self.count - 1].index == self.seen_index:
            return self.position
        return make_position(self.lsn, self.seen_index)

    @property
    def nbytes(self):
        return self.length

    def head(self, Py_ssize_t count):
        """The first ``count`` lines."""
        if count < 0 or count > self.count:
            raise ValueError(f"{count} of {self.count} lines")
        cdef Lines head = new_lines(self.lsn, self.committed_at)
        cdef Py_ssize_t length = self.ends[count - 1].end if count else 0
        head.data = <char*>PyMem_Malloc(max(length, 1))
        if head.data is NULL:
            raise MemoryError()
        memcpy(head.data, self.data, length)
        head.length = length
        for i in range(count):
            head.add(self.ends[i].end, self.ends[i].index)
        if count:
            head.any_seen, head.seen_index = True, self.ends[count - 1].index
        return head

    def lines(self):
        """Each line as bytes (for tests)."""
        cdef Py_ssize_t i, start = 0
        result = []
        for i in range(self.count):
            result.append(PyBytes_FromStringAndSize(self.data + start, self.ends[i].end - start))
            start = self.ends[i].end
        return result

    def positions(self):
        """Each line's position (for tests)."""
        return [make_position(self.lsn, self.ends[i].index) for i in range(self.count)]

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        buffer.buf = self.data
        buffer.obj = self
        buffer.len = self.length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = NULL
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer* buffer):
        pass

    def __repr__(self):
        return f"<Lines: {self.count} up to {self.position!r}>"


cdef Lines new_lines(uint64_t lsn, object committed_at):
    cdef Lines lines = Lines.__new__(Lines)
    lines.lsn = lsn
    lines.committed_at = committed_at
    return lines
