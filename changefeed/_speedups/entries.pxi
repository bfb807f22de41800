# A pipeline's entries as they cross a process boundary (`changefeed.pipelines._crossing._Chunk`):
# what `_pack_entries` and `_unpack_entries` do in Python, in C, in the same packed form (tags,
# and one flat list of values that pickle writes and reads in C). A `Change` is rebuilt by
# filling its slots, without the cost of its __init__; anything uncommon is left to the Python
# functions given (``pack_value``, ``unpack_value``, ``pack_other``, ``unpack_other``).

cdef enum:
    TAG_CHANGE = 0
    TAG_KEPT = 1
    TAG_LINE = 2
    TAG_OTHER = 3

cdef object entry_class = None  # `_Entry`, bound on first use with its slots' offsets
cdef Py_ssize_t entry_offsets[4]  # position, change, items, dead
cdef object line_class = None  # `JsonLine`
cdef Py_ssize_t line_offset = -1
cdef dict operations_by_value = None


cdef int bind_entries(object entry_cls, object line_cls) except -1:
    global entry_class, line_class, line_offset, operations_by_value
    if entry_class is entry_cls and line_class is line_cls:
        return 0
    bind_core()
    from changefeed.change import Operation

    operations_by_value = {operation._value_: operation for operation in Operation}
    for i, name in enumerate(("position", "change", "items", "dead")):
        entry_offsets[i] = slot_offset(entry_cls, name)
        if entry_offsets[i] < 0:
            raise TypeError(f"{entry_cls!r} has no slot {name}")
    line_offset = slot_offset(line_cls, "line")
    if line_offset < 0:
        raise TypeError(f"{line_cls!r} has no slot line")
    entry_class = entry_cls
    line_class = line_cls
    return 0


cdef inline object slot_value(object obj, Py_ssize_t offset):
    cdef PyObject* value = (<PyObject**>((<char*><PyObject*>obj) + offset))[0]
    if value == NULL:
        raise AttributeError("an entry's slot is not set")
    return <object>value


cdef inline object pack_position(object position, object pack_value):
    """``pack_value(position)``, in C for a str, None and a `PgPosition`."""
    cls = type(position)
    if cls is str or position is None:
        return position
    if (PgPosition is not None or bind_position()) and cls is PgPosition:
        return (1, PgPosition, str(position))  # as a text (`_pack`'s _TEXT)
    return pack_value(position)


cdef inline object unpack_position(object packed, object unpack_value):
    if type(packed) is tuple:
        if len(<tuple>packed) == 3 and type((<tuple>packed)[2]) is str:
            return str_new((<tuple>packed)[1], (<tuple>packed)[2])
        return unpack_value(packed)
    return packed


def pack_entries(list entries, entry_cls, line_cls, pack_value, unpack_value, pack_other,
                 unpack_other):
    """``entries`` as (tags, values): `_pack_entries`' result, exactly."""
    bind_entries(entry_cls, line_cls)
    cdef bytearray tags = bytearray(len(entries))
    cdef list values = []
    cdef Py_ssize_t i = 0
    for entry in entries:
        if type(entry) is not entry_class:
            raise TypeError("not an entry")
        items = slot_value(entry, entry_offsets[2])
        change = slot_value(entry, entry_offsets[1])
        if type(items) is list and len(<list>items) == 1 and not slot_value(entry, entry_offsets[3]):
            item = (<list>items)[0]
            position = slot_value(entry, entry_offsets[0])
            if (type(item) is Change and change_slots_known and change_field(item, 5) is position
                    and (change is None or change is item)):
                tags[i] = TAG_CHANGE if change is None else TAG_KEPT
                append_change(values, item, position, pack_value)
                i += 1
                continue
            if type(item) is line_class and change is None:
                tags[i] = TAG_LINE
                values.append(pack_position(position, pack_value))
                values.append(slot_value(item, line_offset))
                i += 1
                continue
        tags[i] = TAG_OTHER
        values.append(pack_other(entry))
        i += 1
    return bytes(tags), values


cdef inline int append_change(list values, object change, object position,
                              object pack_value) except -1:
    """The fields of ``change`` (exactly a `Change`) as `_pack_entries` writes them."""
    values.append(change_field(change, 0)._value_)
    values.append(change_field(change, 1))
    values.append(change_field(change, 2))
    values.append(change_field(change, 3))
    values.append(change_field(change, 4))
    values.append(pack_position(position, pack_value))
    values.append(change_field(change, 6))
    values.append(change_field(change, 7))
    values.append(change_field(change, 8))
    values.append(change_field(change, 9))
    values.append(change_field(change, 10))
    return 0


def pack_changes(list changes, bint keep, entry_cls, line_cls, pack_value, unpack_value,
                 pack_other, unpack_other):
    """The entries of ``changes`` (``_Entry(change, keep)`` each), packed without making them:
    `_pack_changes`' result, exactly."""
    bind_entries(entry_cls, line_cls)
    cdef bytearray tags = bytearray(len(changes))
    cdef list values = []
    cdef Py_ssize_t i = 0
    for change in changes:
        if type(change) is Change and change_slots_known:
            tags[i] = TAG_KEPT if keep else TAG_CHANGE
            append_change(values, change, change_field(change, 5), pack_value)
        else:
            tags[i] = TAG_OTHER
            values.append(pack_other(entry_cls(change, keep)))
        i += 1
    return bytes(tags), values


