"""Checkpoint stores: where a feed keeps the last position its consumer acknowledged.

A store maps a feed id to one position. `MemoryCheckpoint` is for tests and for backends
that keep their own progress (a PostgreSQL slot remembers its confirmed position on the
server); `FileCheckpoint` survives crashes: it writes a temporary file, fsyncs it and
renames it over the old one, so a reader sees either the old or the new position, never half;
a save that fails (a full disk) raises `CheckpointError` and leaves the last saved positions
(a directory that is missing or not writable is a `ConfigurationError`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Protocol

import orjson

from changefeed.change import Position
from changefeed.errors import ChangefeedError, ConfigurationError
from changefeed.linefiles import describe_os_error

_SETUP_ERRORS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EISDIR})


class CheckpointError(ChangefeedError):
    """A checkpoint could not be saved (a full disk, a quota, an I/O error): the run stops, since
    it could no longer record what it delivered."""


class CheckpointStore(Protocol):
    """Where acknowledged positions are kept between runs."""

    def load(self, feed_id: str) -> Position | None:
        """The last saved position of ``feed_id``, or None when there is none."""

    def save(self, feed_id: str, position: Position) -> None:
        """Remember ``position`` as the last acknowledged one of ``feed_id``."""


class MemoryCheckpoint:
    """A checkpoint store in a dict: lost with the process."""

    def __init__(self) -> None:
        self.positions: dict[str, Position] = {}

    def load(self, feed_id: str) -> Position | None:
        return self.positions.get(feed_id)

    def save(self, feed_id: str, position: Position) -> None:
        self.positions[feed_id] = position

    def __repr__(self) -> str:
        return f"MemoryCheckpoint({self.positions!r})"


class FileCheckpoint:
    """A checkpoint store in one JSON file, replaced atomically and fsynced on every save."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._positions = self._read()

    def _read(self) -> dict[str, Position]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigurationError(f"cannot read checkpoint {self.path}: {exc.strerror}") from exc
        try:
            positions = orjson.loads(data) if data.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise ConfigurationError(f"checkpoint {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(positions, dict):
            raise ConfigurationError(f"checkpoint {self.path} does not hold a JSON object")
        return positions

    def load(self, feed_id: str) -> Position | None:
        return self._positions.get(feed_id)

    def save(self, feed_id: str, position: Position) -> None:
        """Write every position to a temporary file, fsync it, rename it over the file, fsync
        the directory. Raises `CheckpointError` (one line) if any step fails (a full disk, a
        quota, an I/O error): the file then still holds the positions of the last save."""
        previous = dict(self._positions)
        self._positions[feed_id] = position
        try:
            self._write(orjson.dumps(self._positions,
                                     option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        except OSError as exc:
            self._positions = previous
            if exc.errno in _SETUP_ERRORS:  # a directory missing or not ours: fix and rerun
                raise ConfigurationError(
                    f"cannot write checkpoint {self.path}: {exc.strerror}") from exc
            raise CheckpointError(
                f"cannot save checkpoint {self.path}: {describe_os_error(exc)}; it keeps the"
                " last position saved, and what came after it comes again on the next run"
            ) from exc

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename itself is only durable once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __repr__(self) -> str:
        return f"FileCheckpoint({str(self.path)!r})"
