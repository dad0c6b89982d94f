"""Exactly-once lanes on Apache Kafka (``INFERLANE_DELIVERY=exactly_once``).

Every reader here is ``read_committed`` (as the archive, the services and the bench are):

* a worker SIGKILLed three times under 2,000 ev/s: every event has exactly one committed score,
  every invalid one exactly one committed dead letter (at-least-once writes hundreds twice);
* a zombie: a worker paused with SIGSTOP while its partitions move to another worker, then
  resumed, is fenced: it cannot commit, ends itself, and nothing it did lands twice;
* a rebalance (a second worker joins, then leaves) under load: 0 duplicates.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.dev.loadgen import ResultReader, produce_transactions
from pipeline.dev.processes import WorkerProcess
from tests.integration.conftest import EnvFactory, peer_env, ready_settings
from tests.integration.test_fraud_lane import _readers

WorkerFactory = Callable[..., WorkerProcess]


async def _wait_log(worker: WorkerProcess, text: str, timeout_s: float, *,
                    after: int = 0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.log_text().count(text) > after:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {text!r} in the worker log within {timeout_s:.0f}s:\n"
                         + worker.log_tail())


async def _each_scored_once(scores: ResultReader, event_ids: list[str]) -> None:
    """Every event has a committed score, and a second later still exactly one (anything
    written twice would be committed by then)."""
    missing = await scores.wait_for(set(event_ids), timeout_s=60)
    assert not missing, f"{len(missing)} of {len(event_ids)} events lost"
    await asyncio.sleep(1.0)
    assert scores.duplicates == 0, f"{scores.duplicates} events have two committed scores"


async def test_three_sigkills_exactly_one_committed_result_each(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    env = test_env(lanes="fraud", delivery="exactly_once")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    assert "exactly-once" in worker.log_text()
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=2000, duration_s=14.0, seed=41, invalid_fraction=0.01))
        for _ in range(3):
            await asyncio.sleep(3.0)
            worker.kill()
            await asyncio.to_thread(worker.start)
        report = await traffic
        invalid = sum(report.invalid_by_kind.values())
        await dlq.wait_for_count(invalid, timeout_s=30)
        await _each_scored_once(scores, report.valid_ids)
        assert scores.records == len(report.valid_ids)
        assert dlq.records == invalid, (dlq.records, invalid)
    print(f"\n3 SIGKILLs at 2,000 ev/s, exactly-once: {len(report.valid_ids):,} events, "
          f"0 lost, 0 committed twice, {invalid} dead letters once each")


async def test_a_paused_zombie_is_fenced_and_cannot_commit(
        test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path) -> None:
    env = test_env(lanes="fraud", delivery="exactly_once")
    settings = await ready_settings(env)
    zombie = worker_factory(env, name="zombie")
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=1000, duration_s=24.0, seed=42))
        await asyncio.sleep(2.0)
        assert zombie.pid is not None
        os.kill(zombie.pid, signal.SIGSTOP)
        try:
            # The paused worker's transactions stay open; the group expires it after the
            # session timeout (6 s) and hands its partitions to the new worker, whose
            # producers take over the partitions' transactional ids (the fencing).
            other = worker_factory(peer_env(env, tmp_path), name="other")
            await _wait_log(other, "fenced their previous owners", 30.0)
        finally:
            os.kill(zombie.pid, signal.SIGCONT)
        # Resumed, the zombie's next send or commit is refused by the broker: the lane
        # crashes and the worker ends (a real-time lane's crash ends the worker).
        deadline = time.monotonic() + 40.0
        while zombie.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not zombie.alive, "the resumed zombie kept running:\n" + zombie.log_tail()
        log = zombie.log_text()
        assert "ProducerFenced" in log or "InvalidProducerEpoch" in log, zombie.log_tail(60)
        report = await traffic
        await _each_scored_once(scores, report.valid_ids)
    print(f"\nzombie: paused, fenced by the new owner, resumed and ended; "
          f"{len(report.valid_ids):,} events, 0 lost, 0 committed twice")


async def test_a_rebalance_commits_nothing_twice(
        test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path) -> None:
    env = test_env(lanes="fraud", delivery="exactly_once")
    settings = await ready_settings(env)
    first = worker_factory(env, name="first")
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=2000, duration_s=12.0, seed=43))
        await asyncio.sleep(3.0)
        second = worker_factory(peer_env(env, tmp_path), name="second")  # joins: rebalance
        await asyncio.sleep(4.0)
        assert await asyncio.to_thread(second.terminate, 30.0) == 0  # leaves: rebalance
        report = await traffic
        await _each_scored_once(scores, report.valid_ids)
        assert "assigned" in second.log_text()
    assert first.alive
    print(f"\nrebalance (join + leave) at 2,000 ev/s, exactly-once: "
          f"{len(report.valid_ids):,} events, 0 lost, 0 committed twice")
