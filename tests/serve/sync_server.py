"""``changefeed serve`` for app clients with test settings (short windows and timeouts):

    python sync_server.py PORT URL SETTINGS_JSON [--app M:O] [--owner-column C] TABLE...
"""

from __future__ import annotations

import json
import sys

from changefeed.cli.common import expected_errors, setup_logging
from changefeed.serve.server import run_server
from changefeed.serve.sync import Settings, SyncService

if __name__ == "__main__":
    setup_logging(False)
    port, url, settings, *rest = sys.argv[1:]
    options: dict[str, str] = {}
    while rest and rest[0].startswith("--"):
        options[rest[0][2:].replace("-", "_")] = rest[1]
        rest = rest[2:]
    try:
        with expected_errors():
            service = SyncService.from_options(
                url=url, tables=rest, app=options.get("app"),
                owner_column=options.get("owner_column"),
                settings=Settings(**json.loads(settings)))
            run_server([service], port=int(port))
    except Exception as exc:  # as the CLI shows it: one line and the exit code
        print(f"changefeed: error: {exc}", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
