"""Errors raised by changefeed.

One small tree, so callers can catch at the depth they care about::

    ChangefeedError                 anything changefeed raises on purpose
     ├── ConfigurationError         bad input: unknown operation, bad URL, missing table, ...
     ├── BackendError               the database or its driver failed
     │    ├── TransientBackendError   worth retrying: connection dropped, server restarting
     │    └── PermanentBackendError   retrying cannot help: no privilege, wal_level, slot in use
     │         └── DecodeError          the source sent what changefeed cannot read
     ├── ResumeError                the saved position cannot be resumed (history lost)
     └── PipelineError              a stage or sink failed while handling a change

Every error carries only its message in ``args`` so it pickles across process boundaries
(multipipes moves errors between processes); the driver's exception stays reachable as
``__cause__`` in the process that raised it. ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations


class ChangefeedError(Exception):
    """Base class of every error changefeed raises on purpose."""

    exit_code = 1

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigurationError(ChangefeedError):
    """The caller asked for something that cannot work: fix the input and run again."""

    exit_code = 2


class BackendError(ChangefeedError):
    """The database or its driver failed."""

    exit_code = 3


class TransientBackendError(BackendError):
    """A failure that reconnecting may cure (connection lost, server restarting)."""


class PermanentBackendError(BackendError):
    """A failure that reconnecting cannot cure (missing privilege, wrong server setting)."""


class DecodeError(PermanentBackendError):
    """The source sent something changefeed cannot decode (an unknown message type, a row
    that does not match its table's description): reconnecting would read it again."""


class ResumeError(ChangefeedError):
    """The feed cannot continue from its saved position without losing changes."""

    exit_code = 4


class PipelineError(ChangefeedError):
    """A pipeline stage or sink raised while handling a change."""

    exit_code = 5


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (drivers' messages run over several), or the name of
    its type when it has none: what one-line error messages quote."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
