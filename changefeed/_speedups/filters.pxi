# A row filter (``--where``, a Snorky filter: `changefeed.pipelines.filters`) evaluated on a
# row's values as the direct path decodes them, so that a run with only ``--where`` needs no
# Python call per change. Each answer is the one `compile_filter`'s predicate gives for
# ``change.row``: the same values (the kernel's loaders, or the Python ones), the same Python
# comparisons (a TypeError is no match); whatever it cannot be sure of (another exception, a
# value not sent) it leaves to that predicate (UNDECIDED).

from cpython.object cimport Py_EQ, Py_GE, Py_GT, Py_LE, Py_LT, PyObject_RichCompare

cdef extern from "Python.h":
    int PyObject_IsTrue(object value) except? -1
    bint PyErr_ExceptionMatches(object kind)
    void PyErr_Clear()

cdef enum:
    NODE_COMPARE = 0
    NODE_AND = 1
    NODE_OR = 2
    NODE_NOT = 3
    UNDECIDED = -1

COMPARISON_OPS = {"==": Py_EQ, "<": Py_LT, "<=": Py_LE, ">": Py_GT, ">=": Py_GE}
cdef object MISSING = object()  # a field the row does not have
cdef object mapping_class = None  # collections.abc.Mapping, bound on first use


@cython.final
cdef class FilterNode:
    """One part of a filter, for the columns of one relation."""

    cdef int kind, op
    cdef Py_ssize_t column  # the row's column the field starts at (-1: none: never a match)
    cdef tuple path  # the rest of a dotted field name: keys into nested JSON
    cdef object value
    cdef list children


cdef FilterNode compile_filter_node(object spec, dict columns):
    """The node of ``spec`` (checked by `compile_filter` already) for a relation whose column
    names map to their indexes in ``columns``."""
    cdef FilterNode node = FilterNode.__new__(FilterNode)
    op = spec[0]
    if op in COMPARISON_OPS:
        node.kind = NODE_COMPARE
        node.op = COMPARISON_OPS[op]
        parts = spec[1].split(".")
        node.column = columns.get(parts[0], -1)
        node.path = tuple(parts[1:])
        node.value = spec[2]
        return node
    node.kind = NODE_AND if op == "and" else (NODE_OR if op == "or" else NODE_NOT)
    node.children = [compile_filter_node(part, columns) for part in spec[1:]]
    return node


@cython.final
cdef class RowMatcher:
    """A filter evaluated on the tuple a `RelationPlan` parsed last (its ``starts``)."""

    cdef FilterNode root
    cdef RelationPlan plan
    cdef list values  # per column: its value in the row at hand, once loaded (None: not yet)
    cdef const unsigned char* data
    cdef bint key_only  # the row is a delete's old key: the other columns are missing

    def __cinit__(self, spec, RelationPlan plan):
        global mapping_class
        if mapping_class is None:
            from collections.abc import Mapping

            mapping_class = Mapping
        self.plan = plan
        self.root = compile_filter_node(spec, {name: i for i, name in enumerate(plan.columns)})
        self.values = [None] * plan.count

    cdef int matches(self, const unsigned char* data, bint key_only) except -2:
        """1 if the row matches, 0 if not, UNDECIDED for the Python predicate to say."""
        cdef Py_ssize_t i
        for i in range(len(self.values)):
            self.values[i] = None
        self.data = data
        self.key_only = key_only
        return self.evaluate(self.root)

    cdef int evaluate(self, FilterNode node) except -2:
        cdef int verdict, result
        cdef FilterNode child
        if node.kind == NODE_COMPARE:
            return self.compare(node)
        if node.kind == NODE_NOT:
            verdict = self.evaluate(<FilterNode>node.children[0])
            return verdict if verdict == UNDECIDED else 1 - verdict
        # and/or stop at the first part that decides, as all() and any() do; a part that
        # cannot be decided before it leaves the whole to Python
        for child in node.children:
            verdict = self.evaluate(child)
            if verdict == UNDECIDED:
                return UNDECIDED
            if verdict == (0 if node.kind == NODE_AND else 1):
                return verdict
        return 1 if node.kind == NODE_AND else 0

    cdef object column_value(self, Py_ssize_t i):
        """Column ``i``'s value as the decoder loads it; MISSING where the row lacks it."""
        value = self.values[i]
        if value is not None:
            return value
        cdef RelationPlan plan = self.plan
        cdef Py_ssize_t start = plan.starts[i], j
        if self.key_only:
            for j in range(plan.key_count):
                if plan.key_indexes[j] == i:
                    break
            else:
                value = MISSING
        if value is None:
            if start == -2:  # an unchanged TOASTed value (the line went through a Change)
                value = UNCHANGED
            elif start < 0:
                value = NULL_VALUE
            else:
                value = DECLINE
                if plan.kinds[i] != KIND_PYTHON:
                    value = load_value(plan.kinds[i], <const char*>self.data + start,
                                       plan.lengths[i])
                if value is DECLINE:
                    value = plan.python_value(i, <const char*>self.data + start,
                                              plan.lengths[i])
        self.values[i] = value
        return value

    cdef int compare(self, FilterNode node) except -2:
        if node.column < 0:
            return 0
        found = self.column_value(node.column)
        if found is MISSING:
            return 0
        if found is NULL_VALUE:
            found = None
        for part in node.path:
            if type(found) is dict:
                found = (<dict>found).get(part, MISSING)
            elif isinstance(found, mapping_class):
                try:
                    found = found.get(part, MISSING)
                except Exception:
                    return UNDECIDED
            else:
                return 0
            if found is MISSING:
                return 0
        try:
            result = PyObject_RichCompare(found, node.value, node.op)
            return PyObject_IsTrue(result)
        except TypeError:  # "a" < 1: no match (Snorky's rule)
            return 0
        except Exception:  # for the Python predicate to raise where it would
            return UNDECIDED


