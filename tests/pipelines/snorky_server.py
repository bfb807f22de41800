"""Run a real Snorky DataSync server (snorky 0.1.0a4) for the tests.

Usage: ``python snorky_server.py PORT KEY``.

Three known problems of snorky 0.1.0a4 on Python >= 3.10 are worked around here, at start-up,
without editing the installed package (see the project's notes on running Snorky):

1. tornado 4.5.3 uses ``collections.MutableMapping``, gone since Python 3.10: alias it.
2. streql 3.0.2 (compares ``X-Backend-Key``) raises SystemError on Python >= 3.10, so every
   backend request would answer 500: rebind ``equals`` to ``hmac.compare_digest``.
3. ``FilterDealer.get_subscription_items_for_model`` is a generator, but update deltas need a
   set: the dealers below return a ``set`` of the same items.

Services: frontend ``datasync`` (WebSocket at ``/ws``) and backend ``datasync_backend`` (HTTP at
``/backend``). Dealers for model ``Task``: ``AllTasks`` (broadcast) and ``FilteredTasks``
(subscriptions with a Snorky filter as query). Prints ``ready`` once listening.
"""

import collections
import collections.abc
import hmac
import sys

collections.MutableMapping = collections.abc.MutableMapping  # 1.

import snorky.request_handlers.http as backend_http  # noqa: E402


def _equals(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


backend_http.equals = _equals  # 2.

from snorky import ServiceRegistry  # noqa: E402
from snorky.request_handlers.websocket import SnorkyWebSocketHandler  # noqa: E402
from snorky.services.datasync import DataSyncService  # noqa: E402
from snorky.services.datasync.backend import DataSyncBackend  # noqa: E402
from snorky.services.datasync.dealers import BroadcastDealer, FilterDealer  # noqa: E402
from tornado.ioloop import IOLoop  # noqa: E402
from tornado.web import Application  # noqa: E402


class AllTasks(BroadcastDealer):
    model = "Task"


class FilteredTasks(FilterDealer):
    model = "Task"

    def get_subscription_items_for_model(self, model):  # 3.
        return set(super().get_subscription_items_for_model(model))


def main() -> None:
    port, key = int(sys.argv[1]), sys.argv[2]
    frontend = DataSyncService("datasync", [AllTasks, FilteredTasks])
    backend = DataSyncBackend("datasync_backend", frontend)
    app = Application([
        SnorkyWebSocketHandler.get_route(ServiceRegistry([frontend]), "/ws"),
        (r"/backend", backend_http.BackendHTTPHandler,
         {"api_key": key, "service_registry": ServiceRegistry([backend])}),
    ])
    app.listen(port, address="127.0.0.1")
    print("ready", flush=True)
    IOLoop.current().start()


if __name__ == "__main__":
    main()
