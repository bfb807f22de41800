# Loaders of the common types, from PostgreSQL's text form (the session settings of
# `changefeed.backends.postgres.values` fix it: ISO dates, UTC, shortest exact floats).
#
# Each returns exactly the value psycopg's loader (or ours, for floats) returns, or DECLINE for
# any text it is not sure of (BC or infinite dates, years past 9999, 24:00, an offset other
# than UTC, bytea in escape format, invalid UTF-8): the Python loaders then take that value,
# with their fallbacks, so odd values come out as they always did.

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr,
                                 PyObject* overflow_exception) except? -1.0
    object PyLong_FromString(const char* text, char** end, int base)


cdef enum Kind:
    KIND_PYTHON = 0  # the Python loaders (every type not below)
    KIND_INT
    KIND_BOOL
    KIND_TEXT
    KIND_FLOAT
    KIND_NUMERIC
    KIND_DATE
    KIND_TIME
    KIND_TIMESTAMP
    KIND_TIMESTAMPTZ
    KIND_UUID
    KIND_BYTEA
    KIND_JSON

KIND_OF_OID = {
    16: KIND_BOOL, 17: KIND_BYTEA, 18: KIND_TEXT, 19: KIND_TEXT, 20: KIND_INT, 21: KIND_INT,
    23: KIND_INT, 25: KIND_TEXT, 26: KIND_INT, 700: KIND_FLOAT, 701: KIND_FLOAT,
    1042: KIND_TEXT, 1043: KIND_TEXT, 1082: KIND_DATE, 1083: KIND_TIME, 1114: KIND_TIMESTAMP,
    1184: KIND_TIMESTAMPTZ, 1700: KIND_NUMERIC, 2950: KIND_UUID, 114: KIND_JSON,
    3802: KIND_JSON,
}


cdef int kind_of(object loaders, uint32_t oid) except -1:
    """The kernel loader for columns of type ``oid``, where ``loaders`` (a `TypeLoaders`) uses
    the loader it stands for; else KIND_PYTHON."""
    kind = KIND_OF_OID.get(oid)
    if kind is None:
        return KIND_PYTHON
    fast = loaders.fast.get_loader(C_FLOAT.get(oid, oid), TEXT_FORMAT)
    if kind == KIND_JSON:  # ours, not psycopg's
        return kind if fast is own_loaders[oid] else KIND_PYTHON
    if fast is not psycopg_default_loaders.get_loader(oid, TEXT_FORMAT):
        return KIND_PYTHON
    if kind == KIND_FLOAT and loaders.tolerant.get_loader(oid, TEXT_FORMAT) is not own_loaders[oid]:
        return KIND_PYTHON
    return kind


cdef inline int digit(char c) noexcept nogil:
    """The value of a decimal digit, or -1."""
    cdef unsigned int value = <unsigned char>c - 48
    return value if value <= 9 else -1


cdef inline int number_at(const char* p, int count) noexcept nogil:
    """The ``count`` decimal digits at ``p`` as a number, or -1 if one is not a digit."""
    cdef int value = 0, d, i
    for i in range(count):
        d = digit(p[i])
        if d < 0:
            return -1
        value = value * 10 + d
    return value


cdef inline int hex_value(char c) noexcept nogil:
    if b"0" <= c <= b"9":
        return c - 48
    if b"a" <= c <= b"f":
        return c - 87
    if b"A" <= c <= b"F":
        return c - 55
    return -1


cdef object load_int(const char* p, Py_ssize_t n):
    cdef Py_ssize_t i = 0
    cdef int64_t value = 0
    cdef int d
    cdef bint negative = n > 0 and p[0] == b"-"
    if negative:
        i = 1
    if n - i < 1 or n - i > 18:  # longer ones (int8 near its limits): Python's int()
        return DECLINE
    while i < n:
        d = digit(p[i])
        if d < 0:
            return DECLINE
        value = value * 10 + d
        i += 1
    return -value if negative else value


cdef object load_float(const char* p, Py_ssize_t n):
    cdef char text[64]
    cdef double value
    if n < 1 or n >= 64:
        return DECLINE
    memcpy(text, p, n)
    text[n] = 0
    try:
        value = PyOS_string_to_double(text, NULL, NULL)
    except ValueError:
        return DECLINE
    if value - value != 0.0 or value != value:  # NaN or infinite: visible in JSON
        return NonFiniteFloat(value)
    return value


cdef int read_clock(const char* p, Py_ssize_t n, int* hour, int* minute, int* second,
                    int* microsecond) noexcept nogil:
    """``HH:MM:SS`` with an optional fraction of 1 to 6 digits, the whole of ``n`` bytes;
    returns 0, or -1 for anything else (including 24:00:00, which Python cannot hold)."""
    cdef int d, i, scale
    if n < 8 or p[2] != b":" or p[5] != b":":
        return -1
    hour[0] = number_at(p, 2)
    minute[0] = number_at(p + 3, 2)
    second[0] = number_at(p + 6, 2)
    if hour[0] < 0 or hour[0] > 23 or minute[0] < 0 or minute[0] > 59 or second[0] < 0 \
            or second[0] > 59:
        return -1
    microsecond[0] = 0
    if n == 8:
        return 0
    if p[8] != b"." or n < 10 or n > 15:
        return -1
    scale = 100000
    for i in range(9, n):
        d = digit(p[i])
        if d < 0:
            return -1
        microsecond[0] += d * scale
        scale //= 10
    return 0


