# json and jsonb values as our `JsonLoader` loads them (``json.loads`` with exact numbers:
# integers as int, or `JsonInt` beyond 64 bits; other numbers as `JsonDecimal`): dict, list,
# str, int, JsonDecimal, bool, None. Anything unusual (a byte-order mark, invalid UTF-8,
# escaped surrogates, integers of more than 18 digits, nesting deeper than MAX_JSON_DEPTH,
# text json.loads refuses) is declined, for `JsonLoader` itself.

cdef enum:
    MAX_JSON_DEPTH = 200  # json.loads's own limit depends on the Python stack: stay far below

cdef object JsonDecimal
cdef JsonParser json_parser


@cython.final
cdef class JsonParser:
    """One value's text, parsed; `parse` returns the value or DECLINE."""

    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef bint declined
    cdef bytearray scratch

    def __cinit__(self):
        self.scratch = bytearray()

    cdef object parse(self, const char* text, Py_ssize_t size):
        self.p = <const unsigned char*>text
        self.n = size
        self.i = 0
        self.declined = False
        if not utf8_valid(self.p, size) or (size >= 3 and self.p[0] == 0xEF):  # BOM
            return DECLINE
        value = self.value(0)
        if self.declined:
            return DECLINE
        self.skip_space()
        if self.i != self.n:
            return DECLINE
        return value

    cdef inline void skip_space(self) noexcept:
        cdef unsigned char c
        while self.i < self.n:
            c = self.p[self.i]
            if c == b" " or c == b"\t" or c == b"\n" or c == b"\r":
                self.i += 1
            else:
                break

    cdef object decline(self):
        self.declined = True
        return None

    cdef object value(self, int depth):
        self.skip_space()
        # At MAX_JSON_DEPTH containers already open, declined: JsonLoader keeps a value nesting
        # more than MAX_DEPTH (the same 200) as its text (`RawJson`).
        if self.i >= self.n or depth >= MAX_JSON_DEPTH:
            return self.decline()
        cdef unsigned char c = self.p[self.i]
        if c == b'"':
            return self.string()
        if c == b"{":
            return self.object(depth)
        if c == b"[":
            return self.array(depth)
        if c == b"-" or b"0" <= c <= b"9":
            return self.number()
        if self.n - self.i >= 4 and memcmp(self.p + self.i, b"true", 4) == 0:
            self.i += 4
            return True
        if self.n - self.i >= 5 and memcmp(self.p + self.i, b"false", 5) == 0:
            self.i += 5
            return False
        if self.n - self.i >= 4 and memcmp(self.p + self.i, b"null", 4) == 0:
            self.i += 4
            return None
        return self.decline()  # NaN, Infinity (json.loads takes them; PostgreSQL does not)

    cdef object object(self, int depth):
        result = {}
        self.i += 1
        self.skip_space()
        if self.i < self.n and self.p[self.i] == b"}":
            self.i += 1
            return result
        while not self.declined:
            self.skip_space()
            if self.i >= self.n or self.p[self.i] != b'"':
                return self.decline()
            key = self.string()
            self.skip_space()
            if self.declined or self.i >= self.n or self.p[self.i] != b":":
                return self.decline()
            self.i += 1
            item = self.value(depth + 1)
            if self.declined:
                return None
            result[key] = item  # a repeated key: the last value, at the first place
            self.skip_space()
            if self.i >= self.n:
                return self.decline()
            if self.p[self.i] == b"}":
                self.i += 1
                return result
            if self.p[self.i] != b",":
                return self.decline()
            self.i += 1
        return None

    cdef object array(self, int depth):
        result = []
        self.i += 1
        self.skip_space()
        if self.i < self.n and self.p[self.i] == b"]":
            self.i += 1
            return result
        while not self.declined:
            item = self.value(depth + 1)
            if self.declined:
                return None
            result.append(item)
            self.skip_space()
            if self.i >= self.n:
                return self.decline()
            if self.p[self.i] == b"]":
                self.i += 1
                return result
            if self.p[self.i] != b",":
                return self.decline()
            self.i += 1
        return None

    cdef object number(self):
        cdef Py_ssize_t start = self.i, digits_start
        cdef bint integral = True
        if self.p[self.i] == b"-":
            self.i += 1
        digits_start = self.i
        while self.i < self.n and b"0" <= self.p[self.i] <= b"9":
            self.i += 1
        if self.i == digits_start or (self.p[digits_start] == b"0" and self.i - digits_start > 1):
            return self.decline()
        if self.i < self.n and self.p[self.i] == b".":
            integral = False
            self.i += 1
            digits_start = self.i
            while self.i < self.n and b"0" <= self.p[self.i] <= b"9":
                self.i += 1
            if self.i == digits_start:
                return self.decline()
        if self.i < self.n and (self.p[self.i] == b"e" or self.p[self.i] == b"E"):
            integral = False
            self.i += 1
            if self.i < self.n and (self.p[self.i] == b"+" or self.p[self.i] == b"-"):
                self.i += 1
            digits_start = self.i
            while self.i < self.n and b"0" <= self.p[self.i] <= b"9":
                self.i += 1
            if self.i == digits_start:
                return self.decline()
        if not integral:
            return JsonDecimal(PyUnicode_DecodeASCII(<const char*>self.p + start,
                                                     self.i - start, NULL))
        if self.i - start == 2 and self.p[start] == b"-" and self.p[start + 1] == b"0":
            return self.decline()  # -0: JsonLoader keeps its sign (a JsonDecimal)
        value = load_int(<const char*>self.p + start, self.i - start)  # up to 18 digits
        if value is DECLINE:
            return self.decline()
        return value

    cdef object string(self):
        cdef Py_ssize_t start = self.i + 1, j
        cdef unsigned char c
        cdef int code, k, d
        self.i = start
        while self.i < self.n:  # the common case: no escapes, no control characters
            c = self.p[self.i]
            if c == b'"':
                self.i += 1
                return PyUnicode_DecodeUTF8(<const char*>self.p + start, self.i - 1 - start,
                                            NULL)
            if c == b"\\" or c < 0x20:
                break
            self.i += 1
        scratch = self.scratch
        del scratch[:]
        scratch += (<const char*>self.p)[start:self.i]
        while self.i < self.n:
            c = self.p[self.i]
            if c == b'"':
                self.i += 1
                return scratch.decode()
            if c < 0x20:  # json.loads refuses raw control characters
                return self.decline()
            if c != b"\\":
                j = self.i
                while self.i < self.n and self.p[self.i] != b"\\" and self.p[self.i] != b'"' \
                        and self.p[self.i] >= 0x20:
                    self.i += 1
                scratch += (<const char*>self.p)[j:self.i]
                continue
            if self.i + 1 >= self.n:
                return self.decline()
            c = self.p[self.i + 1]
            self.i += 2
            if c == b'"' or c == b"\\" or c == b"/":
                scratch.append(c)
            elif c == b"b":
                scratch.append(8)
            elif c == b"f":
                scratch.append(12)
            elif c == b"n":
                scratch.append(10)
            elif c == b"r":
                scratch.append(13)
            elif c == b"t":
                scratch.append(9)
            elif c == b"u":
                if self.i + 4 > self.n:
                    return self.decline()
                code = 0
                for k in range(4):
                    d = hex_value(self.p[self.i + k])
                    if d < 0:
                        return self.decline()
                    code = code * 16 + d
                self.i += 4
                if 0xD800 <= code <= 0xDFFF:  # surrogates: pairs and lone ones, json's way
                    return self.decline()
                scratch += chr(code).encode()
            else:
                return self.decline()
        return self.decline()


def parse_json(bytes text):
    """The kernel's json value of ``text``, or None where it leaves the text to `JsonLoader`
    (for the tests: they compare the two)."""
    bind_python()
    value = json_parser.parse(PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text))
    return None if value is DECLINE else (value,)
