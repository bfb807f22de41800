"""Formats: how changes are written, and read back, by everything that moves them.

Below both the sources and the sinks, so that what one side writes the other reads with the
same code. `registry` lists the output formats (``change``, ``delta``, ``debezium``) once, for
the CLI, the sinks and the log sources; `change_dict`, `delta` and `debezium` are the formats
themselves, `codec` the JSON encoding of database values every line, record and request uses,
and `records` how a Redis stream entry and a Kafka record hold a change.
"""
