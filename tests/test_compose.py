"""docker-compose.yml cannot run here (no Docker engine); check what the live suites rely on."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_backend_redis_and_kafka_have_a_service():
    # and changefeed itself (tests/serve/test_image.py checks that one)
    assert set(SERVICES) == {"postgres", "mongodb", "rethinkdb", "redis", "kafka", "changefeed"}


def test_ports_are_published_on_localhost_only():
    for name, service in SERVICES.items():
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_postgres_has_logical_replication():
    command = SERVICES["postgres"]["command"]
    assert "wal_level=logical" in command


def test_mongodb_is_a_replica_set_that_initiates_itself():
    # Change streams need a replica set; the Makefile's URL names it rs0.
    command = SERVICES["mongodb"]["command"]
    assert command[command.index("--replSet") + 1] == "rs0"
    check = " ".join(SERVICES["mongodb"]["healthcheck"]["test"])
    assert "rs.initiate(" in check and "'rs0'" in check
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "replicaSet=rs0" in makefile and "127.0.0.1:27017" in makefile


def test_every_service_has_a_health_check_for_compose_wait():
    for name, service in SERVICES.items():
        assert "healthcheck" in service, f"{name}: `docker compose up --wait` needs one"


def test_kafka_is_one_kraft_node_advertising_what_make_test_live_uses():
    environment = SERVICES["kafka"]["environment"]
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(environment)  # KRaft mode
    assert environment["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://127.0.0.1:9092"
    assert environment["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1  # consumer groups work
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "CHANGEFEED_TEST_KAFKA_BOOTSTRAP:-127.0.0.1:9092" in makefile
    assert '-m "live or kafka"' in makefile
    for service in ("mongodb", "rethinkdb", "kafka"):  # started unless its variable is set
        assert f'services="$$services {service}"' in makefile
