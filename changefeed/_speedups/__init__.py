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


def decoder_class(python_class: type) -> type:
    """``python_class`` (`PgOutputDecoder`), or a subclass whose ``decode`` and
    ``next_position`` are the compiled kernel's where the extension is built.

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

