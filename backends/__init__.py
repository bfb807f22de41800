"""Backends: one package per source of changes, each pure decoding plus a thin I/O loop.

A backend is imported when it is first needed, so that starting the CLI does not import every
driver: `changefeed.get_changefeed` finds the backend of a URL by its scheme, and of a
driver's connection object by the driver's package name, in the `Backend` records of
`changefeed.registry` (``BUILTIN_BACKENDS``); importing the backend's module then registers it
(`changefeed.registry.register_backend`).
"""
