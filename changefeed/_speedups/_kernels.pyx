# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled kernels of the PostgreSQL hot path (see `changefeed._speedups`).

What `changefeed.backends.postgres.pgoutput`, `tuples` and `stream` do in Python, done in C on
the bytes of each message: the replication stream's frames (`FrameReader`, ``frames.pxi``), the
pgoutput messages (`Decoder`), the TupleData of a row and the loaders of the common types
(`RelationPlan`, ``values.pxi``), the JSON lines of the built-in formats (``jsonwriter.pxi``,
``formats.pxi``) and the direct path's batches of them (`Lines`). Every result is the pure-Python
code's, exactly: a value this code is not sure to load as psycopg and our loaders do (a BC date, ``24:00``, a type it
does not know) goes to those Python loaders, and a value it cannot write as orjson does goes to
orjson. Relation messages, truncates and the rarer cases are handed to the Python decoder.

The pieces are included as one extension module (as asyncpg does): one import, and calls
between them stay C calls.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport date_new, datetime_new, import_datetime, time_new
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

import_datetime()

include "binary.pxi"
include "python_side.pxi"
include "frames.pxi"
include "values.pxi"
include "json_values.pxi"
include "jsonwriter.pxi"
include "direct.pxi"
include "rows.pxi"
include "filters.pxi"
include "entries.pxi"
include "formats.pxi"
include "decoder.pxi"
include "copy.pxi"
