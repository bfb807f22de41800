"""Fakes at pymongo's driver-cursor boundary, and real pymongo errors, for the offline tests.

A `FakeCollection` scripts what ``watch(**kwargs)`` returns: a stream with ``try_next()``,
``resume_token`` and ``close()`` that replays change events in the shapes MongoDB sends (and
raises the exceptions scripted among them). It records every watch() and find() call. It does
not pretend to be a database: the live tests (test_mongodb_live.py) cover a real server.
"""

from __future__ import annotations

from pymongo.errors import OperationFailure


def failure(code: int, message: str = "boom", labels: list[str] | None = None,
            name: str | None = None) -> OperationFailure:
    """A server error as pymongo raises it (``details`` as the server sent them)."""
    details: dict = {"ok": 0, "errmsg": message, "code": code}
    if labels:
        details["errorLabels"] = labels
    if name:
        details["codeName"] = name
    return OperationFailure(message, code=code, details=details)


def token(n: int) -> dict:
    return {"_data": f"8265{n:06d}"}


def event(n: int, operation_type: str = "insert", key: int = 1, **fields) -> dict:
    document = {"_id": key, "n": n}
    result = {
        "_id": token(n),
        "operationType": operation_type,
        "ns": {"db": "app", "coll": "tasks"},
        "documentKey": {"_id": key},
        **fields,
    }
    if operation_type in ("insert", "update", "replace"):
        result["fullDocument"] = document
    if operation_type == "update":
        result["updateDescription"] = {"updatedFields": {"n": n}, "removedFields": []}
    return result


class PostBatch:
    """A getMore that returned nothing but moved the stream's postBatchResumeToken."""

    def __init__(self, n: int) -> None:
        self.token = token(n)


class FakeStream:
    """pymongo's ChangeStream as the feed uses it: try_next(), resume_token, close()."""

    def __init__(self, script: list, opened_at: dict | None) -> None:
        self.script = list(script)
        self.resume_token = opened_at
        self.closed = False

    def try_next(self):
        if not self.script:
            return None  # an empty getMore after maxAwaitTimeMS
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, PostBatch):
            self.resume_token = item.token
            return None
        if item is not None:
            self.resume_token = item["_id"]
        return item

    def close(self) -> None:
        self.closed = True


class FakeDatabase:
    name = "app"

    def __init__(self, collections: list[str]) -> None:
        self.collections = collections

    def list_collection_names(self, filter=None):  # noqa: A002 - pymongo's name
        return [name for name in self.collections if name == (filter or {}).get("name", name)]


class FakeCollection:
    """Scripts one stream per watch() call (or raises the exception given instead)."""

    name = "tasks"

    def __init__(self, *scripts, documents=(), exists=True, opened_at=None) -> None:
        self.scripts = list(scripts)
        self.documents = list(documents)
        self.opened_at = opened_at
        self.database = FakeDatabase(["tasks"] if exists else [])
        self.watches: list[dict] = []
        self.streams: list[FakeStream] = []
        self.finds: list[dict] = []

    def watch(self, **kwargs):
        self.watches.append(kwargs)
        script = self.scripts.pop(0) if self.scripts else []
        if isinstance(script, BaseException):
            raise script
        # Like pymongo: the token it was started from, until the server gives a newer one.
        started_from = kwargs.get("start_after") or kwargs.get("resume_after")
        stream = FakeStream(script, self.opened_at or started_from)
        self.streams.append(stream)
        return stream

    def find(self, **kwargs):
        self.finds.append(kwargs)
        return iter([dict(document) for document in self.documents])

