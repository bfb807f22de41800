# The direct path: a value's JSON written from PostgreSQL's text, without making the Python
# value first, where the text alone decides the JSON the Python value would get. Returns 0 when
# written, 1 (nothing written) for the loader and `JsonWriter.value` to take it.


cdef inline bint utf8_valid(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (no surrogates, no overlong forms, nothing past U+10FFFF), as Python's
    decoder requires."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        if c < 0xC2 or c > 0xF4:
            return False
        if c < 0xE0:
            if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
            continue
        if i + 2 >= n or (p[i + 1] & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80:
            return False
        c1 = p[i + 1]
        if c < 0xF0:
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F):
                return False
            i += 3
            continue
        if i + 3 >= n or (p[i + 3] & 0xC0) != 0x80:
            return False
        if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F):
            return False
        i += 4
    return True


cdef inline bint canonical_integer(const char* p, Py_ssize_t n) noexcept nogil:
    """``-?[1-9][0-9]*`` or ``0``: written as Python writes the int it makes of it."""
    cdef Py_ssize_t i = 0
    if n and p[0] == b"-":
        i = 1
    if i >= n or (p[i] == b"0" and n - i > 1):
        return False
    while i < n:
        if digit(p[i]) < 0:
            return False
        i += 1
    return True


cdef bint plain_decimal(const char* p, Py_ssize_t n) noexcept nogil:
    """Numeric text that ``str(Decimal(text))`` gives back as it is: NaN, ±Infinity, or
    ``-?digits[.digits]`` without leading zeros and not below 1E-6 (Decimal writes those with
    an exponent)."""
    cdef Py_ssize_t i = 0, point = -1
    if (n == 3 and p[0] == b"N" and p[1] == b"a" and p[2] == b"N"):
        return True
    if n and p[0] == b"-":
        i = 1
    if n - i == 8 and memcmp(p + i, b"Infinity", 8) == 0:
        return True
    if i >= n or digit(p[i]) < 0 or (p[i] == b"0" and i + 1 < n and p[i + 1] != b"."):
        return False
    if n - i >= 8 and memcmp(p + i, b"0.000000", 8) == 0:
        return False
    for i in range(i, n):
        if p[i] == b".":
            if point >= 0 or i + 1 == n:
                return False
            point = i
        elif digit(p[i]) < 0:
            return False
    return True


cdef int write_text_value(JsonWriter out, int kind, const char* p, Py_ssize_t n) except -1:
    cdef int year, month, day, hour, minute, second, microsecond
    cdef Py_ssize_t i
    if kind == KIND_INT:
        if not canonical_integer(p, n):
            return 1
        out.raw(p, n)
        return 0
    if kind == KIND_TEXT:
        if not utf8_valid(<const unsigned char*>p, n):
            return 1
        out.utf8_string(<const unsigned char*>p, n)
        return 0
    if kind == KIND_BOOL:
        if n == 1 and p[0] == b"t":
            out.raw(b"true", 4)
            return 0
        if n == 1 and p[0] == b"f":
            out.raw(b"false", 5)
            return 0
        return 1
    if kind == KIND_NUMERIC:
        if not plain_decimal(p, n):
            return 1
        out.char_(b'"')
        out.raw(p, n)
        out.char_(b'"')
        return 0
    if kind == KIND_TIMESTAMPTZ or kind == KIND_TIMESTAMP:
        if kind == KIND_TIMESTAMPTZ:
            if n < 22 or p[n - 3] != b"+" or p[n - 2] != b"0" or p[n - 1] != b"0":
                return 1
            n -= 3
        if n < 19 or p[10] != b" " or read_date(p, &year, &month, &day) < 0 \
                or read_clock(p + 11, n - 11, &hour, &minute, &second, &microsecond) < 0 \
                or day > days_in_month(year, month):
            return 1
        out.char_(b'"')
        out.raw(p, 10)
        out.char_(b"T")
        out.clock_text(p + 11, n - 11, microsecond)
        if kind == KIND_TIMESTAMPTZ:
            out.raw(b"+00:00", 6)
        out.char_(b'"')
        return 0
    if kind == KIND_DATE:
        if n != 10 or read_date(p, &year, &month, &day) < 0 \
                or day > days_in_month(year, month):
            return 1
        out.char_(b'"')
        out.raw(p, 10)
        out.char_(b'"')
        return 0
    if kind == KIND_TIME:
        if read_clock(p, n, &hour, &minute, &second, &microsecond) < 0:
            return 1
        out.char_(b'"')
        out.clock_text(p, n, microsecond)
        out.char_(b'"')
        return 0
    if kind == KIND_UUID:
        if n != 36:
            return 1
        for i in range(36):
            if i == 8 or i == 13 or i == 18 or i == 23:
                if p[i] != b"-":
                    return 1
            elif not (b"0" <= p[i] <= b"9" or b"a" <= p[i] <= b"f"):
                return 1
        out.char_(b'"')
        out.raw(p, 36)
        out.char_(b'"')
        return 0
    return 1  # floats (orjson's own format), bytea, the Python loaders' types


cdef inline int days_in_month(int year, int month) noexcept nogil:
    if month == 2:
        return 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    if month == 4 or month == 6 or month == 9 or month == 11:
        return 30
    return 31
