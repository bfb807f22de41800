"""The config file of ``changefeed serve``: what it takes, and every problem as one line naming
the file, the line and the key (exit 2), found before anything connects or is created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import assert_exit, run_cli
from serving import stage_path

from changefeed.errors import ConfigurationError
from changefeed.redact import redact
from changefeed.serve.pipelines import PipelinesService
from changefeed.serve.pipelines.build import run_options
from changefeed.serve.pipelines.config import check_tables, default_slot, load_config
from changefeed.serve.pipelines.keys import PIPELINE_KEYS

PG = "postgresql://u@127.0.0.1:5/db"
ENV = {"DATABASE_URL": PG, "HOOK_TOKEN": "s3cr3t-t0ken", "EMPTY": ""}


def write(tmp_path: Path, text: str, name: str = "changefeed.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problem(tmp_path: Path, text: str, env: dict | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as raised:
        load_config(path, {**ENV, **(env or {})})
    message = str(raised.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}:")


ISSUE_EXAMPLE = '''
[pipelines.orders]            # the pipeline's name: the `pipeline` label in metrics and logs
url = "${DATABASE_URL}"
tables = ["orders", "order_lines"]
ops = ["insert", "update"]
sink = "/var/lib/changefeed/orders.jsonl"   # any --sink spec
'''


def test_the_issue_example_reads_as_changefeed_run_would(tmp_path, monkeypatch):
    monkeypatch.setattr("changefeed.serve.pipelines.config.build", lambda spec: None)  # no /var
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), ENV)
    (spec,) = config.pipelines.values()
    assert spec.name == "orders" and spec.enabled
    options = run_options(spec)
    assert options.tables == ("orders", "order_lines") and options.url == PG
    assert options.ops.names == ["insert", "update"]
    assert options.sink == "/var/lib/changefeed/orders.jsonl"
    assert options.slot == default_slot("orders") == "changefeed_orders"
    assert spec.secrets == (PG,)


def test_every_key_reaches_the_run_options(tmp_path):
    dead, checkpoint = tmp_path / "dead.jsonl", tmp_path / "checkpoint"
    config = load_config(write(tmp_path, f'''
[defaults]
url = "${{DATABASE_URL}}"
format = "change"
quiet = true

[pipelines.all-keys]
tables = "public.orders, app.lines"
ops = "insert,delete"
prefeed = "snapshot"
model = {{ orders = "Order", "*" = "Thing" }}
exclude = ["app.secret*"]
chunk_size = 100
slot = "my_slot"
publication = "my_pub"
checkpoint = "{checkpoint}"
limit = 10
idle_timeout = 2.5
where = "status == 'open'"
filter = ["==", "color", "blue"]
stages = ["example_stages:shout", "example_stages:twice"]
sink = "http://127.0.0.1:9/hook?token=${{HOOK_TOKEN}}"
dead_letter = "{dead}"
processes = true
workers = 3
enabled = false
restart_delay = 0.5
restart_max_delay = 5
stop_timeout = 10
'''), ENV)
    spec = config.pipelines["all-keys"]
    options = run_options(spec)
    assert options.tables == ("public.orders", "app.lines")
    assert options.ops.names == ["insert", "delete"]
    assert (options.prefeed, options.fmt, options.quiet) == ("snapshot", "change", True)
    assert options.model == {"orders": "Order", "*": "Thing"}
    assert options.exclude == ("app.secret*",) and options.chunk_size == 100
    assert (options.slot, options.publication) == ("my_slot", "my_pub")
    assert options.checkpoint == str(checkpoint)
    assert (options.limit, options.idle_timeout) == (10, 2.5)
    assert options.where == "status == 'open'"
    assert json.loads(options.filter) == ["==", "color", "blue"]
    assert options.stages == ("example_stages:shout", "example_stages:twice")
    assert options.sink == "http://127.0.0.1:9/hook?token=s3cr3t-t0ken"
    assert options.dead_letter == str(dead) and options.processes and options.workers == 3
    assert not spec.enabled
    assert (spec.supervision.restart_delay, spec.supervision.restart_max_delay,
            spec.supervision.stop_timeout) == (0.5, 5.0, 10.0)
    assert set(spec.secrets) == {PG, "s3cr3t-t0ken"}
    assert redact("token s3cr3t-t0ken") == "token ***"


def test_read_back_sources(tmp_path):
    config = load_config(write(tmp_path, f'''
[pipelines.from-kafka]
url = "kafka://127.0.0.1:9092"
topics = ["public.orders"]
group = "mirror"
sink = "{tmp_path}/k.jsonl"

[pipelines.from-redis]
url = "redis://127.0.0.1:6379/0"
stream = "changes"
sink = "{tmp_path}/r.jsonl"
'''), ENV)
    kafka, redis = config.pipelines.values()
    assert kafka.source == {"kind": "kafka", "topics": ["public.orders"], "group": "mirror"}
    assert redis.source["kind"] == "redis" and redis.source["group"] == "changefeed-from-redis"
    assert redis.source["consumer"].endswith("-from-redis")
    assert kafka.options["slot"] is None


def test_defaults_that_do_not_fit_a_pipelines_source_are_left_out(tmp_path):
    config = load_config(write(tmp_path, f'''
[defaults]
url = "{PG}"
tables = "orders"
chunk_size = 10
group = "shared"

[pipelines.db]
sink = "{tmp_path}/db.jsonl"

[pipelines.topic]
url = "kafka://127.0.0.1:9092"
topics = "public.orders"
sink = "{tmp_path}/topic.jsonl"
'''), ENV)
    db, topic = config.pipelines.values()
    assert db.options["tables"] == ["orders"] and db.options["chunk_size"] == 10
    assert topic.options["tables"] == [] and topic.options["chunk_size"] is None
    assert topic.source["group"] == "shared"


def test_variables_with_defaults_and_a_literal_dollar(tmp_path):
    config = load_config(write(tmp_path, f'''
[pipelines.a]
url = "${{MISSING:-{PG}}}"
tables = "t"
where = "price == '$${{not a variable}}' and note == 'cost $5'"
sink = "{tmp_path}/${{EMPTY:-fallback}}.jsonl"
'''), ENV)
    options = config.pipelines["a"].options
    assert options["url"] == PG
    assert options["where"] == "price == '${not a variable}' and note == 'cost $5'"
    assert options["sink"] == f"{tmp_path}/fallback.jsonl"


def test_until_idle_is_read_as_idle_timeout_its_new_name(tmp_path):
    pipeline = '[pipelines.{0}]\nurl = "{1}"\ntables = "t"\nsink = "{2}/{0}"\n'
    text = ("[defaults]\nuntil_idle = 4\n" + pipeline.format("a", PG, tmp_path)
            + pipeline.format("b", PG, tmp_path) + "idle_timeout = 2\n"
            + pipeline.format("c", PG, tmp_path) + "until_idle = 3\n")
    config = load_config(write(tmp_path, text), ENV)
    assert [run_options(spec).idle_timeout for spec in config.pipelines.values()] == [4, 2, 3]
    assert "until_idle" not in problem(tmp_path, pipeline.format("a", PG, tmp_path) + "idl = 1\n")


def test_a_changed_key_changes_the_fingerprint_and_nothing_else_does(tmp_path):
    text = f'[pipelines.a]\nurl = "{PG}"\ntables = "t"\nsink = "{tmp_path}/a"\n'
    first = load_config(write(tmp_path, text), ENV).pipelines["a"]
    again = load_config(write(tmp_path, "# a comment\n" + text), ENV).pipelines["a"]
    changed = load_config(write(tmp_path, text + 'where = "id > 1"\n'), ENV).pipelines["a"]
    assert first.fingerprint == again.fingerprint != changed.fingerprint


BAD = [
    # (what, config, line, key, fragment)
    ("unknown key", '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsnik = "{out}"\n',
     4, "pipelines.a.snik", "unknown key; did you mean sink?"),
    ("unknown top-level table", '[pipeline.a]\nurl = "{pg}"\n', 1, "pipeline",
     "unknown top-level table; did you mean pipelines?"),
    ("an old name beside its new one",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nidle_timeout = 1\n'
     'until_idle = 2\n', 6, "pipelines.a.until_idle",
     "until_idle is the old name of idle_timeout: give one"),
    ("wrong type: a string for a number",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nlimit = "10"\n',
     5, "pipelines.a.limit", 'expected an integer, not the string "10"'),
    ("wrong type: a number for a boolean",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nprocesses = 1\n',
     5, "pipelines.a.processes", "expected true or false, not an integer 1"),
    ("workers out of range",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nworkers = 0\n',
     5, "pipelines.a.workers", 'must be a whole number from 1 to 64, or "auto"'),
    ("workers neither a number nor auto",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nworkers = "many"\n',
     5, "pipelines.a.workers", 'must be a whole number from 1 to 64, or "auto"'),
    ("wrong type: a boolean for a number",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nchunk_size = true\n',
     5, "pipelines.a.chunk_size", "expected an integer, not a boolean (true)"),
    ("wrong type inside an array",
     '[pipelines.a]\nurl = "{pg}"\ntables = [\n  "t",\n  3,\n]\nsink = "{out}"\n',
     3, "pipelines.a.tables", "must hold strings only"),
    ("zero where a positive number is needed",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nuntil_idle = 0\n',
     5, "pipelines.a.until_idle", "must be greater than 0"),
    ("missing variable", '[pipelines.a]\nurl = "${{NOT_SET_ANYWHERE}}"\ntables = "t"\n',
     2, "pipelines.a.url", "environment variable NOT_SET_ANYWHERE is not set"),
    ("missing variable in an array item",
     '[pipelines.a]\nurl = "{pg}"\ntables = [\n  "t",\n  "${{NO_TABLE}}",\n]\nsink = "{out}"\n',
     5, "pipelines.a.tables[1]", "environment variable NO_TABLE is not set"),
    ("malformed variable", '[pipelines.a]\nurl = "${{1BAD}}"\n', 2, "pipelines.a.url",
     "malformed ${...}"),
    ("duplicate name", '[pipelines.a]\nurl = "{pg}"\n\n[pipelines.a]\nurl = "{pg}"\n',
     4, "pipelines.a", "declared twice"),
    ("duplicate name in another case",
     '[pipelines.orders]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\n'
     '[pipelines.Orders]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\n',
     5, "pipelines.Orders", "duplicate name: 'orders'"),
    ("duplicate key", '[pipelines.a]\nurl = "{pg}"\nurl = "{pg}"\n', 3, "pipelines.a.url",
     "set twice"),
    ("unknown sink scheme", '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "ftp://h/x"\n',
     4, "pipelines.a.sink", "unsupported sink 'ftp://h/x'"),
    ("sink in a missing directory",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "/no/such/dir/x.jsonl"\n',
     4, "pipelines.a.sink", "directory /no/such/dir does not exist"),
    ("unknown operation",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nops = ["insert", "upsert"]\nsink = "{out}"\n',
     4, "pipelines.a.ops", "unknown operation 'upsert'"),
    ("unknown format",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nformat = "xml"\nsink = "{out}"\n',
     4, "pipelines.a.format", 'unknown value "xml": use delta, change or debezium'),
    ("unknown prefeed",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nprefeed = "all"\nsink = "{out}"\n',
     4, "pipelines.a.prefeed", 'unknown value "all": use snapshot'),
    ("bad where",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nwhere = "id >>> 1"\nsink = "{out}"\n',
     4, "pipelines.a.where", "id >>> 1"),
    ("bad filter",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nfilter = ["~", "c", 1]\nsink = "{out}"\n',
     4, "pipelines.a.filter", "~"),
    ("stage that does not import",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nstages = ["no_such_module_x:f"]\nsink = "{out}"\n',
     4, "pipelines.a.stages", "cannot import no_such_module_x"),
    ("dead letters to a stream",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\ndead_letter = "redis://h/0?stream=x"\n',
     5, "pipelines.a.dead_letter", "dead letters are JSON records"),
    ("no sink", '[pipelines.a]\nurl = "{pg}"\ntables = "t"\n', 1, "pipelines.a",
     "sink is missing"),
    ("no url", '[pipelines.a]\ntables = "t"\nsink = "{out}"\n', 1, "pipelines.a",
     "url is missing"),
    ("no tables", '[pipelines.a]\nurl = "{pg}"\nsink = "{out}"\n', 1, "pipelines.a",
     "tables is missing"),
    ("unsupported source URL",
     '[pipelines.a]\nurl = "mysql://h/db"\ntables = "t"\nsink = "{out}"\n',
     2, "pipelines.a.url", "unsupported URL (mysql://)"),
    ("slot option with MongoDB",
     '[pipelines.a]\nurl = "mongodb://h/db"\ntables = "t"\nslot = "s"\nsink = "{out}"\n',
     4, "pipelines.a.slot", "apply to PostgreSQL URLs only"),
    ("topics with a database URL",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\ntopics = ["x"]\nsink = "{out}"\n',
     4, "pipelines.a.topics", "applies to kafka:// and redis:// sources only"),
    ("tables with Kafka", '[pipelines.a]\nurl = "kafka://h:9092"\ntables = "t"\nsink = "{out}"\n',
     3, "pipelines.a.tables", "does not apply to a kafka:// source"),
    ("Redis without a stream", '[pipelines.a]\nurl = "redis://h:6379/0"\nsink = "{out}"\n', 1,
     "pipelines.a", "stream is missing"),
    ("two pipelines on one slot",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nslot = "shared"\nsink = "{out}"\n'
     '[pipelines.b]\nurl = "{pg}"\ntables = "u"\nslot = "shared"\nsink = "{out}"\n',
     9, "pipelines.b.slot", "slot shared is also pipeline a's"),
    ("restart delays the wrong way round",
     '[pipelines.a]\nurl = "{pg}"\ntables = "t"\nsink = "{out}"\nrestart_delay = 10\n'
     'restart_max_delay = 2\n', 6, "pipelines.a.restart_max_delay", "shorter than restart_delay"),
    ("a bad key in the defaults",
     '[defaults]\nsink = "ftp://nope"\n[pipelines.a]\nurl = "{pg}"\ntables = "t"\n',
     2, "defaults.sink", "pipeline a: unsupported sink"),
    ("a bad pipeline name", '[pipelines."a b"]\nurl = "{pg}"\n', 1, 'pipelines."a b"',
     "a pipeline's name is 1 to 52 letters"),
    ("no pipelines", '[defaults]\nurl = "{pg}"\n', None, "", "no [pipelines.NAME] table"),
    ("a syntax error", '[pipelines.a]\nurl = "{pg}\ntables = "t"\n', 2, "pipelines.a.url",
     "invalid TOML"),
]


@pytest.mark.parametrize("what, text, line, key, fragment", BAD, ids=[b[0] for b in BAD])
def test_a_bad_config_is_one_line_naming_file_line_and_key(tmp_path, what, text, line, key,
                                                           fragment):
    message = problem(tmp_path, text.format(pg=PG, out=tmp_path / "out.jsonl"))
    if line is not None:
        assert message.startswith(f"{line}: {key}: "), message
    assert fragment in message, message


def test_secrets_never_appear_in_a_problem(tmp_path):
    message = problem(tmp_path, '[pipelines.a]\nurl = "${DATABASE_URL}"\ntables = "t"\n'
                                'sink = "http://h/x?token=${HOOK_TOKEN}"\n'
                                'limit = "${HOOK_TOKEN}"\n')
    assert "s3cr3t-t0ken" not in message
    assert message == '5: pipelines.a.limit: expected an integer, not the string "***"'


def test_every_key_is_documented_in_the_readme():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    operate = readme[readme.index("## Operate"):]
    operate = operate[:operate.index("\n## ", 1)] if "\n## " in operate[1:] else operate
    for key in PIPELINE_KEYS:
        assert f"`{key}`" in operate, key


# -- through the command, with a real PostgreSQL --------------------------------------------------

def slots_and_publications(pg) -> tuple[int, int]:
    return (pg.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0],
            pg.execute("SELECT count(*) FROM pg_publication").fetchone()[0])


@pytest.fixture
def orders(pg):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE order_lines (id int PRIMARY KEY)")
    return pg


@pytest.mark.postgres
@pytest.mark.parametrize("tables, key, fragment", [
    ('["orders", "nomatch_*"]', "tables", "no table matches 'nomatch_*' in database"),
    ('["orders", "no_such_table"]', "tables", "table 'no_such_table' does not exist"),
    ('["order*"]\nexclude = ["order*"]', "exclude", "--exclude leaves no table to stream"),
])
def test_tables_are_resolved_on_the_database_before_anything_is_created(
        tmp_path, pg_dsn, orders, tables, key, fragment):
    path = write(tmp_path, f'''
[pipelines.fine]
url = "${{DATABASE_URL}}"
tables = "orders"
sink = "{tmp_path}/fine.jsonl"

[pipelines.broken]
url = "${{DATABASE_URL}}"
tables = {tables}
sink = "{tmp_path}/broken.jsonl"
''')
    result = run_cli("serve", "--config", str(path), "--port", "0", timeout=60,
                     env={"DATABASE_URL": pg_dsn})
    line = 9 if key == "tables" else 10
    assert_exit(result, 2, f"{path}:{line}: pipelines.broken.{key}: {fragment}")
    assert slots_and_publications(orders) == (0, 0)
    assert not (tmp_path / "fine.jsonl").exists() and not (tmp_path / "broken.jsonl").exists()


@pytest.mark.postgres
@pytest.mark.parametrize("what", ["unknown key", "wrong type: a string for a number",
                                  "missing variable", "duplicate name", "unknown sink scheme",
                                  "a syntax error", "stage that does not import"])
def test_the_command_exits_2_with_one_line_and_creates_nothing(tmp_path, pg_dsn, orders, what):
    _, text, line, key, fragment = next(bad for bad in BAD if bad[0] == what)
    path = write(tmp_path, text.format(pg=pg_dsn, out=tmp_path / "out.jsonl"))
    result = run_cli("serve", "--config", str(path), "--port", "0", timeout=60,
                     env={"PYTHONPATH": stage_path()})
    assert_exit(result, 2, f"{path}:{line}: {key}: ", fragment)
    assert "serving on" not in result.stderr
    assert slots_and_publications(orders) == (0, 0)


@pytest.mark.postgres
def test_an_unreachable_database_is_left_for_the_pipeline_to_retry(tmp_path):
    path = write(tmp_path, f'[pipelines.a]\nurl = "postgresql://u:pw@127.0.0.1:1/db"\n'
                           f'tables = "t"\nsink = "{tmp_path}/a.jsonl"\n')
    service = PipelinesService.from_file(str(path))  # a warning, no error
    assert list(service.config.pipelines) == ["a"]
    check_tables(service.config)


def test_a_missing_file_is_one_line(tmp_path):
    result = run_cli("serve", "--config", str(tmp_path / "nope.toml"), timeout=60)
    assert_exit(result, 2, f"cannot read config file {tmp_path / 'nope.toml'}")



def test_the_readmes_example_config_loads(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    operate = readme[readme.index("## Operate"):]
    example = operate[operate.index("```toml\n") + 8:]
    example = example[:example.index("```")].replace("/var/lib/changefeed", str(tmp_path))
    stages = tmp_path / "myapp"
    stages.mkdir()
    (stages / "__init__.py").write_text("")
    (stages / "changefeed.py").write_text("def enrich(change):\n    return change\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(write(tmp_path, example), {
        "DATABASE_URL": PG, "HOOK_TOKEN": "t0ken-for-hooks", "MONGODB_URL": "mongodb://h/app",
        "SNORKY_KEY": "sn0rky-key"})
    assert list(config.pipelines) == ["orders", "big-orders-hook", "lines-to-kafka",
                                      "lines-mirror", "tasks"]
    assert config.pipelines["lines-mirror"].source["kind"] == "kafka"
    assert not config.pipelines["tasks"].enabled
    assert config.pipelines["orders"].supervision.restart_max_delay == 120
