"""Typed rows: a table's changes as events whose ``old`` and ``new`` are model instances.

pgpubsub's ``TriggerChannel`` hands listeners ``old`` / ``new`` model objects; `typed(Model)` does
the same for a feed's changes, with any class taking keyword arguments (a dataclass, an attrs or
pydantic model, a plain class)::

    @dataclass
    class Task:
        id: int
        title: str
        done: bool = False

    Pipeline(feed, [typed(Task), handle], sink=sink)   # handle gets TypedChange[Task] events

How columns meet fields (the model's dataclass fields, else its constructor's parameters):

=======================  ==============================  =====================================
the row has              ``strict=True`` (default)       ``strict=False``
=======================  ==============================  =====================================
a column with no field   `TypedRowError`                 left out (passed when the model takes
                                                         ``**kwargs``)
no column for a field    `TypedRowError` when the field  the field's default, or None when it
                         has no default, else default    has none
``UNCHANGED`` (a TOASTed `TypedRowError` (REPLICA         the field gets the `UNCHANGED`
value PostgreSQL did     IDENTITY FULL sends it)          sentinel (never a made-up value)
not resend)
=======================  ==============================  =====================================

So a strict pipeline stops (or dead-letters the change) when a migration adds or drops a column
the model does not know yet, and a lenient one goes on. ``old`` is built when the source sent the
whole old row (PostgreSQL's REPLICA IDENTITY FULL); when it sent only the key columns it is None
and the key is in ``key``: a model filled up with made-up values would lie.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from changefeed.change import UNCHANGED, Change, Operation, Position
from changefeed.errors import ChangefeedError

M = TypeVar("M")


class TypedRowError(ChangefeedError):
    """A row does not fit the model (strict mode), or the model refused it."""

    exit_code = 5


@dataclass(frozen=True)
class TypedChange(Generic[M]):
    """A change whose rows are model instances; ``change`` is the original `Change`."""

    operation: Operation
    table: str
    new: M | None
    old: M | None
    key: dict[str, Any] | None
    position: Position
    change: Change


class Typed(Generic[M]):
    """The stage `typed` makes: changes of ``model``'s table as `TypedChange` events."""

    def __init__(
        self, model: type[M], *, strict: bool = True, table: str | None = None
    ) -> None:
        self.model = model
        self.strict = strict
        self.table = table
        self.fields, self.required, self.any_keyword = _signature(model)

    @property
    def name(self) -> str:
        return f"typed({self.model.__name__})"

    def __call__(self, item: Any) -> Any:
        if item.__class__ is not Change or (self.table is not None and item.table != self.table):
            return item
        new = self.build(item.new, item) if item.new is not None else None
        old = None
        if item.old is not None and not self._key_only(item):
            old = self.build(item.old, item)
        return TypedChange(item.operation, item.table, new, old, item.key, item.position, item)

    def build(self, row: dict[str, Any], change: Change) -> M:
        """``row`` as a model instance, by the rules of the module docstring."""
        where = f"{change.table} at position {change.position!r}"
        unknown = [column for column in row if column not in self.fields]
        missing = [name for name in self.required if name not in row]
        unchanged = [column for column, value in row.items() if value is UNCHANGED]
        if self.strict:
            problems = []
            if unknown and not self.any_keyword:
                problems.append(f"column(s) {', '.join(unknown)} are not fields of"
                                f" {self.model.__name__}")
            if missing:
                problems.append(f"field(s) {', '.join(missing)} have no column")
            if unchanged:
                problems.append(
                    f"column(s) {', '.join(unchanged)} are unchanged TOASTed values PostgreSQL"
                    " did not resend (ALTER TABLE ... REPLICA IDENTITY FULL sends them)"
                )
            if problems:
                raise TypedRowError(f"{where}: {'; '.join(problems)} (or use strict=False)")
        arguments = row if self.any_keyword or not unknown else {
            column: value for column, value in row.items() if column in self.fields
        }
        if missing:  # lenient: None where there is no default
            arguments = {**arguments, **dict.fromkeys(missing)}
        try:
            return self.model(**arguments)
        except Exception as exc:
            raise TypedRowError(
                f"{where}: {self.model.__name__} refused the row: {type(exc).__name__}: {exc}"
            ) from exc

    def _key_only(self, change: Change) -> bool:
        """Whether ``old`` holds only key columns and the model has more fields."""
        old, key = change.old, change.key
        return (
            old is not None and key is not None and old.keys() <= key.keys()
            and not self.fields <= old.keys()
        )


def typed(model: type[M], *, strict: bool = True, table: str | None = None) -> Typed[M]:
    """A stage turning changes into `TypedChange` events of ``model`` (see the module docstring).

    Args:
        model: a class taking the row's columns as keyword arguments.
        strict: refuse rows that do not fit the model exactly (else adapt them).
        table: convert only this table's changes (qualified, ``public.tasks``); others, and
            anything that is not a change, pass through. Default: every change.
    """
    return Typed(model, strict=strict, table=table)


def _signature(model: type) -> tuple[frozenset[str], tuple[str, ...], bool]:
    """(field names, names without a default, whether any keyword is accepted)."""
    if dataclasses.is_dataclass(model):
        fields = [f for f in dataclasses.fields(model) if f.init]
        required = tuple(
            f.name for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        return frozenset(f.name for f in fields), required, False
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"typed() needs a class taking keyword arguments: {exc}") from exc
    keywords = [p for p in parameters
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    required = tuple(p.name for p in keywords if p.default is p.empty)
    return frozenset(p.name for p in keywords), required, any_keyword
