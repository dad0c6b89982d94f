"""Crash recovery: a worker SIGKILLed mid-stream and restarted with the same
``INFERLANE_WORKER_ID`` (static group membership) resumes at once, every event gets a score
(duplicates allowed and counted: at-least-once), and the S3 archive still holds every record of
``fraud.scores`` exactly once (deterministic keys; a replayed window overwrites itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pipeline.dev.loadgen import produce_transactions
from pipeline.dev.processes import WorkerProcess
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import (
    _read_all,
    _readers,
    archived,
    offsets_by_partition,
)

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


async def test_sigkill_and_restart_with_same_worker_id_loses_nothing(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    # Static membership: the restarted worker takes its own place in the groups back without
    # waiting for the dead member's session to expire (the dynamic case: test_group_membership).
    env = test_env(archive_max_bytes="30000", archive_max_age_ms="500", static_membership="true")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=1000, duration_s=8.0, seed=21, invalid_fraction=0.01))
        await asyncio.sleep(3.0)
        before_kill = len(scores.results)
        assert before_kill > 0, "the worker was scoring before the kill"
        worker.kill()
        killed_at = time.monotonic()
        killed_wall = time.time()
        await asyncio.to_thread(worker.start)
        ready_s = time.monotonic() - killed_at
        # The first score produced by the restarted worker (scored_at after the kill).
        while not (after := [v["scored_at"] for v in scores.results.values()
                             if v["scored_at"] > killed_wall]):
            assert time.monotonic() - killed_at < 30, "no result within 30 s of the restart"
            await asyncio.sleep(0.01)
        resumed_s = min(after) - killed_wall
        report = await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=30)
        assert not missing, f"{len(missing)} events lost across the SIGKILL"
        assert dlq.records >= sum(report.invalid_by_kind.values())
    print(f"\nrestart: ready after {ready_s:.2f}s, first new score after {resumed_s:.2f}s, "
          f"{scores.duplicates} duplicate scores (redone after the kill)")
    assert worker.terminate() == 0
    topic = settings.topic("fraud.scores")
    records = await _read_all(settings, topic)
    objects = await archived(settings, topic)
    assert sorted(v for _, v in records) == sorted(
        line for lines in objects.values() for line in lines
    ), "every record of fraud.scores is in the archive exactly once"
    for partition, ranges in offsets_by_partition(list(objects)).items():
        expected_first = 0
        for first, last in ranges:
            assert first == expected_first, (partition, ranges)
            expected_first = last + 1
