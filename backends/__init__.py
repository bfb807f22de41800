"""Backends: one module (or small package) per database, each a pure decoder plus a thin loop.

A backend is imported when it is first needed, so that starting the CLI does not import every
driver: `changefeed.get_changefeed` imports ``postgres``, ``mongodb`` or ``rethinkdb`` for a URL
by its scheme, and for a driver's connection object by the driver's package name. Importing a
backend registers its driver's connection types with `get_changefeed`.
"""
