# Two commands do all set-up on a fresh machine:
#   make demo   install, then stream live deltas from a throwaway PostgreSQL
#   make test   install, then run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Snorky (for the Snorky sink's tests) pins tornado 4.5.3: it gets a virtualenv of its own.
SNORKY_VENV  ?= .venv-snorky
SNORKY_STAMP := $(SNORKY_VENV)/.installed
# Tests run in parallel (pytest-xdist): most tests wait on servers and subprocesses (four
# workers used about half of two cores), so six keep two cores busy. Each worker starts servers
# of its own, when a test first needs one, and isolates tests by database and slot names;
# worksteal lets an idle worker take tests from a busy one (--dist loadfile left one long file,
# alone on a worker, as the run's end). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 6
TEST_DIST ?= worksteal
# The sync tests' real clients (tests/serve/js): @electric-sql/client in Node and playwright-core
# driving Debian's chromium, installed from the lock file when it changed (never a browser build).
JS_TESTS := tests/serve/js
JS_STAMP := $(JS_TESTS)/node_modules/.installed
# The suite runs on the compiled hot path (changefeed/_speedups), whose equivalence tests compare
# it with the pure-Python one; these files then run again on the pure-Python path alone
# (CHANGEFEED_IMPL=python): decoding, values, the stream's frames and the formats.
PURE_PYTHON_TESTS := tests/backends/test_pgoutput.py tests/backends/test_values.py \
	tests/backends/test_postgres_stream.py tests/backends/test_messages.py tests/formats

.PHONY: demo test test-live lint typecheck bench mutate install system-deps clean

demo: install
	$(BIN)/changefeed demo

test: install $(SNORKY_STAMP) $(JS_STAMP) typecheck
	$(BIN)/ruff check .
	CHANGEFEED_IMPL=c $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist $(TEST_DIST)
	CHANGEFEED_IMPL=python $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist $(TEST_DIST) \
		$(PURE_PYTHON_TESTS)

# Live suites for MongoDB, RethinkDB and Kafka against docker compose (see README): the same
# tests `make test` runs against SecantusDB and Tansu, now against mongod and Apache Kafka. Set
# the variables yourself to use other servers; the compose services of the others start first.
test-live: install
	@services=""; \
	[ -n "$$CHANGEFEED_TEST_MONGODB_URL" ] || services="$$services mongodb"; \
	[ -n "$$CHANGEFEED_TEST_RETHINKDB_URL" ] || services="$$services rethinkdb"; \
	[ -n "$$CHANGEFEED_TEST_KAFKA_BOOTSTRAP" ] || services="$$services kafka"; \
	if [ -n "$$services" ]; then docker compose up -d --wait $$services; fi
	CHANGEFEED_TEST_MONGODB_URL=$${CHANGEFEED_TEST_MONGODB_URL:-mongodb://127.0.0.1:27017/?replicaSet=rs0&directConnection=true} \
	CHANGEFEED_TEST_RETHINKDB_URL=$${CHANGEFEED_TEST_RETHINKDB_URL:-rethinkdb://127.0.0.1:28015/test} \
	CHANGEFEED_TEST_KAFKA_BOOTSTRAP=$${CHANGEFEED_TEST_KAFKA_BOOTSTRAP:-127.0.0.1:9092} \
	$(BIN)/python -m pytest -q -m "live or kafka" -rs

lint: install
	$(BIN)/ruff check .

# mypy on the public modules ([tool.mypy] in pyproject.toml), read as installed: changefeed/
# with backends/ and pipelines/ inside it, laid out as links in .tmp/typecheck.
typecheck: install
	rm -rf .tmp/typecheck && mkdir -p .tmp/typecheck/changefeed
	ln -s $(CURDIR)/changefeed/* $(CURDIR)/backends $(CURDIR)/pipelines .tmp/typecheck/changefeed/
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_postgres.py

# Mutation testing of the modules behind the delivery guarantees (tests/mutate.py says which
# functions, with which tests), on a copy of the tree in .tmp/mutate. mutmut 2 gets a
# virtualenv of its own. About half an hour on two cores; TARGETS=ledger runs one target.
MUTMUT_VENV  ?= .venv-mutmut
MUTMUT_STAMP := $(MUTMUT_VENV)/.installed

mutate: install $(MUTMUT_STAMP)
	$(MUTMUT_VENV)/bin/python tests/mutate.py $(TARGETS)

$(MUTMUT_STAMP):
	$(PYTHON) -m venv $(MUTMUT_VENV)
	$(MUTMUT_VENV)/bin/pip install -q 'mutmut==2.5.1' 'whatthepatch>=1.0'
	touch $(MUTMUT_STAMP)

install: system-deps $(STAMP)

# PostgreSQL server programs and Redis come from Debian's packages when they are missing.
system-deps:
	@bash .ci/system-deps.sh

# The install builds the compiled hot path (changefeed/_speedups) with Cython and the C compiler
# system-deps provides; it is rebuilt when its sources change.
$(STAMP): setup.cfg pyproject.toml $(wildcard changefeed/_speedups/*.pyx changefeed/_speedups/*.pxi)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(JS_STAMP): $(JS_TESTS)/package.json $(JS_TESTS)/package-lock.json
	cd $(JS_TESTS) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent
	touch $(JS_STAMP)

$(SNORKY_STAMP):
	$(PYTHON) -m venv $(SNORKY_VENV)
	$(SNORKY_VENV)/bin/pip install -q --upgrade pip
	$(SNORKY_VENV)/bin/pip install -q 'snorky==0.1.0a4'
	touch $(SNORKY_STAMP)

clean:
	rm -rf $(VENV) $(SNORKY_VENV) $(MUTMUT_VENV) $(JS_TESTS)/node_modules .tmp/mutate .tmp/typecheck *.egg-info \
		.pytest_cache .ruff_cache .mypy_cache build changefeed/_speedups/*.c changefeed/_speedups/*.so
