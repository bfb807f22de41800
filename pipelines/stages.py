"""Built-in stages: plain callables ``Change -> Change | None | iterable``.

A `Truncate` (a table emptied) goes through the stages too: those that look at rows (`where`,
`project`, `subscription`) pass it on unchanged (every row of the table is gone, whatever a
filter says of rows), `route` sends it through its table's stages, `to_delta` makes a truncate
delta.

A stage returns one item, None to drop the change, or an iterable (anything iterable but a
mapping, str or bytes) for one change becoming several items. Stages are pure: they neither
acknowledge nor deliver, so the same list of stages runs in-process or across processes, and a
test calls them directly. They are small classes rather than closures so they pickle (needed only
when processes are spawned rather than forked) and so error messages can name them.

Each built-in stage is a class (`Where`, `Project`, `ToDelta`, `Route`, `Subscription`) made
by the function a stage list reads best with (`where`, `project`, `to_delta`, `route`,
`subscription`). One entry of a stage list is not a stage but an instruction to the `Pipeline`:
`own_process(stage)` runs that stage (and the ones after it, up to the next mark) in a process
of its own. How items are grouped for the sink is a `Pipeline` setting (``batch_size``,
``batch_seconds``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from changefeed.change import UNCHANGED, Change, Operation, Truncate
from changefeed.errors import ConfigurationError, PipelineError
from changefeed.formats.delta import ToDelta
from changefeed.pipelines.filters import Filter, compile_filter, filter_fields
from changefeed.pipelines.sinks import BatchSink, JsonLine, Sink


class Stage(Protocol):
    """A stage: called with an item (a `Change`, or what the stage before made of it), it
    returns one item, None to drop it, or an iterable of items. A ``name`` attribute, when it
    has one, names it in errors and dead letters."""

    def __call__(self, item: Any, /) -> Any: ...


def stage_name(stage: Any) -> str:
    """How errors name a stage or sink: its ``name``, ``__name__`` or class name."""
    name = getattr(stage, "name", None) or getattr(stage, "__name__", None)
    return str(name) if name else type(stage).__name__


def apply_stage(stage: Stage, item: Any) -> list[Any]:
    """Run ``stage`` on ``item`` and return its output as a list (empty when dropped)."""
    result = stage(item)
    if result is None:
        return []
    if isinstance(result, (Mapping, str, bytes, bytearray, Change)) or not isinstance(
        result, Iterable
    ):
        return [result]
    return list(result)


def run_stages(stages: Sequence[Stage], item: Any) -> list[Any]:
    """Run ``stages`` one after the other, each on every output of the previous one."""
    items = [item]
    for stage in stages:
        if len(items) == 1:
            items = apply_stage(stage, items[0])
        else:
            items = [out for one in items for out in apply_stage(stage, one)]
        if not items:
            break
    return items


class Where:
    """The stage `where` makes: keeps the changes for which ``predicate(change)`` is true."""

    __slots__ = ("predicate",)

    def __init__(self, predicate: Callable[[Change], bool]) -> None:
        self.predicate = predicate

    @property
    def name(self) -> str:
        return f"where({stage_name(self.predicate)})"

    def __call__(self, change: Change | Truncate) -> Change | Truncate | None:
        if isinstance(change, Truncate):
            return change  # a filter on rows keeps a table's truncate
        return change if self.predicate(change) else None


def where(predicate: Callable[[Change], bool]) -> Where:
    """Keep the changes for which ``predicate(change)`` is true; drop the others.

    >>> from changefeed import testing, where
    >>> keep_open = where(lambda change: change.row["status"] == "open")
    >>> keep_open(testing.insert("tasks", {"id": 1, "status": "done"})) is None
    True
    """
    return Where(predicate)


class Project:
    """The stage `project` makes: keeps only ``fields`` of ``new`` and ``old``."""

    __slots__ = ("fields",)

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = tuple(fields)
        if not self.fields:
            raise ConfigurationError("project() needs at least one field")

    @property
    def name(self) -> str:
        return f"project({list(self.fields)})"

    def _keep(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {field: row[field] for field in self.fields if field in row}

    def __call__(self, change: Change | Truncate) -> Change | Truncate:
        if isinstance(change, Truncate):
            return change
        return dataclasses.replace(change, new=self._keep(change.new), old=self._keep(change.old))


def project(fields: Iterable[str]) -> Project:
    """Keep only ``fields`` of the rows (``new`` and ``old``); list the key if clients need it.

    >>> from changefeed import project, testing
    >>> project(["id", "title"])(testing.insert("tasks", {"id": 1, "title": "a", "b": "c"})).new
    {'id': 1, 'title': 'a'}
    """
    return Project(fields)


def to_delta(model: str | Mapping[str, str] | None = None) -> ToDelta:
    """Turn a change into its Snorky delta (`changefeed.formats.delta.ToDelta`).

    Inserts and deletes carry ``data``, updates ``newData`` and ``oldData``. ``model`` defaults
    to the table name without its schema; a mapping gives each table its model (by qualified
    name, then bare name, then ``"*"``).

    >>> from changefeed import testing, to_delta
    >>> to_delta(model="Task")(testing.update("tasks", {"id": 1, "done": True}, {"id": 1}))
    {'type': 'update', 'model': 'Task', 'newData': {'id': 1, 'done': True}, 'oldData': {'id': 1}}
    """
    return ToDelta(model)


class EncodeLines:
    """The format stage of a pipeline whose sink writes JSON lines (``takes_lines``): each change
    (or truncate) as the `JsonLine` of its item in format ``fmt``, made by the format's line
    encoder (the bytes ``dumps_line`` gives the item, without making the item); anything else
    a stage before made, as the format's item. Named, and failing, as the format's stage."""

    __slots__ = ("fmt", "options", "encode", "items", "name")

    def __init__(self, fmt: str, options: Any) -> None:
        from changefeed.formats.registry import format_named

        known = format_named(fmt)
        self.fmt = fmt
        self.options = options
        self.encode = known.lines(options)
        self.items = known.items(options)
        self.name = stage_name(self.items)

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:
        return EncodeLines, (self.fmt, self.options)  # compiled encoders do not pickle

    def __call__(self, item: Any) -> Any:
        if item.__class__ is Change or item.__class__ is Truncate:
            return JsonLine(self.encode(item))
        return self.items(item)

    def each(self, items: list[Any]) -> list[Any] | None:
        """Each change's `JsonLine`, in one call (`changefeed.pipelines._steps._Segment` gives
        a batch to a stage with this method); None (one at a time, please) when a stage before
        made other items."""
        encode = self.encode
        try:
            return [JsonLine(encode(item)) if item.__class__ is Change
                    or item.__class__ is Truncate else _declined(item) for item in items]
        except _Declined:
            return None


class _Declined(Exception):
    """An item `EncodeLines.each` leaves to the stage's call (which may fan it out or drop it)."""


