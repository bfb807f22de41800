"""A KafkaFeed worker as its own process, for the consumer-group test: BOOTSTRAP TOPIC GROUP OUT.

It appends each change it delivers as a JSON line to OUT (flushed per batch, before the offsets
are committed) and runs until killed.
"""

from __future__ import annotations

import sys

from kafkatools import FAST_GROUP

from changefeed.backends.kafka import KafkaFeed
from changefeed.pipelines import JsonLinesSink, Pipeline

if __name__ == "__main__":
    bootstrap, topic, group, out = sys.argv[1:5]
    feed = KafkaFeed(bootstrap, topic, group, config=FAST_GROUP)
    Pipeline(feed, [], sink=JsonLinesSink(out)).run()