cdef int read_date(const char* p, int* year, int* month, int* day) noexcept nogil:
    """``YYYY-MM-DD`` (years 1 to 9999, as Python's dates); returns 0, or -1."""
    if p[4] != b"-" or p[7] != b"-":
        return -1
    year[0] = number_at(p, 4)
    month[0] = number_at(p + 5, 2)
    day[0] = number_at(p + 8, 2)
    if year[0] < 1 or month[0] < 1 or month[0] > 12 or day[0] < 1 or day[0] > 31:
        return -1
    return 0


cdef object load_date(const char* p, Py_ssize_t n):
    cdef int year, month, day
    if n != 10 or read_date(p, &year, &month, &day) < 0:
        return DECLINE
    try:
        return date_new(year, month, day)
    except ValueError:  # 2023-02-30 is not a date PostgreSQL sends, but be sure
        return DECLINE


cdef object load_time(const char* p, Py_ssize_t n):
    cdef int hour, minute, second, microsecond
    if read_clock(p, n, &hour, &minute, &second, &microsecond) < 0:
        return DECLINE
    return time_new(hour, minute, second, microsecond, None)


cdef object load_timestamp(const char* p, Py_ssize_t n, object tz):
    cdef int year, month, day, hour, minute, second, microsecond
    if n < 19 or p[10] != b" " or read_date(p, &year, &month, &day) < 0 \
            or read_clock(p + 11, n - 11, &hour, &minute, &second, &microsecond) < 0:
        return DECLINE
    try:
        return datetime_new(year, month, day, hour, minute, second, microsecond, tz)
    except ValueError:
        return DECLINE


cdef object load_timestamptz(const char* p, Py_ssize_t n):
    # The feed's sessions run in UTC: "+00" ends every value; other offsets go to psycopg.
    if n < 22 or p[n - 3] != b"+" or p[n - 2] != b"0" or p[n - 1] != b"0":
        return DECLINE
    return load_timestamp(p, n - 3, UTC)


cdef Py_ssize_t uuid_int_offset = -1, uuid_safe_offset = -1


cdef object load_uuid(const char* p, Py_ssize_t n):
    cdef char text[33]
    cdef int i, j = 0
    if n != 36:
        return DECLINE
    for i in range(36):
        if i == 8 or i == 13 or i == 18 or i == 23:
            if p[i] != b"-":
                return DECLINE
            continue
        if hex_value(p[i]) < 0:
            return DECLINE
        text[j] = p[i]
        j += 1
    text[32] = 0
    value = PyLong_FromString(text, NULL, 16)
    if uuid_int_offset < 0:  # as psycopg makes them: no UUID.__init__, is_safe unknown
        uuid = UUID.__new__(UUID)
        PyObject_GenericSetAttr(uuid, "is_safe", SAFE_UUID_UNKNOWN)
        PyObject_GenericSetAttr(uuid, "int", value)
        return uuid
    uuid = PyType_GenericAlloc(<PyTypeObject*>UUID, 0)
    set_slot(uuid, uuid_int_offset, value)
    set_slot(uuid, uuid_safe_offset, SAFE_UUID_UNKNOWN)
    return uuid


cdef object load_bytea(const char* p, Py_ssize_t n):
    cdef Py_ssize_t i, size
    cdef int high, low
    if n < 2 or p[0] != b"\\" or p[1] != b"x" or n % 2:  # escape format: psycopg's loader
        return DECLINE
    size = (n - 2) // 2
    result = PyBytes_FromStringAndSize(NULL, size)
    cdef char* out = PyBytes_AS_STRING(result)
    for i in range(size):
        high = hex_value(p[2 + 2 * i])
        low = hex_value(p[3 + 2 * i])
        if high < 0 or low < 0:
            return DECLINE
        out[i] = <char>((high << 4) | low)
    return result


cdef object load_value(int kind, const char* p, Py_ssize_t n):
    """The value of ``n`` bytes of text at ``p`` for a column of ``kind``, or DECLINE."""
    if kind == KIND_INT:
        return load_int(p, n)
    if kind == KIND_TEXT:
        try:
            return PyUnicode_DecodeUTF8(p, n, NULL)
        except UnicodeDecodeError:
            return DECLINE
    if kind == KIND_BOOL:
        if n == 1 and p[0] == b"t":
            return True
        if n == 1 and p[0] == b"f":
            return False
        return DECLINE
    if kind == KIND_NUMERIC:
        return Decimal(PyUnicode_DecodeASCII(p, n, NULL))
    if kind == KIND_TIMESTAMPTZ:
        return load_timestamptz(p, n)
    if kind == KIND_TIMESTAMP:
        return load_timestamp(p, n, None)
    if kind == KIND_DATE:
        return load_date(p, n)
    if kind == KIND_FLOAT:
        return load_float(p, n)
    if kind == KIND_UUID:
        return load_uuid(p, n)
    if kind == KIND_TIME:
        return load_time(p, n)
    if kind == KIND_BYTEA:
        return load_bytea(p, n)
    if kind == KIND_JSON:
        return json_parser.parse(p, n)
    return DECLINE
