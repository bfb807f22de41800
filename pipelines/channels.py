"""Typed channels: notifications sent inside the application's transaction, received in order.

A channel is a dataclass declaring its payload; its name and version are class keywords::

    class OrderCreated(Channel, name="orders.created", version=2):
        order_id: int
        total: Decimal

`notify(connection, OrderCreated(7, Decimal("9.90")))` writes it into the WAL with
``pg_logical_emit_message(true, ...)`` on the caller's connection: it commits or rolls back with
the caller's transaction (under autocommit, at once), has no size limit, and reaches a feed
started with ``messages=[CHANNEL_PREFIX]`` in commit order among the row changes, at least
once, across crashes. This is what LISTEN/NOTIFY cannot give (8,000 bytes, lost when nobody
listens) and what pgpubsub's notification table gives at the cost of writes and polling.

On the wire each notification is a JSON envelope, under the message prefix
``changefeed.channel:<name>``::

    {"id": "…uuid…", "channel": "orders.created", "version": 2, "db_version": "…",
     "sent_at": "2024-06-01T12:00:00Z", "payload": {"order_id": 7, "total": "9.90"}}

``id`` is made once, at send time, so a notification delivered twice (at least once) carries the
same id both times: consumers drop duplicates by it. ``db_version`` is the application's schema
version (migration head) when it was sent (see `alembic` and `django`).

Payload types: what msgspec encodes and validates: bool, int, float, str, bytes (base64),
None / optional fields, date, time, datetime (naive or aware), timedelta, Decimal (sent as a
string: no digit is lost), UUID, enums, nested dataclasses, and lists, tuples, sets,
frozensets and dicts (string keys) of those. A payload is checked on sending (the error names
the field) and again on receiving. Numbers are read exactly: a JSON number in a field typed
``Any`` (or seen by an upcaster) is an int or a `Decimal`, never a float that lost digits. A
payload nested deeper than `changefeed.formats.json_values.MAX_DEPTH` levels is refused
(`ChannelError`) on both sides: Python's parsers would run out of stack on it.

Receiving: `receive(OrderCreated, ...)` is a pipeline stage turning each channel message into a
`Notification` whose ``payload`` is the channel instance; rows and other messages pass through.
A notification sent under an older version goes through the channel's upcasters (functions from
the payload dict of version n to that of version n + 1, registered with `Channel.upcaster`).
An unknown channel, a version newer than the listener's, a missing upcaster or a payload that
does not match raises `ChannelError`: the pipeline then stops, or with a dead-letter sink puts
the message there and goes on (``unknown="skip"`` drops unknown channels instead, never
unknown versions of a known one).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, ClassVar, Literal, TypeVar

import msgspec

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    from typing_extensions import dataclass_transform

from changefeed.change import Position
from changefeed.errors import ChangefeedError
from changefeed.formats.json_values import MAX_DEPTH, deeper_than
from changefeed.message import Message

log = logging.getLogger("changefeed.pipelines")

CHANNEL_PREFIX = "changefeed.channel:"
"""The prefix of every channel's messages: ``messages=[CHANNEL_PREFIX]`` streams them all."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
C = TypeVar("C", bound="Channel")


class ChannelError(ChangefeedError):
    """A notification cannot be sent or received as its channel declares."""

    exit_code = 5


