"""Consumer-group membership on Apache Kafka, with the default dynamic members.

* Scale out and back in under 2,000 ev/s: a second worker joins (its partitions are revoked
  from the first, which commits its finished work on revoke: Kafka accepts the commit of the
  generation being rebalanced) and later stops with SIGTERM (finishes and commits its in-flight
  work, leaves the group): every event is scored, and none twice.
* A dynamic member SIGKILLed: nothing tells the group, the broker expires the member after the
  session timeout (6 s in these tests) and the survivor takes its partitions over from their
  last commit. Every event is scored (at-least-once: what the dead worker had scored but not
  committed is scored again, and counted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.dev.loadgen import produce_transactions
from pipeline.dev.processes import WorkerProcess
from tests.integration.conftest import EnvFactory, peer_env, ready_settings
from tests.integration.test_fraud_lane import _readers

WorkerFactory = Callable[..., WorkerProcess]
ASSIGNED = "fraud: assigned"


async def test_scale_out_and_in_at_2000_per_second_redoes_nothing(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    env = test_env(lanes="fraud")
    settings = await ready_settings(env)
    first = worker_factory(env, name="first")
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=2000, duration_s=14.0, seed=51))
        await asyncio.sleep(3.0)
        second = await asyncio.to_thread(worker_factory, peer_env(env, tmp_path), name="second")
        await asyncio.sleep(4.0)
        assert ASSIGNED in second.log_text(), "the second worker got partitions"
        assert await asyncio.to_thread(second.terminate) == 0, second.log_tail()
        report = await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=60)
        assert not missing, f"{len(missing)} of {len(report.valid_ids)} events without a score"
    log = first.log_text()
    assert "Lane[fraud]: revoked" in log, "the newcomer's join revoked partitions from the first"
    assert log.count(ASSIGNED) >= 3, "joined, shrank for the newcomer, grew back"
    stopped = second.log_text()
    assert "Lane[fraud]: stopped" in stopped
    assert "LeaveGroup request succeeded" in stopped
    print(f"\nscale out+in @2000 ev/s: {len(report.valid_ids):,} events, "
          f"{scores.duplicates} scored twice")
    assert scores.duplicates == 0, f"{scores.duplicates} events redone across two rebalances"


async def test_a_sigkilled_dynamic_member_is_expired_and_its_partitions_move_on(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    env = test_env(lanes="fraud")
    settings = await ready_settings(env)
    session_s = settings.session_timeout_ms / 1000
    survivor = worker_factory(env, name="survivor")
    victim = worker_factory(peer_env(env, tmp_path), name="victim")
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=1000, duration_s=12.0, seed=52))
        deadline = time.monotonic() + 30
        while ASSIGNED not in victim.log_text():
            assert time.monotonic() < deadline, f"victim never got partitions\n{victim.log_tail()}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)
        assigned_before = survivor.log_text().count(ASSIGNED)
        victim.kill()
        killed = time.monotonic()
        while survivor.log_text().count(ASSIGNED) == assigned_before:
            assert time.monotonic() - killed < session_s + 30, (
                f"no rebalance {session_s + 30:.0f}s after the kill\n{survivor.log_tail()}")
            await asyncio.sleep(0.1)
        taken_over_s = time.monotonic() - killed
        report = await traffic
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=session_s + 30)
        assert not missing, f"{len(missing)} events lost after a member was SIGKILLed"
    print(f"\nSIGKILL of a dynamic member (session timeout {session_s:.0f}s): partitions taken "
          f"over {taken_over_s:.1f}s after the kill, {scores.duplicates} events scored twice "
          f"(uncommitted at the kill), 0 lost")
    # The broker, not a restart, ended the dead member's session: it was never started again.
    assert taken_over_s >= session_s * 0.5
