# JSON written as `changefeed.formats.codec.dumps` writes it (orjson, with changefeed's
# `default` for database values), into one growing buffer: the common types (str, int, bool,
# None, dict, list, datetime in UTC, date, time, UUID, Decimal, bytes) here, byte for byte as
# orjson writes them; any other value (floats, subclasses, the PostgreSQL value types, ranges)
# by orjson itself, so it cannot differ.

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object text)
    void* PyUnicode_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1
    int PyDateTime_GET_YEAR(object o)
    int PyDateTime_GET_MONTH(object o)
    int PyDateTime_GET_DAY(object o)
    int PyDateTime_DATE_GET_HOUR(object o)
    int PyDateTime_DATE_GET_MINUTE(object o)
    int PyDateTime_DATE_GET_SECOND(object o)
    int PyDateTime_DATE_GET_MICROSECOND(object o)
    int PyDateTime_TIME_GET_HOUR(object o)
    int PyDateTime_TIME_GET_MINUTE(object o)
    int PyDateTime_TIME_GET_SECOND(object o)
    int PyDateTime_TIME_GET_MICROSECOND(object o)

cdef object orjson_dumps, orjson_error, json_default, JSON_OPTIONS, JSON_NON_STR_KEYS, codec_dumps_value
cdef object datetime_type, date_type, time_type
cdef const char* BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef const char* LOWER_HEX = b"0123456789abcdef"
cdef char HEX_PAIRS[512]  # "00" to "FF", upper case
for _byte in range(256):
    HEX_PAIRS[2 * _byte] = HEX_DIGITS[_byte >> 4]
    HEX_PAIRS[2 * _byte + 1] = HEX_DIGITS[_byte & 15]


cdef inline Py_ssize_t plain_prefix(const unsigned char* text, Py_ssize_t size) noexcept nogil:
    """How many bytes at ``text`` need no escaping in JSON (no quote, backslash or control
    character; bytes of UTF-8 sequences need none either): 8 at a time."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word, below_space, quote, backslash
    while i + 8 <= size:
        memcpy(&word, text + i, 8)
        below_space = (word - 0x2020202020202020ULL) & ~word
        quote = word ^ 0x2222222222222222ULL
        quote = (quote - 0x0101010101010101ULL) & ~quote
        backslash = word ^ 0x5C5C5C5C5C5C5C5CULL
        backslash = (backslash - 0x0101010101010101ULL) & ~backslash
        if (below_space | quote | backslash) & 0x8080808080808080ULL:
            break
        i += 8
    while i < size:
        if text[i] < 0x20 or text[i] == b'"' or text[i] == b"\\":
            break
        i += 1
    return i


cdef int bind_json() except -1:
    global orjson_dumps, orjson_error, json_default, JSON_OPTIONS, JSON_NON_STR_KEYS
    global codec_dumps_value
    global datetime_type, date_type, time_type
    if orjson_dumps is not None:
        return 0
    bind_core()
    import datetime

    import orjson

    from changefeed.formats import codec

    orjson_error = orjson.JSONEncodeError
    json_default = codec.json_default
    JSON_OPTIONS = codec.ORJSON_OPTIONS
    JSON_NON_STR_KEYS = codec._NON_STR_KEYS
    datetime_type, date_type, time_type = datetime.datetime, datetime.date, datetime.time
    codec_dumps_value = codec.dumps
    orjson_dumps = orjson.dumps
    return 0


cdef object python_dumps(object value):
    """`codec.dumps` itself: orjson with changefeed's default, and its careful path (keys
    other than strings, raw JSON texts, values nested past orjson's limit)."""
    return codec_dumps_value(value)


