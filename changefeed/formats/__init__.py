"""Formats: how changes are written, and read back, by everything that moves them.

Below both the sources and the sinks, so that what one side writes the other reads with the
same code: `codec` is the JSON encoding of database values that every line, record and request
uses; `delta` makes Snorky deltas (and ``changefeed run``'s fast delta lines); `debezium`
makes Debezium's event envelopes and reads them back; `change_dict` reads a change back from
its ``to_dict()`` form; `records` is how a Redis stream entry and a Kafka record hold a change.
"""
