# The pgoutput messages: `Decoder.decode` is `PgOutputDecoder.decode`, compiled. The Python
# decoder it belongs to keeps the relations (Relation messages go to it), the options and the
# truncates; this keeps the transaction's state and decodes the row changes and messages.

cdef enum:
    LINES_NONE = 0
    LINES_DELTA = 1
    LINES_CHANGE = 2


cdef enum:
    BATCH_BYTES = 65536  # a batch of lines ends past this many bytes (memory stays flat)
    HAND_OUT = 1  # `Decoder.encode_row`: this change goes out as a `Change`


@cython.final
cdef class Decoder:
    """The compiled `decode` and `next_position` of one `PgOutputDecoder` (``python``)."""

    cdef object python, loaders
    cdef dict relations, plans
    cdef uint32_t last_oid  # the relation of the last row change, and its plan
    cdef RelationPlan last_plan
    cdef bint insert_wanted, update_wanted, delete_wanted, in_transaction
    cdef uint64_t final_lsn, index
    cdef object committed_at, xid
    cdef uint64_t begin_timestamp  # committed_at as sent: the Commit's is the same
    cdef tuple message_prefixes
    # The change lines' parts common to a transaction (made at its first line): up to the
    # position's index, and from after it to the snapshot flag
    cdef bytes transaction_position, transaction_tail
    # The direct path (`encode`): which lines, the encoders of the changes it leaves to them,
    # where more row changes come from, and which were delivered before
    cdef int line_format
    cdef DeltaEncoder delta_encoder
    cdef ChangeEncoder change_encoder
    cdef JsonWriter out, old_row
    cdef FrameReader frames
    cdef object where  # a row filter (Snorky's list form) the lines are kept by, or None
    cdef bint skipping
    cdef uint64_t skip_lsn, skip_index

    @staticmethod
    def for_decoder(decoder):
        """The kernel of ``decoder``, or None where its options need the Python code (a loader
        factory other than `TypeLoaders`, whose loaders the kernel knows)."""
        bind_python()
        if type(decoder.loaders) is not TypeLoaders:
            return None
        return Decoder(decoder)

    def __cinit__(self, python):
        bind_python()
        self.python = python
        self.loaders = python.loaders
        self.relations = python.relations
        self.plans = {}
        self.insert_wanted = python._insert_wanted
        self.update_wanted = python._update_wanted
        self.delete_wanted = python._delete_wanted
        self.message_prefixes = tuple(python.message_prefixes)
        self.in_transaction = False
        self.final_lsn = 0
        self.index = 0
        self.committed_at = None
        self.xid = None
        self.line_format = LINES_NONE

    def set_line_format(self, fmt, model=None, frames=None, replay_after=None, where=None):
        """Make `encode` write the lines of ``fmt``: ``"delta"`` (with ``model`` as for
        `delta_line_encoder`) or ``"change"``. ``frames`` (a `FrameReader`): take the row
        changes that follow at hand from there into the same batch. ``replay_after`` (a
        `PgPosition`): leave out the changes at or before it (delivered before). ``where`` (a
        Snorky filter, checked): a change whose row does not match it gets no line (it still
        counts in its batch, as a change handled); one the kernel cannot judge comes as its
        `Change`, for the caller's own filter."""
        bind_formats()
        for plan in self.plans.values():  # lines of another model, another filter
            (<RelationPlan>plan).delta_start = None
            (<RelationPlan>plan).matcher = None
        self.where = where
        if fmt == "delta":
            self.line_format = LINES_DELTA
            self.delta_encoder = DeltaEncoder(model)
        elif fmt == "change":
            self.line_format = LINES_CHANGE
            self.change_encoder = ChangeEncoder()
        else:
            raise ValueError(f"no direct path for {fmt!r} lines: use delta or change")
        self.out = JsonWriter()
        self.old_row = JsonWriter()
        self.frames = frames
        self.skipping = replay_after is not None
        if self.skipping:
            self.skip_lsn, self.skip_index = replay_after.lsn, replay_after.index

    def encode(self, data):
        """As `decode`, but row changes come as `Lines`: their output lines (`set_line_format`),
        written from the messages' bytes without making `Change` objects (except for rows
        with unchanged TOASTed values), this one and those following it at hand; None when
        none of them is wanted."""
        if self.line_format == LINES_NONE:
            raise ValueError("set_line_format() first")
        if type(data) is not bytes:
            data = bytes(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if size < 1 or not (p[0] == b"I" or p[0] == b"U" or p[0] == b"D"):
            return self.decode(data)
        cdef Lines lines = new_lines(self.final_lsn, self.committed_at)
        cdef JsonWriter out = self.out
        cdef FrameReader frames = self.frames
        cdef uint64_t index = self.index
        out.length = 0  # what a failed call left
        if self.encode_row(lines, p, size) == HAND_OUT:
            self.index = index
            return self.decode(data)  # the change itself, for the caller's filter
        if frames is not None:
            while out.length < BATCH_BYTES and frames.next_row():
                index = self.index
                if self.encode_row(lines, frames.payload, frames.payload_size) == HAND_OUT:
                    self.index = index  # it comes again, first of the next call
                    frames.put_back = True
                    break
        if lines.count == 0 and not lines.any_seen:
            out.length = 0
            return None
        out.hand_over(lines)
        return lines

    cdef int encode_row(self, Lines lines, const unsigned char* p, Py_ssize_t size) except -1:
        """Append the line of the row change at ``p`` to ``lines`` (if wanted, watched and not
        delivered before), as `decode` and the format's encoder would make it; no line if the
        row does not match the filter. HAND_OUT (nothing appended) for a change the filter
        cannot judge here: the caller hands out its `Change`."""
        cdef unsigned char kind = p[0]
        cdef uint64_t index = self.index
        cdef JsonWriter out = self.out
        cdef Py_ssize_t start = out.length
        if not (self.insert_wanted if kind == b"I" else (
                self.update_wanted if kind == b"U" else self.delete_wanted)):
            self.index = index + 1
            return 0
        cdef RelationPlan plan = self.plan(p, size)
        self.index = index + 1
        if plan is None:
            return 0
        if self.skipping and (self.final_lsn < self.skip_lsn or (
                self.final_lsn == self.skip_lsn and index <= self.skip_index)):
            lines.any_seen, lines.seen_index = True, index
            return 0
        cdef int verdict
        if self.write_line(out, plan, p, size, index) == 0:
            if self.where is not None:
                if plan.matcher is None:
                    plan.matcher = RowMatcher(self.where, plan)
                verdict = (<RowMatcher>plan.matcher).matches(p, kind == b"D" and p[5] == b"K")
                if verdict == UNDECIDED:
                    out.length = start
                    return HAND_OUT
                if verdict == 0:
                    out.length = start  # handled, without a line
            lines.any_seen, lines.seen_index = True, index
            return lines.add(out.length, index)
        # Unchanged TOASTed values: through a Change, which knows what to do with them.
        out.length = start
        if self.where is not None:
            return HAND_OUT
        lines.any_seen, lines.seen_index = True, index
        self.index = index
        change = self.insert(p, size) if kind == b"I" else (
            self.update(p, size) if kind == b"U" else self.delete(p, size))
        out.bytes_(self.delta_encoder(change) if self.line_format == LINES_DELTA
                   else self.change_encoder(change))
        return lines.add(out.length, index)

    cdef int write_line(self, JsonWriter out, RelationPlan plan, const unsigned char* p,
                        Py_ssize_t size, uint64_t index) except -1:
        """Write the line of the row change at ``p`` (the ``index``-th of its transaction);
        1 (with part of it written) if it holds unchanged values, else 0."""
        cdef unsigned char kind = p[0], marker = p[5]
        cdef Py_ssize_t offset = 5
        cdef bint has_old = False, old_is_key = False
        cdef JsonWriter old_row = self.old_row
        old_row.length = 0
        if kind == b"U":
            if marker == b"K" or marker == b"O":  # the old key, or the whole old row
                offset = plan.parse_tuple(p, size, offset + 1)
                if plan.any_unchanged:
                    return 1
                has_old, old_is_key = True, marker == b"K"
                plan.write_row(old_row, p, old_is_key)
                if offset >= size:
                    raise DecodeError("update without new tuple")
                marker = p[offset]
            if marker != b"N":
                raise DecodeError(f"update without new tuple ({chr(marker)!r})")
        plan.parse_tuple(p, size, offset + 1)
        if plan.any_unchanged:
            return 1
        if kind == b"D":
            old_is_key = marker == b"K"
        if self.line_format == LINES_DELTA:
            if plan.delta_start is None:
                plan.delta_start = self.delta_encoder.start(plan.table)
            start = plan.delta_start
            if kind == b"U":
                out.bytes_(<bytes>start[2])
                plan.write_row(out, p, False)
                out.raw(b',"oldData":', 11)
                if has_old:
                    out.raw(old_row.data, old_row.length)
                else:
                    plan.write_row(out, p, True)
            else:
                out.bytes_(<bytes>(start[0] if kind == b"I" else start[1]))
                plan.write_row(out, p, kind == b"D" and old_is_key)
            out.raw(b"}\n", 2)
            return 0
        starts = plan.change_starts()
        out.bytes_(<bytes>starts[0 if kind == b"I" else (1 if kind == b"U" else 2)])
        plan.write_row(out, p, True)
        out.raw(b',"new":', 7)
        if kind == b"D":
            out.raw(b"null", 4)
        else:
            plan.write_row(out, p, False)
        out.raw(b',"old":', 7)
        if kind == b"I":
            out.raw(b"null", 4)
        elif kind == b"D":
            plan.write_row(out, p, old_is_key)
        elif has_old:
            out.raw(old_row.data, old_row.length)
        else:
            plan.write_row(out, p, True)
        if self.transaction_position is None:
            self.transaction_parts()
        out.bytes_(self.transaction_position)
        out.hex8(index)
        out.bytes_(self.transaction_tail)
        out.bytes_(plan.change_end)
        return 0

    cdef int transaction_parts(self) except -1:
        """``,"position":"<LSN>:`` and ``","committed_at":..,"transaction":..,"snapshot":false``
        of the transaction's change lines."""
        cdef JsonWriter out = JsonWriter()
        out.raw(b',"position":', 12)
        out.position(self.final_lsn, 0)
        self.transaction_position = out.take()[:12 + 18]  # up to the index's 8 digits
        out.raw(b'","committed_at":', 17)
        out.value(self.committed_at)
        out.raw(b',"transaction":', 15)
        out.value(self.xid)
        out.raw(b',"snapshot":false', 17)
        self.transaction_tail = out.take()
        return 0

    def decode(self, data):
        """Decode one pgoutput message, as `PgOutputDecoder.decode` does."""
        if type(data) is not bytes:
            data = bytes(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if size < 1:
            raise DecodeError("empty pgoutput message")
        cdef unsigned char kind = p[0]
        cdef uint64_t timestamp
        if kind == b"I":
            return self.insert(p, size)
        if kind == b"U":
            return self.update(p, size)
        if kind == b"D":
            return self.delete(p, size)
        if kind == b"B":
            check_size(size, 21, kind)
            self.final_lsn = read_u64(p + 1)
            self.begin_timestamp = read_u64(p + 9)
            self.committed_at = pg_timestamp(<int64_t>self.begin_timestamp)
            self.xid = read_u32(p + 17)
            self.in_transaction = True
            self.index = 0
            self.transaction_position = None
            return Begin(self.final_lsn, self.committed_at, self.xid)
        if kind == b"C":
            check_size(size, 26, kind)
            self.in_transaction = False
            timestamp = read_u64(p + 18)
            return Commit(read_u64(p + 2), read_u64(p + 10),
                          self.committed_at if self.committed_at is not None
                          and timestamp == self.begin_timestamp
                          else pg_timestamp(<int64_t>timestamp))
        if kind == b"R":
            check_size(size, 5, kind)
            self.plans.pop(read_u32(p + 1), None)
            self.last_oid = 0  # no relation has OID 0
            return self.python._relation(data)
        if kind == b"Y" or kind == b"O":  # types, origins: no change
            return None
        if kind == b"T":
            return self.python.decode_truncate(data, self.next_position, self.committed_at,
                                               self.xid)
        if kind == b"M":
            return self.message(data, p, size)
        raise DecodeError(f"unknown pgoutput message type {chr(kind)!r}")

    def next_position(self):
        """The position of one more change in the current transaction (after those decoded)."""
        self.index += 1
        return make_position(self.final_lsn, self.index - 1)

    cdef RelationPlan plan(self, const unsigned char* p, Py_ssize_t size):
        """The plan of the relation whose OID follows the message type; None if that table is
        not watched. Raises `DecodeError` for a relation never described."""
        check_size(size, 6, p[0])
        cdef uint32_t oid = read_u32(p + 1)
        if oid == self.last_oid:
            return self.last_plan if self.last_plan.watched else None
        found = PyDict_GetItem(self.plans, oid)
        if found is not NULL:
            plan = <RelationPlan>found
        else:
            relation = self.relations.get(oid)
            if relation is None:
                raise DecodeError(f"row change for relation {oid} before its Relation message")
            plan = RelationPlan(relation, self.loaders)
            self.plans[oid] = plan
        self.last_oid, self.last_plan = oid, plan
        return plan if plan.watched else None

    cdef object insert(self, const unsigned char* p, Py_ssize_t size):
        cdef uint64_t index = self.index
        self.index = index + 1
        if not self.insert_wanted:
            return None
        cdef RelationPlan plan = self.plan(p, size)
        if plan is None:
            return None
        plan.decode_row(p, size, 6)  # after the OID and 'N'
        return new_change(INSERT, plan.table, plan.row, None, plan.key,
                          make_position(self.final_lsn, index), self.committed_at, self.xid,
                          plan.schema_version)

    cdef object update(self, const unsigned char* p, Py_ssize_t size):
        cdef uint64_t index = self.index
        self.index = index + 1
        if not self.update_wanted:
            return None
        cdef RelationPlan plan = self.plan(p, size)
        if plan is None:
            return None
        cdef Py_ssize_t offset = 5
        cdef unsigned char marker = p[offset]
        old = None
        if marker == b"K" or marker == b"O":  # the old key, or the whole old row
            offset = plan.decode_row(p, size, offset + 1)
            old = plan.key if marker == b"K" else plan.row
            if offset >= size:
                raise DecodeError("update without new tuple")
            marker = p[offset]
        if marker != b"N":
            raise DecodeError(f"update without new tuple ({chr(marker)!r})")
        plan.decode_row(p, size, offset + 1)
        new, key = plan.row, plan.key
        if plan.unchanged is not None and old is not None:
            # Unchanged TOASTed values are absent from the new row; a full old row has them.
            for column in plan.unchanged:
                value = old.get(column, UNCHANGED)
                if value is not UNCHANGED:
                    new[column] = value
            key = {name: new[name] for name in plan.relation.key_names}
        return new_change(UPDATE, plan.table, new, key if old is None else old, key,
                          make_position(self.final_lsn, index), self.committed_at, self.xid,
                          plan.schema_version)

    cdef object delete(self, const unsigned char* p, Py_ssize_t size):
        cdef uint64_t index = self.index
        self.index = index + 1
        if not self.delete_wanted:
            return None
        cdef RelationPlan plan = self.plan(p, size)
        if plan is None:
            return None
        plan.decode_row(p, size, 6)
        old = plan.key if p[5] == b"K" else plan.row  # 'K': only the key columns have values
        return new_change(DELETE, plan.table, None, old, plan.key,
                          make_position(self.final_lsn, index), self.committed_at, self.xid,
                          plan.schema_version)

    cdef object message(self, bytes data, const unsigned char* p, Py_ssize_t size):
        """A logical decoding message: flags (1: transactional), LSN, prefix, content."""
        check_size(size, 11, p[0])
        cdef bint transactional = p[1] & 1
        cdef uint64_t lsn = read_u64(p + 2)
        cdef Py_ssize_t end = data.find(b"\0", 10)
        if end < 0 or end + 5 > size:
            raise DecodeError("message cut short")
        prefix = data[10:end].decode()
        if transactional and self.in_transaction:
            position = make_position(self.final_lsn, self.index)
            self.index += 1
            committed_at, xid = self.committed_at, self.xid
        else:  # see `pgoutput`'s docstring
            position, committed_at, xid = PgPosition(int(lsn) - 1, 0), None, None
        if not self.message_prefixes or not prefix.startswith(self.message_prefixes):
            return None
        length = <int32_t>read_u32(p + end + 1)
        content = data[end + 5:end + 5 + length]
        return Message(prefix, content, position, transactional, committed_at, xid, lsn)


cdef inline int check_size(Py_ssize_t size, Py_ssize_t needed, unsigned char kind) except -1:
    if size < needed:
        raise DecodeError(f"pgoutput message {chr(kind)!r} cut short ({size} bytes)")
    return 0
