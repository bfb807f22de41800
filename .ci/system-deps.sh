#!/usr/bin/env bash
# Install the servers the tests and the demo start locally, when they are missing:
# PostgreSQL (initdb, pg_ctl, pg_recvlogical) and Redis, from Debian's packages; a C compiler,
# which the Snorky test server's dependency streql (an sdist only) needs to build; Node and npm
# for the sync tests' JavaScript clients, and chromium, the browser they drive headless.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql postgresql-contrib)
command -v pg_recvlogical >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_recvlogical >/dev/null 2>&1 \
  || need+=(postgresql-client)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing ${need[*]} from Debian packages" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services; the tests run their own, so stop those.
$SUDO service postgresql stop >/dev/null 2>&1 || true
$SUDO service redis-server stop >/dev/null 2>&1 || true