def _declined(item: Any) -> Any:
    raise _Declined


class Route:
    """The stage `route` makes: each change through the stages listed for its table."""

    __slots__ = ("routes", "default")

    def __init__(
        self,
        routes: Mapping[str, Stage | Sequence[Stage]],
        default: Stage | Sequence[Stage] | None = None,
    ) -> None:
        self.routes = {table: _stage_list(stages, table) for table, stages in routes.items()}
        self.default = _stage_list(default, "default") if default is not None else None

    @property
    def name(self) -> str:
        return f"route({sorted(self.routes)})"

    def __call__(self, change: Change) -> list[Any]:
        table = change.table
        stages = self.routes.get(table)
        if stages is None:
            stages = self.routes.get(table.rpartition(".")[2], self.default)
        if stages is None:
            return []
        return run_stages(stages, change)


def route(
    routes: Mapping[str, Stage | Sequence[Stage]],
    default: Stage | Sequence[Stage] | None = None,
) -> Route:
    """Send each change through the stages listed for its table; drop other tables.

    ``routes`` maps a table name to a stage or a list of stages. A change's qualified table
    (``public.tasks``) is looked up first, then its bare name (``tasks``). Changes of tables not
    listed go through ``default`` when given, else are dropped.

    >>> from changefeed import project, route, testing, to_delta
    >>> split = route({"tasks": to_delta("Task"),
    ...                "public.users": [project(["id"]), to_delta("User")]})
    >>> split(testing.insert("public.users", {"id": 7, "email": "x@example.com"}))
    [{'type': 'insert', 'model': 'User', 'data': {'id': 7}}]
    """
    return Route(routes, default)


def _stage_list(stages: Stage | Sequence[Stage], table: str) -> list[Stage]:
    listed: list[Stage] = list(stages) if isinstance(stages, (list, tuple)) else [stages]  # type: ignore[list-item]
    for stage in listed:
        if isinstance(stage, (BatchPolicy, OwnProcess)) or not callable(stage):
            raise ConfigurationError(
                f"route {table!r}: {stage!r} is not a stage (own_process() and batching apply"
                " to the whole pipeline)"
            )
    return listed


def checked_count(value: Any, what: str) -> int:
    """``value`` if it is a whole number of at least 1 (not a bool); a `ConfigurationError`
    naming ``what`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{what} must be an integer of at least 1, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How items are grouped before the sink: at most ``size`` items, at most ``seconds`` old
    (a `Pipeline`'s ``batch_size`` and ``batch_seconds``)."""

    size: int = 1000
    seconds: float = 1.0
    explicit: bool = True
    """False for the default policy: plain callable sinks then get items one at a time, and
    while the sink is busy a batch may grow past ``size``."""

    def __post_init__(self) -> None:
        checked_count(self.size, "batch size")
        if not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise ConfigurationError(f"batch seconds must be positive, not {self.seconds!r}")

    @property
    def name(self) -> str:
        return f"batch({self.size}, {self.seconds})"


def batch(size: int = 1000, seconds: float = 1.0) -> BatchPolicy:
    """Deprecated: give ``Pipeline(..., batch_size=size, batch_seconds=seconds)`` instead.

    Last in a stage list, it sets how items are grouped for the sink, as those keywords do.
    """
    warnings.warn(
        "batch() in a stage list is deprecated: give Pipeline(..., batch_size=...,"
        " batch_seconds=...) instead", DeprecationWarning, stacklevel=2,
    )
    return BatchPolicy(size, seconds)