@cython.final
cdef class JsonWriter:
    """A growing buffer of JSON text."""

    cdef char* data
    cdef Py_ssize_t length, capacity
    # The keys of the last dict written and their JSON (with the colon): rows of one table
    # share their key objects, so a key is found by identity, without encoding it again.
    cdef list last_keys, last_prefixes

    def __cinit__(self):
        bind_json()
        self.last_keys = []
        self.last_prefixes = []
        self.capacity = 1024
        self.length = 0
        self.data = <char*>PyMem_Realloc(NULL, self.capacity)
        if self.data is NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef inline int reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t wanted = self.length + more
        if wanted <= self.capacity:
            return 0
        cdef Py_ssize_t capacity = self.capacity
        while capacity < wanted:
            capacity *= 2
        cdef char* data = <char*>PyMem_Realloc(self.data, capacity)
        if data is NULL:
            raise MemoryError()
        self.data, self.capacity = data, capacity
        return 0

    cdef inline int raw(self, const char* text, Py_ssize_t size) except -1:
        self.reserve(size)
        memcpy(self.data + self.length, text, size)
        self.length += size
        return 0

    cdef inline int bytes_(self, bytes text) except -1:
        return self.raw(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))

    cdef inline int char_(self, char c) except -1:
        self.reserve(1)
        self.data[self.length] = c
        self.length += 1
        return 0

    cdef object take(self):
        """The text written so far, as bytes; the buffer starts again empty."""
        result = PyBytes_FromStringAndSize(self.data, self.length)
        self.length = 0
        return result

    cdef int hand_over(self, Lines lines) except -1:
        """Give the text written so far to ``lines`` (no copy); start again with an empty
        buffer of the same size (the next batch is likely as long)."""
        cdef char* fresh = <char*>PyMem_Realloc(NULL, self.capacity)
        if fresh is NULL:
            raise MemoryError()
        lines.data, lines.length = self.data, self.length
        self.data, self.length = fresh, 0
        return 0

    cdef inline int hex8(self, uint64_t value) except -1:
        """``value`` as 8 upper-case hex digits (a position's index)."""
        if value > 0xFFFFFFFF:
            self.reserve(16)
            self.length += write_hex(self.data + self.length, value, 8)
            return 0
        self.reserve(8)
        cdef char* at = self.data + self.length
        cdef int i
        for i in range(6, -1, -2):
            memcpy(at + i, HEX_PAIRS + 2 * (value & 255), 2)
            value >>= 8
        self.length += 8
        return 0

    cdef int position(self, uint64_t lsn, uint64_t index) except -1:
        """A PostgreSQL position as its JSON string (``"0000000001A2B3C8:00000003"``)."""
        self.reserve(48)
        self.data[self.length] = b'"'
        self.length += 1
        self.length += write_hex(self.data + self.length, lsn, 16)
        self.data[self.length] = b":"
        self.length += 1
        self.length += write_hex(self.data + self.length, index, 8)
        self.data[self.length] = b'"'
        self.length += 1
        return 0

    cdef int utf8_string(self, const unsigned char* text, Py_ssize_t size) except -1:
        """A JSON string of UTF-8 ``text``, escaped as orjson escapes: quote, backslash and
        control characters only."""
        cdef Py_ssize_t i, run = 0
        cdef unsigned char c
        self.reserve(size + 2)
        self.data[self.length] = b'"'
        self.length += 1
        i = plain_prefix(text, size)
        if i == size:  # the common case: nothing to escape
            memcpy(self.data + self.length, text, size)
            self.data[self.length + size] = b'"'
            self.length += size + 1
            return 0
        for i in range(i, size):
            c = text[i]
            if c >= 0x20 and c != b'"' and c != b"\\":
                continue
            self.raw(<const char*>text + run, i - run)
            run = i + 1
            if c == b'"':
                self.raw(b'\\"', 2)
            elif c == b"\\":
                self.raw(b"\\\\", 2)
            elif c == b"\n":
                self.raw(b"\\n", 2)
            elif c == b"\t":
                self.raw(b"\\t", 2)
            elif c == b"\r":
                self.raw(b"\\r", 2)
            elif c == 0x08:
                self.raw(b"\\b", 2)
            elif c == 0x0C:
                self.raw(b"\\f", 2)
            else:
                self.raw(b"\\u00", 4)
                self.char_(LOWER_HEX[c >> 4])
                self.char_(LOWER_HEX[c & 15])
        self.raw(<const char*>text + run, size - run)
        self.char_(b'"')
        return 0

    cdef int string(self, object text) except -1:
        """A str (exactly) as a JSON string; one orjson refuses (lone surrogates) goes to it."""
        cdef Py_ssize_t size
        cdef const char* utf8
        if PyUnicode_IS_ASCII(text):
            return self.utf8_string(<const unsigned char*>PyUnicode_DATA(text),
                                    PyUnicode_GET_LENGTH(text))
        try:
            utf8 = PyUnicode_AsUTF8AndSize(text, &size)
        except UnicodeEncodeError:
            return self.bytes_(python_dumps(text))
        return self.utf8_string(<const unsigned char*>utf8, size)

    cdef int integer(self, object number) except -1:
        cdef int overflow = 0
        cdef long long value = PyLong_AsLongLongAndOverflow(number, &overflow)
        cdef char text[24]
        cdef int i = 23, negative = value < 0
        cdef unsigned long long rest
        if overflow:
            return self.bytes_(python_dumps(number))
        rest = <unsigned long long>(-value) if negative else <unsigned long long>value
        while True:
            text[i] = <char>(48 + rest % 10)
            rest //= 10
            i -= 1
            if rest == 0:
                break
        if negative:
            text[i] = b"-"
            i -= 1
        return self.raw(text + i + 1, 23 - i)

    cdef int digits(self, int value, int count) except -1:
        cdef int i
        self.reserve(count)
        for i in range(count - 1, -1, -1):
            self.data[self.length + i] = <char>(48 + value % 10)
            value //= 10
        self.length += count
        return 0

    cdef int clock_text(self, const char* p, Py_ssize_t n, int microsecond) except -1:
        """PostgreSQL's ``HH:MM:SS[.f]`` (checked by `read_clock`, whose ``microsecond`` it
        gave) as Python's isoformat writes the time: six fraction digits, or none for 0."""
        cdef Py_ssize_t digits = n - 9
        self.reserve(15)
        memcpy(self.data + self.length, p, 8)
        self.length += 8
        if microsecond:
            memcpy(self.data + self.length, p + 8, n - 8)
            self.length += n - 8
            while digits < 6:
                self.data[self.length] = b"0"
                self.length += 1
                digits += 1
        return 0

    cdef int clock(self, int hour, int minute, int second, int microsecond) except -1:
        self.digits(hour, 2)
        self.char_(b":")
        self.digits(minute, 2)
        self.char_(b":")
        self.digits(second, 2)
        if microsecond:
            self.char_(b".")
            self.digits(microsecond, 6)
        return 0

    cdef int calendar(self, object day) except -1:
        self.digits(PyDateTime_GET_YEAR(day), 4)
        self.char_(b"-")
        self.digits(PyDateTime_GET_MONTH(day), 2)
        self.char_(b"-")
        self.digits(PyDateTime_GET_DAY(day), 2)
        return 0

    cdef int base64(self, bytes data) except -1:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data), i = 0
        cdef uint32_t triple
        self.reserve(4 * (size // 3 + 1) + 2)
        self.data[self.length] = b'"'
        self.length += 1
        while i + 2 < size:
            triple = (<uint32_t>p[i] << 16) | (<uint32_t>p[i + 1] << 8) | p[i + 2]
            self.data[self.length] = BASE64[(triple >> 18) & 63]
            self.data[self.length + 1] = BASE64[(triple >> 12) & 63]
            self.data[self.length + 2] = BASE64[(triple >> 6) & 63]
            self.data[self.length + 3] = BASE64[triple & 63]
            self.length += 4
            i += 3
        if i < size:
            triple = <uint32_t>p[i] << 16
            if i + 1 < size:
                triple |= <uint32_t>p[i + 1] << 8
            self.data[self.length] = BASE64[(triple >> 18) & 63]
            self.data[self.length + 1] = BASE64[(triple >> 12) & 63]
            self.data[self.length + 2] = BASE64[(triple >> 6) & 63] if i + 1 < size else b"="
            self.data[self.length + 3] = b"="
            self.length += 4
        self.data[self.length] = b'"'
        self.length += 1
        return 0

    cdef int uuid_(self, object value) except -1:
        cdef char text[38]
        cdef int i, position = 36
        number = value.int
        cdef uint64_t low = <uint64_t>(number & 0xFFFFFFFFFFFFFFFF)
        cdef uint64_t high = <uint64_t>(number >> 64)
        text[0] = b'"'
        text[37] = b'"'
        for i in range(32):  # from the last hex digit backwards, dashes at 8, 13, 18, 23
            if position == 24 or position == 19 or position == 14 or position == 9:
                text[position] = b"-"
                position -= 1
            if i < 16:
                text[position] = LOWER_HEX[low & 15]
                low >>= 4
            else:
                text[position] = LOWER_HEX[high & 15]
                high >>= 4
            position -= 1
        return self.raw(text, 38)

    cdef int row(self, dict row, bint skip_unchanged) except -1:
        """A dict of column values; ``skip_unchanged``: leave out columns holding UNCHANGED."""
        cdef bint first = True
        cdef Py_ssize_t j = 0, start = self.length
        self.char_(b"{")
        for name, value in row.items():
            if type(name) is not str:  # orjson's way with such keys, for the whole dict
                self.length = start
                return self.bytes_(python_dumps(_without(row) if skip_unchanged else row))
            if skip_unchanged and value is UNCHANGED:
                j += 1
                continue
            if not first:
                self.char_(b",")
            first = False
            # (a nested dict written meanwhile may have shortened the lists)
            if j < len(self.last_keys) and self.last_keys[j] is name:
                self.bytes_(<bytes>self.last_prefixes[j])
            else:
                self.key_prefix(name, j)
            self.value(value)
            j += 1
        self.char_(b"}")
        return 0

    cdef int key_prefix(self, str name, Py_ssize_t j) except -1:
        """Write the key ``name`` and its colon, and remember them as the ``j``-th key."""
        cdef Py_ssize_t start = self.length
        self.string(name)
        self.char_(b":")
        prefix = PyBytes_FromStringAndSize(self.data + start, self.length - start)
        del self.last_keys[j:]
        del self.last_prefixes[j:]
        self.last_keys.append(name)
        self.last_prefixes.append(prefix)
        return 0

    cdef int value(self, object value) except -1:
        """Any value, as ``dumps(value)`` writes it."""
        cls = type(value)
        if cls is str:
            return self.string(value)
        if cls is int:
            return self.integer(value)
        if value is None:
            return self.raw(b"null", 4)
        if value is True:
            return self.raw(b"true", 4)
        if value is False:
            return self.raw(b"false", 5)
        if cls is dict:
            return self.row(value, False)
        if cls is Decimal:
            return self.string(value.__str__())
        if cls is datetime_type:
            tz = value.tzinfo
            if tz is not None and tz is not UTC:
                return self.bytes_(python_dumps(value))
            self.char_(b'"')
            self.calendar(value)
            self.char_(b"T")
            self.clock(PyDateTime_DATE_GET_HOUR(value), PyDateTime_DATE_GET_MINUTE(value),
                       PyDateTime_DATE_GET_SECOND(value), PyDateTime_DATE_GET_MICROSECOND(value))
            if tz is not None:
                self.raw(b"+00:00", 6)
            return self.char_(b'"')
        if cls is list or cls is tuple:
            self.char_(b"[")
            for i, item in enumerate(value):
                if i:
                    self.char_(b",")
                self.value(item)
            return self.char_(b"]")
        if cls is date_type:
            self.char_(b'"')
            self.calendar(value)
            return self.char_(b'"')
        if cls is UUID:
            return self.uuid_(value)
        if cls is time_type and value.tzinfo is None:
            self.char_(b'"')
            self.clock(PyDateTime_TIME_GET_HOUR(value), PyDateTime_TIME_GET_MINUTE(value),
                       PyDateTime_TIME_GET_SECOND(value), PyDateTime_TIME_GET_MICROSECOND(value))
            return self.char_(b'"')
        if cls is bytes:
            return self.base64(value)
        if cls is PgPosition or (PgPosition is None and isinstance(value, str)
                                 and bind_position() and cls is PgPosition):
            return self.string(value)  # its text, as `json_default` gives it
        return self.bytes_(python_dumps(value))


cdef dict _without(dict row):
    return {name: value for name, value in row.items() if value is not UNCHANGED}
