# The Python objects the kernels build and call, bound on first use (`bind_core` for the
# encoders, `bind_python` for the decoder): importing them when this module loads would import
# psycopg into every command that only asks which implementation runs.

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    object PyType_GenericAlloc(PyTypeObject* type, Py_ssize_t nitems)
    int PyObject_GenericSetAttr(object obj, object name, object value) except -1

cdef bint bound = False
cdef object Change, Message, Begin, Commit, DecodeError, UNCHANGED, INSERT, UPDATE, DELETE
cdef object pg_timestamp, PostgresText, NonFiniteFloat
cdef object PgPosition = None  # bound by `bind_core` where the PostgreSQL backend is installed

cdef extern from *:
    """
    /* str.__new__(cls, text) for a subclass of str: what `TransactionPositions.take` does. */
    static PyObject* changefeed_str_subtype(PyObject* cls, PyObject* text) {
        PyObject* args = PyTuple_Pack(1, text);
        PyObject* result;
        if (args == NULL) return NULL;
        result = PyUnicode_Type.tp_new((PyTypeObject*)cls, args, NULL);
        Py_DECREF(args);
        return result;
    }
    """
    object str_new "changefeed_str_subtype"(object cls, object text)
cdef object Decimal, UUID, SAFE_UUID_UNKNOWN, UTC, TypeLoaders, Transformer, TEXT_FORMAT
cdef object C_FLOAT, psycopg_default_loaders, own_loaders
cdef object DECLINE = object()  # a loader's "not mine: ask the Python loaders"

# `Change` is a frozen dataclass with slots, whose __init__ pays for each field: the kernels
# fill the slots of a new object directly (the offsets are checked against the class first).
CHANGE_FIELDS = ("operation", "table", "new", "old", "key", "position", "committed_at",
                 "transaction", "snapshot", "meta", "schema_version")
cdef Py_ssize_t change_offsets[11]
cdef bint change_slots_known = False
cdef enum:
    T_OBJECT_EX = 16  # PyMemberDef.type of a slot holding an object


cdef bint core_bound = False


cdef int bind_core() except -1:
    """What the encoders need too: the core's types, without psycopg."""
    global core_bound, Change, UNCHANGED, INSERT, UPDATE, DELETE, Decimal, UUID
    global SAFE_UUID_UNKNOWN, UTC, change_slots_known, uuid_int_offset, uuid_safe_offset
    if core_bound:
        return 0
    import dataclasses
    import datetime
    import decimal
    import uuid

    from changefeed import change as change_module

    Change = change_module.Change
    UNCHANGED = change_module.UNCHANGED
    INSERT = change_module.Operation.INSERT
    UPDATE = change_module.Operation.UPDATE
    DELETE = change_module.Operation.DELETE
    Decimal = decimal.Decimal
    UUID = uuid.UUID
    SAFE_UUID_UNKNOWN = uuid.SafeUUID.unknown
    UTC = datetime.timezone.utc

    uuid_int_offset = slot_offset(UUID, "int")
    uuid_safe_offset = slot_offset(UUID, "is_safe")
    if uuid_int_offset < 0 or uuid_safe_offset < 0:
        uuid_int_offset = uuid_safe_offset = -1

    fields = tuple(field.name for field in dataclasses.fields(Change))
    change_slots_known = fields == CHANGE_FIELDS and set(Change.__slots__) == set(fields)
    for i, name in enumerate(CHANGE_FIELDS):
        change_offsets[i] = slot_offset(Change, name) if change_slots_known else -1
        if change_offsets[i] < 0:
            change_slots_known = False
    core_bound = True
    return 0


cdef bint bind_position() except -1:
    """Bind `PgPosition` if its module is loaded (a position unpickled in a worker process);
    True if bound. Without it nothing holds one."""
    global PgPosition
    if PgPosition is None:
        import sys

        module = sys.modules.get("changefeed.backends.postgres.position")
        if module is not None:
            PgPosition = module.PgPosition
    return PgPosition is not None


