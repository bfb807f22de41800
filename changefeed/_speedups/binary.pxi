# Reading the protocol's big-endian integers, and making positions.


cdef inline uint16_t read_u16(const unsigned char* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t read_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t read_u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>read_u32(p) << 32) | read_u32(p + 4)


cdef const char* HEX_DIGITS = b"0123456789ABCDEF"


cdef inline Py_ssize_t write_hex(char* out, uint64_t value, int width) noexcept nogil:
    """``value`` in upper-case hex, at least ``width`` digits, at ``out``; returns the length."""
    cdef int digits = 1
    cdef uint64_t rest = value >> 4
    while rest:
        digits += 1
        rest >>= 4
    if digits < width:
        digits = width
    cdef int i
    for i in range(digits - 1, -1, -1):
        out[i] = HEX_DIGITS[value & 15]
        value >>= 4
    return digits


cdef uint64_t position_lsn = 0  # the LSN whose text `position_text` starts with
cdef char position_text[40]
cdef Py_ssize_t position_prefix = 0


cdef object make_position(uint64_t lsn, uint64_t index):
    """The position of the ``index``-th change of the transaction committed at ``lsn``, as
    `TransactionPositions.take` makes it: a `PgPosition` holding
    ``"0000000001A2B3C8:00000003"``. The one place that makes positions here."""
    global position_lsn, position_prefix
    if lsn != position_lsn or position_prefix == 0:  # a transaction's changes share the LSN
        position_prefix = write_hex(position_text, lsn, 16)
        position_text[position_prefix] = b":"
        position_prefix += 1
        position_lsn = lsn
    cdef Py_ssize_t length = position_prefix + write_hex(position_text + position_prefix, index, 8)
    return str_new(PgPosition, PyUnicode_DecodeASCII(position_text, length, NULL))