cdef inline object new_entry(object position, object change, list items):
    entry = PyType_GenericAlloc(<PyTypeObject*>entry_class, 0)
    set_slot(entry, entry_offsets[0], position)
    set_slot(entry, entry_offsets[1], change)
    set_slot(entry, entry_offsets[2], items)
    set_slot(entry, entry_offsets[3], [])
    return entry


def unpack_entries(bytes tags, list values, entry_cls, line_cls, pack_value, unpack_value,
                   pack_other, unpack_other):
    """The entries `pack_entries` packed: `_unpack_entries`' result, exactly."""
    bind_entries(entry_cls, line_cls)
    cdef list entries = []
    cdef Py_ssize_t at = 0, count = len(tags), i
    cdef unsigned char tag
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(tags)
    for i in range(count):
        tag = data[i]
        if tag == TAG_OTHER:
            entries.append(unpack_other(values[at]))
            at += 1
        elif tag == TAG_LINE:
            position = unpack_position(values[at], unpack_value)
            line = PyType_GenericAlloc(<PyTypeObject*>line_class, 0)
            set_slot(line, line_offset, values[at + 1])
            entries.append(new_entry(position, None, [line]))
            at += 2
        elif tag == TAG_CHANGE or tag == TAG_KEPT:
            if at + 11 > len(values):
                raise ValueError("a packed change is cut short")
            position = unpack_position(values[at + 5], unpack_value)
            change = make_change(operations_by_value[values[at]], values[at + 1],
                                 values[at + 2], values[at + 3], values[at + 4], position,
                                 values[at + 6], values[at + 7], values[at + 8], values[at + 9],
                                 values[at + 10])
            entries.append(new_entry(position, change if tag == TAG_KEPT else None, [change]))
            at += 11
        else:
            raise ValueError(f"unknown entry tag {tag}")
    return entries


cdef object make_change(object operation, object table, object new, object old, object key,
                        object position, object committed_at, object transaction,
                        object snapshot, object meta, object schema_version):
    """``Change(...)`` of all its fields, without the cost of its __init__."""
    if not change_slots_known:
        return Change(operation, table, new, old, key, position, committed_at, transaction,
                      snapshot, meta, schema_version)
    change = PyType_GenericAlloc(<PyTypeObject*>Change, 0)
    set_slot(change, change_offsets[0], operation)
    set_slot(change, change_offsets[1], table)
    set_slot(change, change_offsets[2], new)
    set_slot(change, change_offsets[3], old)
    set_slot(change, change_offsets[4], key)
    set_slot(change, change_offsets[5], position)
    set_slot(change, change_offsets[6], committed_at)
    set_slot(change, change_offsets[7], transaction)
    set_slot(change, change_offsets[8], snapshot)
    set_slot(change, change_offsets[9], meta)
    set_slot(change, change_offsets[10], schema_version)
    return change


def pack_lines(Lines lines):
    """A batch of ready lines (`Lines`, the direct path's) as (text, line ends, LSN, whether a
    change was seen, the last seen change's index, commit time): plain values that pickle in
    C, from which `unpack_lines` makes the same batch in another process. One copy of the
    text and of the ends, whatever the number of lines (the lean crossing of `_crossing`)."""
    return (PyBytes_FromStringAndSize(lines.data, lines.length),
            PyBytes_FromStringAndSize(<char*>lines.ends, lines.count * sizeof(LineEnd)),
            lines.lsn, lines.any_seen, lines.seen_index, lines.committed_at)


def unpack_lines(bytes text, bytes ends, uint64_t lsn, bint any_seen, uint64_t seen_index,
                 committed_at):
    """The `Lines` `pack_lines` packed (its lines, positions and counts the same)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(ends), length = PyBytes_GET_SIZE(text)
    cdef Py_ssize_t count = size // <Py_ssize_t>sizeof(LineEnd)
    if size % <Py_ssize_t>sizeof(LineEnd):
        raise ValueError("packed line ends are cut short")
    cdef Lines lines = new_lines(lsn, committed_at)
    lines.data = <char*>PyMem_Malloc(max(length, 1))
    lines.ends = <LineEnd*>PyMem_Malloc(max(size, 1))
    if lines.data is NULL or lines.ends is NULL:
        raise MemoryError()
    memcpy(lines.data, PyBytes_AS_STRING(text), length)
    memcpy(lines.ends, PyBytes_AS_STRING(ends), size)
    lines.length = length
    lines.count = lines.capacity = count
    if count and lines.ends[count - 1].end != length:
        raise ValueError("packed lines do not end where their text does")
    lines.any_seen, lines.seen_index = any_seen, seen_index
    return lines
