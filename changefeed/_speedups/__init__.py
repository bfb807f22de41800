"""The optional compiled hot path: Cython kernels behind the pure-Python API.

`_kernels` (built from ``_kernels.pyx`` when the package is installed on a machine with a C
compiler) decodes pgoutput and writes the JSON lines of the built-in formats with exactly the
results of the pure-Python code, which stays the reference: the equivalence tests
(``tests/backends/test_compiled_equivalence.py``) replay recorded streams through both and
compare every value and every output byte. Without the extension, everything runs in pure
Python.

``CHANGEFEED_IMPL=python`` forces the pure-Python path (for debugging, as psycopg's
``PSYCOPG_IMPL``); ``CHANGEFEED_IMPL=c`` insists on the compiled one. `implementation` says
which runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from changefeed.errors import ConfigurationError

IMPL_VARIABLE = "CHANGEFEED_IMPL"

_requested = os.environ.get(IMPL_VARIABLE, "").strip().lower()
kernels: ModuleType | None = None
_problem: str | None = None
if _requested not in ("", "python", "c"):
    _problem = f"{IMPL_VARIABLE}={_requested!r}: use python, c, or leave it unset"
elif _requested != "python":
    try:
        from changefeed._speedups import _kernels as kernels
    except ImportError as exc:
        if _requested == "c":
            _problem = f"{IMPL_VARIABLE}=c, but the compiled extension is not built ({exc})"

implementation = "c" if kernels is not None else "python"
"""``"c"`` when the compiled kernels run, ``"python"`` when the pure-Python code does."""


def check() -> None:
    """Raise `ConfigurationError` if ``CHANGEFEED_IMPL`` asks for what cannot be had."""
    if _problem is not None:
        raise ConfigurationError(_problem)


class _NoLines:
    """What `Lines` is without the extension: no item is ever one."""


# Any for the type checker: an item found to be of this class has count, head(), position.
Lines: Any = kernels.Lines if kernels is not None else _NoLines
"""The direct path's batches of output lines (`PgOutputDecoder.line_decoder`): an item a feed
hands out in place of several changes, with ``count``, ``position`` (of the last) and
``committed_at``, written as bytes (the buffer protocol)."""

def libpq_functions() -> tuple[int, int] | None:
    """The addresses of ``PQgetCopyData`` and ``PQfreemem`` in the libpq that psycopg uses (its
    binary or C build's own, or the one its ctypes build loaded), for the compiled frame reader;
    None where they cannot be found."""
    global _libpq
    if _libpq is None:
        _libpq = _find_libpq() or False
    return _libpq or None


_libpq: tuple[int, int] | bool | None = None


def _find_libpq() -> tuple[int, int] | None:
    import ctypes
    import sys

    from psycopg import pq

    try:
        if pq.__impl__ in ("binary", "c"):
            # The extension module's own dependency: dlsym on its handle searches that first.
            library = ctypes.CDLL(sys.modules[f"psycopg_{pq.__impl__}.pq"].__file__)
        elif pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            library = _pq_ctypes.pq
        else:
            return None
        addresses = (ctypes.cast(library.PQgetCopyData, ctypes.c_void_p).value,
                     ctypes.cast(library.PQfreemem, ctypes.c_void_p).value)
    except (AttributeError, KeyError, OSError):
        return None
    return addresses if all(addresses) else None  # type: ignore[return-value]


LINE_FORMATS = ("delta", "change")
"""The formats whose lines the direct path writes itself."""


def decoder_class(python_class: type) -> type:
    """``python_class`` (`PgOutputDecoder`), or a subclass whose ``decode``, ``next_position``
    and `line_decoder` are the compiled kernel's where the extension is built.

    A decoder whose options the kernel does not take (a loader factory of another kind) keeps
    the pure-Python methods; the pure class stays reachable as ``python_class``."""
    if kernels is None and _problem is None:
        return python_class
    make_kernel = kernels.Decoder.for_decoder if kernels is not None else lambda decoder: None

    class PgOutputDecoder(python_class):  # type: ignore[misc, valid-type]
        __doc__ = python_class.__doc__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            check()
            super().__init__(*args, **kwargs)
            kernel = make_kernel(self)
            if kernel is not None:
                self.kernel = kernel
                self.decode = kernel.decode  # type: ignore[method-assign]
                self.next_position = kernel.next_position  # type: ignore[method-assign]

        def line_decoder(self, fmt: str, model: Any = None, frames: Any = None,
                         replay_after: Any = None,
                         where: Any = None) -> Callable[[Any], Any] | None:
            kernel = getattr(self, "kernel", None)
            if kernel is None or fmt not in LINE_FORMATS:
                return None
            if type(frames) is not kernels.FrameReader:  # type: ignore[union-attr]
                frames = None  # one message at a time
            kernel.set_line_format(fmt, model, frames, replay_after, where)
            return kernel.encode  # type: ignore[no-any-return]

        line_decoder.__doc__ = python_class.line_decoder.__doc__

    PgOutputDecoder.python_class = python_class  # type: ignore[attr-defined]
    PgOutputDecoder.__module__ = python_class.__module__
    return PgOutputDecoder


def encoder_factory(python_factory: Callable[..., Any], compiled_name: str) -> Callable[..., Any]:
    """``python_factory`` (a function making a line encoder, such as `delta_line_encoder`), or
    one making the compiled encoder ``compiled_name`` (same arguments, same bytes) where the
    extension is built. The pure factory stays reachable as ``python_factory``."""
    if kernels is None and _problem is None:
        return python_factory
    compiled = getattr(kernels, compiled_name, None)

    def factory(*args: Any, **kwargs: Any) -> Any:
        check()
        return (compiled or python_factory)(*args, **kwargs)

    factory.__doc__ = python_factory.__doc__
    factory.__name__ = python_factory.__name__
    factory.__module__ = python_factory.__module__
    factory.python_factory = python_factory  # type: ignore[attr-defined]
    return factory

