"""Exactly-once plumbing that needs no broker: ids, routing of sends, the bench's impl."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from pipeline.bench.sut import IMPLS, impl_env
from pipeline.errors import ConfigError
from pipeline.kafka.connection import make_consumer
from pipeline.kafka.transactions import TransactionalSender, Transactions, transactional_id
from pipeline.settings import load_settings


def test_transactional_id_follows_the_partition_not_the_worker() -> None:
    one = load_settings(app_id="inferlane", worker_id="w1")
    two = load_settings(app_id="inferlane", worker_id="w2")
    tp = TopicPartition("fraud.requests", 3)
    assert transactional_id(one, "fraud", tp) == "inferlane-fraud-fraud.requests-3"
    assert transactional_id(two, "fraud", tp) == transactional_id(one, "fraud", tp)
    assert transactional_id(one, "fraud", TopicPartition("fraud.requests", 2)) != (
        transactional_id(one, "fraud", tp))


def test_a_send_outside_a_partition_transaction_is_refused() -> None:
    settings = load_settings(delivery="exactly_once")

    async def attempt() -> None:
        txns = Transactions(settings, "fraud")
        await TransactionalSender(txns).send(
            "fraud.scores", [(b"k", b"v")])

    with pytest.raises(RuntimeError, match="outside any partition's transaction"):
        asyncio.run(attempt())


def test_delivery_setting_is_checked() -> None:
    assert load_settings().delivery == "at_least_once"
    assert load_settings(delivery="exactly_once").transaction_interval_ms == 20
    with pytest.raises(ConfigError, match="INFERLANE_DELIVERY"):
        load_settings(delivery="exactly-twice")


def test_consumers_read_committed() -> None:
    async def build() -> str:
        consumer = make_consumer(load_settings(), "fraud")
        return str(consumer._isolation_level)  # noqa: SLF001

    assert asyncio.run(build()) == "read_committed"


def test_bench_impl_e_runs_the_lane_exactly_once(tmp_path: object) -> None:
    env = impl_env({}, tag="x", impl="e", phase="rates", state_dir=tmp_path)  # type: ignore[arg-type]
    assert env["INFERLANE_DELIVERY"] == "exactly_once"
    assert IMPLS["e"].companion_lanes == "history"
    assert "INFERLANE_DELIVERY" not in impl_env({}, tag="x", impl="a", phase="rates",
                                                state_dir=tmp_path)  # type: ignore[arg-type]
