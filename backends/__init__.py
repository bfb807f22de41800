"""Backends: one module (or small package) per database, each a pure decoder plus a thin loop.

Importing this package registers every backend whose driver is installed with
`changefeed.get_changefeed`.
"""

import importlib

for _name in ("postgres", "mongodb", "rethinkdb"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as _exc:  # the driver is an optional extra
        if _exc.name and _exc.name.split(".")[0] in ("pymongo", "bson", "rethinkdb"):
            continue
        if _exc.name == f"{__name__}.{_name}":  # not written yet in this checkout
            continue
        raise