class OwnProcess:
    """The mark `own_process` makes: ``stage`` (or the sink) starts a process of its own, run
    in ``workers`` copies (a stage only)."""

    __slots__ = ("stage", "workers")

    def __init__(self, stage: Stage | Sink | BatchSink, workers: int = 1) -> None:
        if isinstance(stage, (OwnProcess, BatchPolicy)):
            raise ConfigurationError(f"own_process() takes a stage or a sink, not {stage!r}")
        self.stage = stage
        self.workers = checked_count(workers, "own_process() workers")

    def __repr__(self) -> str:
        more = f", workers={self.workers}" if self.workers > 1 else ""
        return f"own_process({stage_name(self.stage)}{more})"


def own_process(stage: Stage | Sink | BatchSink, workers: int = 1) -> OwnProcess:
    """Mark a stage (or the sink) to run in a process of its own, with the steps after it.

    The steps after a mark run in the same process up to the next mark; steps before the first
    mark run in the feed's process. Batches, not single changes, cross the process boundary.

    ``workers`` > 1 runs that process in as many copies, each taking the next batch: for stages
    that cost much CPU, on as many cores. The copies' batches are put back in the feed's order
    before the next single process (and always before the sink, which runs in one process of its
    own then), so the sink writes and acknowledges in order; the stages of a copied process must
    not rely on state shared across changes (each copy sees some of the batches).
    """
    return OwnProcess(stage, workers)


class Subscription:
    """The stage `subscription` makes: what one subscriber with a Snorky filter sees."""

    __slots__ = ("filter", "matches", "fields")

    def __init__(self, filter: Filter) -> None:
        self.filter = filter
        self.matches = compile_filter(filter)
        self.fields = sorted({field.split(".", 1)[0] for field in filter_fields(filter)})

    @property
    def name(self) -> str:
        return f"subscription({self.filter!r})"

    def __reduce__(self) -> tuple[type, tuple[Filter]]:
        return (Subscription, (self.filter,))  # the compiled predicate is a closure

    def __call__(self, change: Change) -> Change | None:
        operation = change.operation
        if operation is Operation.INSERT:
            return change if self.matches(change.new or {}) else None
        if operation is Operation.TRUNCATE:
            return change  # every row left the subscription
        old = change.old
        self._check_old(change)
        if operation is Operation.DELETE:
            return change if self.matches(old or {}) else None
        assert old is not None
        new = _resolve_unchanged(change.new or {}, old)
        was, now = self.matches(old), self.matches(new)
        if was and now:
            return change
        if now:
            return dataclasses.replace(change, operation=Operation.INSERT, new=new, old=None)
        if was:
            return dataclasses.replace(change, operation=Operation.DELETE, new=None)
        return None

    def _check_old(self, change: Change) -> None:
        old = change.old
        if old is None:
            missing = self.fields
        elif change.key is not None and not set(old) <= set(change.key):
            return  # a whole old row: a missing field is really absent, as in a document
        else:
            missing = [field for field in self.fields if field not in old]
        if missing:
            raise PipelineError(
                f"{(change.operation.name or 'change').lower()} of {change.table} at position"
                f" {change.position!r} has no old value for {', '.join(missing)}: a filtered"
                " subscription needs the old row. On PostgreSQL run ALTER TABLE"
                f" {change.table} REPLICA IDENTITY FULL; on MongoDB enable pre-images"
                " (changeStreamPreAndPostImages) on the collection"
            )



def subscription(filter: Filter) -> Subscription:
    """What one subscriber with a Snorky filter must see, as changes (follow with `to_delta`).

    Inserts and deletes pass when their row matches. An update becomes

    * an update when the old and the new row match,
    * an insert of the new row when only the new row matches (the row entered the filter),
    * a delete of the old row when only the old row matches (it left the filter),
    * nothing when neither matches.

    This needs the old values of the filtered fields: PostgreSQL sends them only under
    ``ALTER TABLE ... REPLICA IDENTITY FULL``, MongoDB only with pre-images enabled. An update or
    delete whose old row holds no more than its key and lacks a filtered field raises
    `PipelineError` saying so, rather than guessing. A new value `UNCHANGED` (a TOASTed value
    PostgreSQL did not resend) stands for the old value.

    >>> from changefeed import subscription, testing
    >>> blue = subscription(["==", "color", "blue"])
    >>> blue(testing.update("t", {"id": 1, "color": "blue"}, {"id": 1, "color": "red"})).operation
    <Operation.INSERT: 1>
    """
    return Subscription(filter)


def _resolve_unchanged(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``new`` with each `UNCHANGED` column taken from ``old``, or left out if ``old`` lacks it."""
    if UNCHANGED not in new.values():
        return new
    return {
        column: old[column] if value is UNCHANGED else value
        for column, value in new.items()
        if value is not UNCHANGED or column in old
    }

