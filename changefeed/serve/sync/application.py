"""The application's part: who a token is, and which writes it allows (``--app MODULE:OBJECT``).

The object (a module attribute; a class is instantiated without arguments) may define:

* ``authenticate(token) -> owner id or None``: None answers 401; raising `PermissionError`
  answers 403 with its message. It runs for ``POST /sync``'s ``auth_token`` and for the shape
  API's ``Authorization: Bearer`` header. Without it every request is anonymous.
* Mobync's ``validate_create``, ``validate_update``, ``validate_delete(owner_id, **diff)`` ->
  bool: False rejects the diff. ``diff`` holds the diff's fields (``id``, ``owner``,
  ``logical_clock``, ``utc_timestamp``, ``type``, ``model``) and ``json_data`` as a dict. A
  missing validator allows everything (the owner rules still apply).

Each may be a plain function or ``async def``. They run on the server's event loop: a plain
function must not block (make it ``async`` to query something).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from changefeed.errors import ConfigurationError

VALIDATORS = {0: "validate_create", 1: "validate_update", 2: "validate_delete"}


class Unauthorized(Exception):
    """No token, or one ``authenticate`` does not know (401)."""


class Forbidden(Exception):
    """``authenticate`` refused the token with `PermissionError` (403)."""


class Application:
    """The loaded ``--app`` object, or an application that allows everything (``None``)."""

    def __init__(self, target: Any = None, spec: str | None = None) -> None:
        self.target = target
        self.spec = spec
        self.authenticate_fn: Callable[..., Any] | None = getattr(target, "authenticate", None)
        self.validators = {kind: getattr(target, name, None) for kind, name in VALIDATORS.items()}
        for name, fn in [("authenticate", self.authenticate_fn),
                         *((VALIDATORS[k], v) for k, v in self.validators.items())]:
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"--app {spec}: {name} is not callable")

    @classmethod
    def load(cls, spec: str | None) -> Application:
        """Import ``MODULE:OBJECT`` (the current directory is on the path, as for ``python
        -m``). A bad spec or a failing import is a one-line `ConfigurationError`."""
        if not spec:
            return cls()
        module_name, sep, attribute = spec.partition(":")
        if not sep or not module_name or not attribute:
            raise ConfigurationError(f"--app takes MODULE:OBJECT, as in myapp.sync:App, not"
                                     f" {spec!r}")
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigurationError(f"--app {spec}: cannot import {module_name}:"
                                     f" {type(exc).__name__}: {exc}") from None
        target: Any = module
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ConfigurationError(f"--app {spec}: {module_name} has no {attribute}"
                                         ) from None
        if inspect.isclass(target):
            try:
                target = target()
            except Exception as exc:
                raise ConfigurationError(f"--app {spec}: {attribute}() failed:"
                                         f" {type(exc).__name__}: {exc}") from None
        return cls(target, spec)

    @property
    def authenticates(self) -> bool:
        """Whether requests need a token."""
        return self.authenticate_fn is not None

    async def owner(self, token: str | None) -> Any:
        """The owner id of ``token`` (None when the application does not authenticate).
        Raises `Unauthorized` or `Forbidden`."""
        if self.authenticate_fn is None:
            return None
        if not token:
            raise Unauthorized("a token is required")
        try:
            owner = await _call(self.authenticate_fn, token)
        except PermissionError as exc:
            raise Forbidden(str(exc) or "the token is refused") from None
        if owner is None:
            raise Unauthorized("unknown token")
        return owner

    async def allows(self, kind: int, owner: Any, diff: dict[str, Any]) -> bool:
        """What the application's validator says of ``diff`` (True without one)."""
        validator = self.validators.get(kind)
        if validator is None:
            return True
        return bool(await _call(validator, owner, **diff))


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


__all__ = ["Application", "Forbidden", "Unauthorized"]