@dataclass_transform()  # type checkers see each channel as the dataclass it becomes
class Channel:
    """Base class of channels: subclass it with ``name=`` and ``version=`` class keywords.

    A subclass is made a dataclass, its fields being the payload; ``frozen=True`` among the
    class keywords makes it a frozen one. (A plain ``@dataclass`` on top changes nothing; do not
    add ``@dataclass(frozen=True)``: the methods made first stay, use the keyword instead.)
    ``channel_name`` and ``channel_version`` hold the keywords; the message prefix is
    ``changefeed.channel:<name>``.
    """

    channel_name: ClassVar[str]
    channel_version: ClassVar[int]
    _upcasters: ClassVar[dict[int, Upcaster]]

    def __init_subclass__(
        cls, *, name: str | None = None, version: int | None = None, frozen: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass of a channel is the same channel unless it says otherwise.
        if name is None:
            name = getattr(cls, "channel_name", None)
            if name is None:
                raise TypeError(f"channel {cls.__name__} needs a name: class"
                                f" {cls.__name__}(Channel, name=\"...\", version=1)")
        if version is None:
            version = getattr(cls, "channel_version", 1)
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise TypeError(f"channel name {name!r} must be a non-empty string without spaces")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise TypeError(f"channel {name}: version must be an integer >= 1, not {version!r}")
        cls.channel_name = name
        cls.channel_version = version
        cls._upcasters = {}
        dataclass(cls, frozen=frozen)

    @classmethod
    def prefix(cls) -> str:
        """The logical decoding message prefix of this channel."""
        return CHANNEL_PREFIX + cls.channel_name

    @classmethod
    def upcaster(cls, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning a version ``from_version`` payload (a dict of JSON
        values) into a version ``from_version + 1`` payload; use it as a decorator."""
        if not 1 <= from_version < cls.channel_version:
            raise TypeError(
                f"channel {cls.channel_name} is at version {cls.channel_version}: an upcaster"
                f" starts from a version between 1 and {cls.channel_version - 1}"
            )

        def register(function: Upcaster) -> Upcaster:
            cls._upcasters[from_version] = function
            return function

        return register


@dataclass(frozen=True)
class Notification:
    """A received notification: ``payload`` is the channel instance (upcast to the listener's
    version); the other fields come from the envelope (``version`` as sent)."""

    payload: Channel
    id: str
    channel: str
    version: int
    db_version: str | None
    sent_at: datetime
    position: Position = None


# -- sending ---------------------------------------------------------------------------------

DbVersion = str | Callable[[Any], "str | None"] | None


def encode(event: Channel, *, db_version: str | None = None, id: str | None = None,
           sent_at: datetime | None = None) -> bytes:
    """The envelope of ``event`` as JSON bytes, after checking the payload against its types."""
    cls = type(event)
    if not isinstance(event, Channel) or not hasattr(cls, "channel_name"):
        raise ChannelError(f"notify() sends Channel instances, not {cls.__name__}")
    try:
        payload = msgspec.json.encode(event)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ChannelError(f"{_label(cls)}: cannot encode the payload: {exc}") from exc
    except RecursionError:
        raise ChannelError(f"{_label(cls)}: {_TOO_DEEP}") from None
    if deeper_than(payload, MAX_DEPTH - 1):  # the envelope adds a level
        raise ChannelError(f"{_label(cls)}: {_TOO_DEEP}")
    _decode_payload(cls, _PAYLOAD.decode(payload))  # the same check a listener makes
    envelope = {
        "id": id or str(uuid.uuid4()),
        "channel": cls.channel_name,
        "version": cls.channel_version,
        "db_version": db_version,
        "sent_at": sent_at or datetime.now(timezone.utc),
        "payload": msgspec.Raw(payload),
    }
    return msgspec.json.encode(envelope)


def notify(connection: Any, event: Channel, *, db_version: DbVersion = None) -> str:
    """Send ``event`` on ``connection`` (psycopg, or any DB-API connection or cursor), inside
    its current transaction (or at once under autocommit); returns the notification's id.

    ``db_version`` is a string, or a source called with the connection (`alembic()`,
    `django()`), read in the same transaction. Raises `ChannelError` (naming the field) for a
    payload that does not match the channel's types; nothing is sent then, and the caller's
    transaction is left as it was.
    """
    if inspect.iscoroutinefunction(getattr(connection, "execute", None)):
        raise ChannelError("notify() needs a synchronous connection or cursor (psycopg's"
                           " Connection, not AsyncConnection)")
    if callable(db_version):
        db_version = db_version(connection)
    if db_version is not None and not isinstance(db_version, str):
        raise ChannelError(f"db_version must be a string or None, not {db_version!r}")
    notification_id = str(uuid.uuid4())
    content = encode(event, db_version=db_version, id=notification_id)
    _execute(connection, "SELECT pg_logical_emit_message(true, %s, %s::bytea)",
             [type(event).prefix(), content])
    return notification_id


def _execute(connection: Any, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Run ``query`` on a psycopg connection, or on a DB-API connection's cursor, or a cursor."""
    if hasattr(connection, "fetchall"):  # a cursor
        connection.execute(query, params)
        return list(connection.fetchall())
    cursor = connection.cursor()
    try:
        cursor.execute(query, params)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def alembic(table: str = "alembic_version") -> Callable[[Any], str | None]:
    """A ``db_version`` source: Alembic's current head(s) (several heads joined by ``,``)."""

    def read(connection: Any) -> str | None:
        if not _table_exists(connection, table):
            raise ChannelError(f"db_version: no table {table}: is Alembic set up here?")
        rows = _execute(connection, f"SELECT version_num FROM {_quoted(table)}", [])
        return ",".join(sorted(row[0] for row in rows)) or None

    return read


def django(app: str | None = None) -> Callable[[Any], str | None]:
    """A ``db_version`` source: the last Django migration applied (of ``app``, or of any app)
    as ``app.name``, e.g. ``shop.0042_order_currency``."""

    def read(connection: Any) -> str | None:
        if not _table_exists(connection, "django_migrations"):
            raise ChannelError("db_version: no table django_migrations: is Django set up here?")
        where, params = ("WHERE app = %s ", [app]) if app else ("", [])
        rows = _execute(
            connection,
            f"SELECT app, name FROM django_migrations {where}ORDER BY applied DESC, id DESC"
            " LIMIT 1",
            params,
        )
        return f"{rows[0][0]}.{rows[0][1]}" if rows else None

    return read


def _table_exists(connection: Any, table: str) -> bool:
    # to_regclass never fails: a missing table must not abort the caller's transaction.
    return bool(_execute(connection, "SELECT to_regclass(%s) IS NOT NULL", [table])[0][0])


def _quoted(table: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))


# -- receiving -------------------------------------------------------------------------------


class Receive:
    """The stage `receive` makes: channel messages as `Notification` objects."""

    def __init__(
        self, *channels: type[Channel], unknown: Literal["error", "skip"] = "error"
    ) -> None:
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown= must be 'error' or 'skip', not {unknown!r}")
        self.unknown = unknown
        self.channels: dict[str, type[Channel]] = {}
        for cls in channels:
            if not (isinstance(cls, type) and issubclass(cls, Channel)) or cls is Channel:
                raise TypeError(f"receive() takes Channel subclasses, not {cls!r}")
            known = self.channels.get(cls.channel_name)
            if known is None or known.channel_version < cls.channel_version:
                self.channels[cls.channel_name] = cls

    @property
    def name(self) -> str:
        return f"receive({', '.join(self.channels)})"

    def __call__(self, item: Any) -> Any:
        if item.__class__ is not Message or not item.prefix.startswith(CHANNEL_PREFIX):
            return item
        try:
            notification = decode(item.content, self.channels, position=item.position)
        except UnknownChannel as exc:
            if self.unknown == "skip":
                log.warning("skipping a notification at %r: %s", item.position, exc.message)
                return None
            raise
        if item.prefix != CHANNEL_PREFIX + notification.channel:
            raise ChannelError(f"a notification of channel {notification.channel} came under"
                               f" the prefix {item.prefix!r}")
        return notification


def receive(*channels: type[Channel], unknown: Literal["error", "skip"] = "error") -> Receive:
    """A pipeline stage turning channel messages into `Notification` objects.

    Args:
        channels: the channel classes this listener knows. For each name the highest version
            given is the one delivered; older versions of it are upcast.
        unknown: ``"error"`` (default) raises `UnknownChannel` for a channel not given (the
            pipeline's dead letter, or a stop); ``"skip"`` drops it with a warning. A version
            the listener cannot read (`UnknownVersion`) and a payload that does not match
            always raise.

    Row changes and messages that are not channel messages pass through unchanged.
    """
    return Receive(*channels, unknown=unknown)


class UnknownChannel(ChannelError):
    """A notification of a channel the listener was not given."""


class UnknownVersion(ChannelError):
    """A notification of a version the listener cannot read: newer than its own, or older
    without an upcaster from it."""


def decode(content: bytes, channels: dict[str, type[Channel]] | Iterable[type[Channel]],
           position: Position = None) -> Notification:
    """The `Notification` in an envelope, its payload upcast and checked (`ChannelError`)."""
    if not isinstance(channels, dict):
        channels = {cls.channel_name: cls for cls in channels}
    if deeper_than(content):
        raise ChannelError(f"not a channel envelope that can be read: {_TOO_DEEP}")
    try:
        envelope = _ENVELOPE.decode(content)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChannelError(f"not a channel envelope: {exc}") from exc
    cls = channels.get(envelope.channel)
    if cls is None:
        known = ", ".join(sorted(channels)) or "none"
        raise UnknownChannel(f"unknown channel {envelope.channel!r} (version"
                             f" {envelope.version}); this listener knows: {known}")
    payload = envelope.payload
    if envelope.version > cls.channel_version:
        raise UnknownVersion(
            f"{envelope.channel} version {envelope.version} is newer than this listener's"
            f" (version {cls.channel_version}): deploy the listener's new version first"
        )
    for version in range(envelope.version, cls.channel_version):
        upcast = cls._upcasters.get(version)
        if upcast is None:
            raise UnknownVersion(
                f"{envelope.channel} version {envelope.version} cannot become version"
                f" {cls.channel_version}: no upcaster from version {version}"
                f" (register one with @{cls.__name__}.upcaster(from_version={version}))"
            )
        try:
            payload = upcast(dict(payload))
        except Exception as exc:
            raise ChannelError(f"{envelope.channel}: the upcaster from version {version}"
                               f" failed: {type(exc).__name__}: {exc}") from exc
    return Notification(_decode_payload(cls, payload), envelope.id, envelope.channel,
                        envelope.version, envelope.db_version, envelope.sent_at, position)


class _Envelope(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    channel: str
    version: int
    payload: dict[str, Any]
    sent_at: datetime
    db_version: str | None = None


# Numbers that are not integers become Decimals (exact), not floats; typed fields convert them.
_ENVELOPE = msgspec.json.Decoder(_Envelope, float_hook=Decimal)
_PAYLOAD = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
_TOO_DEEP = f"the payload nests deeper than {MAX_DEPTH - 1} levels"


def _decode_payload(cls: type[C], payload: dict[str, Any]) -> C:
    """``payload`` (JSON values) as an instance of ``cls``; ChannelError naming the field."""
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(payload) - names
    if unknown:
        raise ChannelError(f"{_label(cls)}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        return msgspec.convert(payload, cls)
    except msgspec.ValidationError as exc:
        raise ChannelError(f"{_label(cls)}: {exc}") from exc


def _label(cls: type[Channel]) -> str:
    return f"channel {cls.channel_name} version {cls.channel_version}"
