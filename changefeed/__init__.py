"""changefeed: database change streams as composable pipelines of deltas.

    >>> from changefeed import get_changefeed, ChangeFeed
    >>> feed = get_changefeed("postgresql://localhost/app", "tasks",
    ...                       ChangeFeed.INSERT | ChangeFeed.UPDATE)   # doctest: +SKIP
    >>> for change in feed:                                             # doctest: +SKIP
    ...     print(change.operation, change.new)
"""

# ``implementation``: "c" where the compiled hot path runs, "python" where the pure-Python code
# does (no extension built, or CHANGEFEED_IMPL=python).
from changefeed._speedups import implementation
from changefeed.change import ALL, UNCHANGED, Change, Operation, Position, SnapshotState
from changefeed.checkpoint import CheckpointStore, FileCheckpoint, MemoryCheckpoint
from changefeed.delivery import FeedStats
from changefeed.errors import (
    BackendError,
    ChangefeedError,
    ConfigurationError,
    PermanentBackendError,
    PipelineError,
    ResumeError,
    TransientBackendError,
)
from changefeed.feed import ChangeFeed
from changefeed.message import Message
from changefeed.registry import get_changefeed
from changefeed.retry import Retry

INSERT = Operation.INSERT
DELETE = Operation.DELETE
UPDATE = Operation.UPDATE

__all__ = [
    "ALL",
    "DELETE",
    "INSERT",
    "UNCHANGED",
    "UPDATE",
    "BackendError",
    "Change",
    "ChangeFeed",
    "ChangefeedError",
    "CheckpointStore",
    "ConfigurationError",
    "FeedStats",
    "FileCheckpoint",
    "MemoryCheckpoint",
    "Message",
    "Operation",
    "PermanentBackendError",
    "PipelineError",
    "Position",
    "ResumeError",
    "Retry",
    "SnapshotState",
    "TransientBackendError",
    "get_changefeed",
    "implementation",
]
