# Two commands do all set-up on a fresh machine:
#   make demo   install, then stream live deltas from a throwaway PostgreSQL
#   make test   install, then run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-live lint bench install system-deps clean

demo: install
	$(BIN)/changefeed demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Live suites for MongoDB and RethinkDB against docker compose (see README).
test-live: install
	CHANGEFEED_TEST_MONGODB_URL=$${CHANGEFEED_TEST_MONGODB_URL:-mongodb://127.0.0.1:27017/?replicaSet=rs0&directConnection=true} \
	CHANGEFEED_TEST_RETHINKDB_URL=$${CHANGEFEED_TEST_RETHINKDB_URL:-rethinkdb://127.0.0.1:28015/test} \
	$(BIN)/python -m pytest -q -m live -rs

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/bench_postgres.py

install: system-deps $(STAMP)

# PostgreSQL server programs and Redis come from Debian's packages when they are missing.
system-deps:
	@bash .ci/system-deps.sh

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
