"""Reliability under load (issue: production and operations): a worker SIGKILLed three times
at 2,000 ev/s loses nothing; a worker stopped with SIGTERM under load exits cleanly within
10 s and its restart redoes nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pipeline.dev.loadgen import produce_transactions
from pipeline.dev.processes import WorkerProcess
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _readers

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


async def test_three_sigkills_at_2000_per_second_lose_nothing(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    env = test_env(lanes="fraud")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=2000, duration_s=14.0, seed=31, invalid_fraction=0.01))
        restarts = []
        for _ in range(3):
            await asyncio.sleep(3.0)
            worker.kill()
            killed = time.monotonic()
            await asyncio.to_thread(worker.start)
            restarts.append(time.monotonic() - killed)
        report = await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=60)
        assert not missing, f"{len(missing)} of {len(report.valid_ids)} events lost"
        assert dlq.records >= sum(report.invalid_by_kind.values())
    print(f"\n3 SIGKILLs at 2,000 ev/s: {len(report.valid_ids):,} events, 0 lost, "
          f"{scores.duplicates:,} scored twice (redone after a kill), restarts ready after "
          + ", ".join(f"{s:.1f}s" for s in restarts))


async def test_sigterm_flushes_commits_and_exits_fast_and_restart_redoes_nothing(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    env = test_env(lanes="fraud")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=2000, duration_s=8.0, seed=32))
        await asyncio.sleep(3.0)
        started = time.monotonic()
        code = await asyncio.to_thread(worker.terminate, 30.0)
        stop_s = time.monotonic() - started
        assert code == 0, worker.log_tail()
        assert stop_s <= 10.0, f"graceful stop took {stop_s:.1f}s"
        log = worker.log_text()
        assert "Lane[fraud]: stopped" in log
        await asyncio.to_thread(worker.start)
        report = await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=30)
        assert not missing, f"{len(missing)} events without a score"
    print(f"\nSIGTERM under 2,000 ev/s: exit 0 after {stop_s:.2f}s; after the restart "
          f"{scores.duplicates} events scored twice")
    assert scores.duplicates == 0, "the restart redid work the stopped worker had committed"
