"""Files of JSON lines that only ever hold whole lines: a sink file, a dead-letter file, stdout
redirected to a file.

A run can stop in the middle of a write (a full disk, ``kill -9``, a crash), leaving a partial
line at the end of the file; appending to it would glue the next change onto it, making one
invalid line of two. So:

* `append_whole` writes a batch of lines in full or not at all: if a write fails part-way
  (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EIO``...), the file is cut back to where the batch began;
* `cut_partial_line`, run when a file is opened for appending, removes a partial last line that a
  killed process left behind (what it held was never confirmed, so it comes again).

Both hold an exclusive ``flock`` on the file while they look at its end and change it, so that
processes appending to one file never cut each other's lines (they all lock: a batch is one
locked append). A partial line is always one that no reader was told about: a batch counts as
delivered only once `append_whole` returned.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # Windows: no flock; a file there has one writer
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("changefeed")

_TAIL_STEP = 1 << 16


def is_regular_file(fd: int) -> bool:
    """Whether ``fd`` is a regular file (not a pipe, a terminal, a socket or a device)."""
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the system's words and the code's name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _appending(fd: int) -> bool:
    if fcntl is None:
        return False
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)


def _readable(fd: int) -> int | None:
    """``fd`` if it can be read, else the same file opened again for reading (a stdout
    redirected with ``>>`` is write-only), else None."""
    if fcntl is None or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
        return fd
    try:
        return os.open(f"/dev/fd/{fd}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just after the last newline among the first ``size`` bytes (0: none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_STEP)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def cut_partial_line(fd: int, name: str) -> int:
    """If the regular file open on ``fd`` ends with a partial line, cut it off (and say so in
    one warning naming the file ``name``); returns the number of bytes cut. A file that the
    descriptor does not write at its end (opened without append, positioned elsewhere) is left
    alone."""
    if not is_regular_file(fd):
        return 0
    with _locked(fd):
        size = os.fstat(fd).st_size
        appending = _appending(fd)
        if size == 0 or not (appending or os.lseek(fd, 0, os.SEEK_CUR) == size):
            return 0
        reader = _readable(fd)
        if reader is None:  # cannot look (a write-only stdout without /dev/fd): leave it
            return 0
        try:
            keep = _after_last_newline(reader, size)
        finally:
            if reader != fd:
                os.close(reader)
        if keep == size:
            return 0
        os.ftruncate(fd, keep)
        if not appending:
            os.lseek(fd, keep, os.SEEK_SET)
    cut = size - keep
    log.warning("%s ended with a partial line of %d bytes (a run stopped while writing it): cut"
                " off; the change it held was not acknowledged and comes again", name, cut)
    return cut


def append_whole(fd: int, data: bytes | bytearray, *, fsync: bool = False,
                 regular: bool | None = None) -> None:
    """Write all of ``data`` to ``fd``; on a regular file, in full or not at all.

    On a regular file the write happens under an exclusive ``flock`` and, if any part of it
    fails (or ``fsync`` does), the file is cut back to its size before the write and the
    `OSError` is raised. Pipes and terminals are written in full or raise (``BrokenPipeError``
    when the reader went away). ``regular``: whether ``fd`` is a regular file, if known."""
    if regular is None:
        regular = is_regular_file(fd)
    if not regular:
        _write_all(fd, data)
        return
    with _locked(fd):
        size = os.fstat(fd).st_size
        start = size if _appending(fd) else os.lseek(fd, 0, os.SEEK_CUR)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        except OSError:
            if start >= size:  # it wrote at the end: take back what this batch added
                try:
                    os.ftruncate(fd, start)
                    os.lseek(fd, start, os.SEEK_SET)
                except OSError:  # the next open cuts the partial line instead
                    pass
            raise


def _write_all(fd: int, data: bytes | bytearray) -> None:
    written = os.write(fd, data)
    if written < len(data):  # a short write (a pipe, a signal, a disk filling up): go on
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


__all__ = ["append_whole", "cut_partial_line", "describe_os_error", "is_regular_file"]
