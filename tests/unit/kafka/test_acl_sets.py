"""The least-privilege ACL sets (pipeline/kafka/acls.py): what each role gets, that it covers
what each process's clients use, and the commands `inferlane acls` prints."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.kafka.acls import (
    ROLES,
    Grant,
    acl_arguments,
    kafka_acls_commands,
    lane_rights,
    role_grants,
)
from pipeline.kafka.topics import topic_specs
from pipeline.kafka.transactions import transactional_id
from pipeline.settings import KNOWN_LANES, load_settings


@pytest.mark.parametrize("lane", KNOWN_LANES)
def test_each_lane_may_describe_every_topic_it_ensures(lane: str) -> None:
    """A worker lists and describes the topics of its lanes at start (ensure_topics); Kafka
    implies Describe from Read or Write, and hides a topic the principal may not describe, so
    a missing right would look like a missing topic to create (and be refused)."""
    settings = load_settings(lanes=lane)
    granted = {g.name for g in role_grants("worker", settings) if g.resource == "topic"}
    assert {settings.topic(s.name) for s in topic_specs([lane])} <= granted


def test_a_workers_set_is_its_lanes_and_faust_with_prefix_and_app_id() -> None:
    settings = load_settings(topic_prefix="p.", app_id="shop", lanes="fraud")
    grants = role_grants("worker", settings)
    assert Grant("Read", "topic", "p.fraud.requests") in grants
    assert Grant("Write", "topic", "p.fraud.scores") in grants
    assert Grant("Read", "group", "shop-fraud") in grants
    assert Grant("Read", "group", "shop") in grants  # faust's group
    assert Grant("Create", "topic", "shop-__assignor-__leader") in grants
    assert not [g for g in grants if "reco" in g.name or "labels" in g.name]
    assert not [g for g in grants if g.resource == "transactional-id"]  # at-least-once


def test_exactly_once_adds_the_transactional_id_prefix_of_each_transactional_lane() -> None:
    settings = load_settings(delivery="exactly_once", app_id="shop", lanes="fraud,reco,history")
    txn = [g for g in role_grants("worker", settings) if g.resource == "transactional-id"]
    assert txn == [Grant("Write", "transactional-id", "shop-fraud-", prefixed=True),
                   Grant("Write", "transactional-id", "shop-reco-", prefixed=True)]
    assert not lane_rights("history").transactional
    # The prefix covers the ids the exactly-once lanes use.
    tp = TopicPartition(settings.topic("fraud.requests"), 3)
    assert transactional_id(settings, "fraud", tp).startswith(txn[0].name)


def test_clients_get_no_worker_rights() -> None:
    settings = load_settings()
    producer = role_grants("producer", settings)
    assert {g.operation for g in producer} == {"Write"}
    assert {g.name for g in producer} == {"fraud.requests", "fraud.labels", "reco.requests"}
    services = role_grants("services", settings)
    assert Grant("Read", "topic", "fraud.scores") in services
    assert Grant("Write", "topic", "fraud.requests") in services
    assert not [g for g in services if g.operation == "Write" and g.name.endswith(".scores")]
    with pytest.raises(ValueError, match="unknown role 'admin'; roles: worker, services"):
        role_grants("admin", settings)


def test_acl_arguments_group_one_operation_per_command() -> None:
    grants = [Grant("Read", "topic", "a"), Grant("Read", "group", "g"),
              Grant("Write", "topic", "b"), Grant("Write", "transactional-id", "x-", prefixed=True)]
    assert acl_arguments("User:u", grants) == [
        ["--add", "--allow-principal", "User:u", "--operation", "Read",
         "--group", "g", "--topic", "a"],
        ["--add", "--allow-principal", "User:u", "--operation", "Write", "--topic", "b"],
        ["--add", "--allow-principal", "User:u", "--operation", "Write",
         "--resource-pattern-type", "prefixed", "--transactional-id", "x-"],
    ]
    assert kafka_acls_commands("User:u", grants[:2]) == (
        "kafka-acls.sh --bootstrap-server $BOOTSTRAP --command-config admin.properties --add "
        "--allow-principal User:u --operation Read \\\n  --group g \\\n  --topic a")


def test_the_acls_command_prints_a_roles_set_and_refuses_unknown_roles() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["acls", "worker", "--principal", "User:w", "--lanes", "reco"],
                           env={"INFERLANE_APP_ID": "shop"})
    assert result.exit_code == 0, result.output
    assert result.output == kafka_acls_commands(
        "User:w", role_grants("worker", load_settings(app_id="shop", lanes="reco"))) + "\n"
    for args, error in ((["admin"], "unknown role 'admin'"),
                        (["producer", "--lanes", "fraud"], "--lanes is for the worker role")):
        result = runner.invoke(app, ["acls", *args, "--principal", "User:w"])
        # main() prints an InferlaneError as one line and exits 1 (pipeline/cli.py)
        assert result.exit_code != 0 and error in str(result.exception), result.output
    assert set(ROLES) == {"worker", "services", "producer", "batch-client"}
