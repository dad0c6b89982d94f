"""The Apache Kafka broker stopped and started again on the same data under load: stopped
gracefully (SIGTERM, controlled shutdown) and killed (SIGKILL, ``kill -9``). Producers
(``acks=all``) and the worker recover, and every event the broker acknowledged gets a score.

The test runs its own single-node stack (restarting the session's broker would disturb other
tests). A SIGKILLed broker loses no acknowledged record here because the machine does not crash:
what Kafka wrote is in the page cache, and its log recovery on restart checks the segments'
tail. Surviving the loss of a whole machine takes replication (a three-node cluster).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.dev.loadgen import produce_transactions, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import LocalStack
from pipeline.kafka.connection import client_kwargs
from pipeline.settings import Settings
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _readers

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_broker_restart_under_load_loses_no_acknowledged_event(
        how: str, test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "own-stack", fresh=True)
    endpoints = await asyncio.to_thread(stack.start)
    try:
        env = {**test_env(lanes="fraud"), **endpoints.env()}
        settings = await ready_settings(env)
        worker = worker_factory(env)
        scores, dlq = await _readers(settings)
        async with scores, dlq:
            traffic = asyncio.create_task(produce_transactions(
                settings, rate_per_s=1000, duration_s=12.0, seed=41, invalid_fraction=0.01))
            await asyncio.sleep(4.0)
            assert scores.results, "the worker was scoring before the broker stopped"
            down = time.monotonic()
            await asyncio.to_thread(stack.stop_broker if how == "graceful" else stack.kill_broker)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(stack.start_broker)
            outage_s = time.monotonic() - down
            before = len(scores.results)
            while len(scores.results) == before and time.monotonic() - down < 90:
                await asyncio.sleep(0.05)
            flowing_s = time.monotonic() - down
            report = await asyncio.wait_for(traffic, timeout=60)
            missing = await scores.wait_for(set(report.valid_ids), timeout_s=60)
            assert not missing, (f"{len(missing)} of {len(report.valid_ids)} acknowledged "
                                 f"events without a score\n{worker.log_tail()}")
            assert worker.alive, worker.log_tail()
            # The worker commits again after the restart: its group's offsets reach the end of
            # the requests topic, so a later restart does not redo the whole run.
            lag = await _group_lag(settings, settings.group_id("fraud"),
                                   settings.topic("fraud.requests"))
            assert lag == 0, f"{lag} records not committed 15 s after the last score"
        print(f"\nbroker {how} restart under 1,000 ev/s: down {outage_s:.1f}s, scores again "
              f"{flowing_s:.1f}s after the stop, "
              f"{len(report.valid_ids):,} acknowledged events, 0 lost, "
              f"{scores.duplicates:,} scored twice")
    finally:
        await asyncio.to_thread(stack.stop)


async def _group_lag(settings: Settings, group: str, topic: str, *, wait_s: float = 15.0) -> int:
    """Records of ``topic`` past ``group``'s committed offsets, waiting up to ``wait_s`` for it
    to reach 0 (commits are periodic)."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        deadline = time.monotonic() + wait_s
        while True:
            ends = await snapshot_end_offsets(settings, topic)
            committed = await admin.list_consumer_group_offsets(group)
            lag = sum(end - (committed[tp].offset if tp in committed else 0)
                      for tp, end in ends.items())
            if lag == 0 or time.monotonic() >= deadline:
                return lag
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