cdef object NULL_VALUE = object()  # a column's SQL NULL (its value: None) while loaded


# The same filter on the rows of `Change` objects a pipeline's ``--where`` stage gets: a batch
# judged in one call (`RowFilter.each`), each answer the one `compile_filter`'s predicate gives
# for ``change.row or {}``.

@cython.final
cdef class RowFieldNode:
    """One part of a filter, reading fields of a row dict by name."""

    cdef int kind, op
    cdef object first  # the dotted field's first name: a key of the row
    cdef tuple path  # the rest: keys into nested mappings
    cdef object value
    cdef list children


cdef RowFieldNode compile_row_node(object spec):
    cdef RowFieldNode node = RowFieldNode.__new__(RowFieldNode)
    op = spec[0]
    if op in COMPARISON_OPS:
        node.kind = NODE_COMPARE
        node.op = COMPARISON_OPS[op]
        parts = spec[1].split(".")
        node.first = parts[0]
        node.path = tuple(parts[1:])
        node.value = spec[2]
        return node
    node.kind = NODE_AND if op == "and" else (NODE_OR if op == "or" else NODE_NOT)
    node.children = [compile_row_node(part) for part in spec[1:]]
    return node


cdef object truncate_class = None  # changefeed.change.Truncate, bound on first use


@cython.final
cdef class RowFilter:
    """A filter (checked by `compile_filter` already) judging the rows of a batch of changes;
    ``stage`` (the `RowWhere` in Python) answers for what it cannot be sure of: an item that
    is not exactly a `Change`, a row that is not a dict, a comparison raising another error
    than TypeError (the stage raises it where it would)."""

    cdef RowFieldNode root
    cdef object stage

    def __cinit__(self, spec, stage):
        global mapping_class, truncate_class
        bind_core()
        if mapping_class is None or truncate_class is None:
            from collections.abc import Mapping

            from changefeed.change import Truncate

            mapping_class = Mapping
            truncate_class = Truncate
        self.root = compile_row_node(spec)
        self.stage = stage

    def each(self, list items):
        """Each item if the stage keeps it, else None."""
        cdef list kept = [None] * len(items)
        cdef Py_ssize_t i
        cdef int verdict
        cdef object empty = {}
        for i in range(len(items)):
            item = items[i]
            cls = type(item)
            if cls is Change and change_slots_known:
                row = change_field(item, 2)
                if row is None:
                    row = change_field(item, 3)
                    if row is None:
                        row = empty
                verdict = self.evaluate(self.root, row) if type(row) is dict else UNDECIDED
            elif cls is truncate_class:
                verdict = 1  # a filter on rows keeps a table's truncate
            else:
                verdict = UNDECIDED
            if verdict == 1:
                kept[i] = item
            elif verdict == UNDECIDED:
                kept[i] = self.stage(item)
        return kept

    cdef int evaluate(self, RowFieldNode node, dict row) except -2:
        cdef int verdict
        cdef RowFieldNode child
        if node.kind == NODE_COMPARE:
            return self.compare(node, row)
        if node.kind == NODE_NOT:
            verdict = self.evaluate(<RowFieldNode>node.children[0], row)
            return verdict if verdict == UNDECIDED else 1 - verdict
        for child in node.children:
            verdict = self.evaluate(child, row)
            if verdict == UNDECIDED:
                return UNDECIDED
            if verdict == (0 if node.kind == NODE_AND else 1):
                return verdict
        return 1 if node.kind == NODE_AND else 0

    cdef int compare(self, RowFieldNode node, dict row) except -2:
        try:
            found = row.get(node.first, MISSING)
        except Exception:
            return UNDECIDED
        if found is MISSING:
            return 0
        for part in node.path:
            if type(found) is dict:
                found = (<dict>found).get(part, MISSING)
            elif isinstance(found, mapping_class):
                try:
                    found = found.get(part, MISSING)
                except Exception:
                    return UNDECIDED
            else:
                return 0
            if found is MISSING:
                return 0
        try:
            result = PyObject_RichCompare(found, node.value, node.op)
            return PyObject_IsTrue(result)
        except TypeError:  # "a" < 1: no match (Snorky's rule)
            return 0
        except Exception:  # for the Python predicate to raise where it would
            return UNDECIDED