cdef int bind_python() except -1:
    """What the decoder needs: the core's types, psycopg's and the PostgreSQL backend's."""
    global bound, Message, Begin, Commit, DecodeError, pg_timestamp
    global PostgresText, NonFiniteFloat, TypeLoaders, Transformer, TEXT_FORMAT, C_FLOAT
    global psycopg_default_loaders, own_loaders, JsonDecimal, json_parser, PgPosition
    if bound:
        return 0
    bind_core()
    from psycopg import postgres
    from psycopg.adapt import AdaptersMap
    from psycopg.adapt import Transformer as transformer_class
    from psycopg.pq import Format

    from changefeed.backends.postgres import loading, pgoutput, protocol, values
    from changefeed.backends.postgres.position import PgPosition as position_class
    from changefeed.errors import DecodeError as decode_error
    from changefeed.message import Message as message_class

    Message = message_class
    PgPosition = position_class
    Begin = pgoutput.Begin
    Commit = pgoutput.Commit
    DecodeError = decode_error
    pg_timestamp = protocol.pg_timestamp
    PostgresText = values.PostgresText
    NonFiniteFloat = values.NonFiniteFloat
    JsonDecimal = values.JsonDecimal
    json_parser = JsonParser()
    TypeLoaders = loading.TypeLoaders
    Transformer = transformer_class
    TEXT_FORMAT = Format.TEXT
    C_FLOAT = loading._C_FLOAT
    own_loaders = loading._OWN_LOADERS
    # psycopg's loaders as registered by psycopg itself: a kernel loader stands in for one of
    # them only where the decoder's adapters still use it (a connection may register others).
    psycopg_default_loaders = AdaptersMap(types=postgres.types)
    postgres.register_default_adapters(psycopg_default_loaders)
    bound = True
    return 0


cdef Py_ssize_t slot_offset(object cls, str name) except -2:
    """Where instances of ``cls`` hold the slot ``name`` (an object), or -1 if not a slot."""
    import types

    descriptor = cls.__dict__.get(name)
    if type(descriptor) is not types.MemberDescriptorType:
        return -1
    member = (<PyMemberDescrObject*>descriptor).d_member
    if member.type != T_OBJECT_EX:
        return -1
    return member.offset


cdef inline void set_slot(object obj, Py_ssize_t offset, object value) noexcept:
    Py_INCREF(value)
    (<PyObject**>((<char*><PyObject*>obj) + offset))[0] = <PyObject*>value


cdef inline object change_field(object change, int field):
    """Field number ``field`` (in CHANGE_FIELDS' order) of a `Change` (exactly that class)."""
    if not change_slots_known:
        return getattr(change, CHANGE_FIELDS[field])
    return <object>(<PyObject**>((<char*><PyObject*>change) + change_offsets[field]))[0]


cdef object new_change(object operation, object table, object new, object old, object key,
                       object position, object committed_at, object transaction,
                       object schema_version):
    """``Change(operation, table, new, old, key, position, committed_at, transaction, False,
    None, schema_version)``, without the cost of its __init__."""
    if not change_slots_known:
        return Change(operation, table, new, old, key, position, committed_at, transaction,
                      False, None, schema_version)
    change = PyType_GenericAlloc(<PyTypeObject*>Change, 0)
    set_slot(change, change_offsets[0], operation)
    set_slot(change, change_offsets[1], table)
    set_slot(change, change_offsets[2], new)
    set_slot(change, change_offsets[3], old)
    set_slot(change, change_offsets[4], key)
    set_slot(change, change_offsets[5], position)
    set_slot(change, change_offsets[6], committed_at)
    set_slot(change, change_offsets[7], transaction)
    set_slot(change, change_offsets[8], False)
    set_slot(change, change_offsets[9], None)
    set_slot(change, change_offsets[10], schema_version)
    return change
