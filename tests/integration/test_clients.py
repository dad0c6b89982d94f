"""FraudClient and RecoClient against the real local stack and a real worker: many concurrent
calls each get their own answer, dead-lettered requests come back as typed rejections, and
sustained timeouts leave nothing behind (measured: pending calls and live futures)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

from pipeline.clients.laneclients import FraudClient, RecoClient, Rejected, TimedOut
from pipeline.dev.processes import WorkerProcess
from pipeline.training.synth import TransactionGenerator
from schemas import FraudScore, RecoResult
from tests.integration.conftest import EnvFactory, ready_settings

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


def _live_futures() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, asyncio.Future))


async def test_concurrent_calls_rejections_and_no_leak_after_10000_timeouts(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    env = test_env(lanes="fraud,reco")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    generator = TransactionGenerator(seed=61)
    async with FraudClient(settings) as fraud, RecoClient(settings) as reco:
        txns = [generator.next()[0] for _ in range(300)]
        outcomes = await asyncio.gather(*(fraud.score(t, timeout_ms=10_000) for t in txns))
        scores = [o for o in outcomes if isinstance(o, FraudScore)]
        assert len(scores) == len(txns), outcomes[:3]
        assert [(s.event_id, s.card_id) for s in scores] == [
            (t["event_id"], t["card_id"]) for t in txns]

        fresh = await reco.recommend("user-000042", k=7, timeout_ms=10_000)
        assert isinstance(fresh, RecoResult) and len(fresh.items) == 7
        unknown = await reco.recommend("user-nobody", timeout_ms=10_000)
        assert isinstance(unknown, Rejected) and unknown.by == "pipeline"
        assert "user" in unknown.reason
        invalid = await fraud.score({**txns[0], "event_id": "bad-1", "amount": -5})
        assert isinstance(invalid, Rejected)
        assert (invalid.id, invalid.error, invalid.by) == ("bad-1", "schema", "client")
        assert invalid.reason.startswith("amount")
        assert await fraud.send(generator.next()[0]) is None  # fire and forget: acked

        worker.terminate()
        # Objects of the latest wave may still be referenced (gather's bookkeeping); a leak
        # would grow with every wave, so compare after the first wave and after the tenth.
        started = time.monotonic()
        timed_out, live = 0, []
        for _ in range(10):  # 10 waves of 1,000 concurrent calls, all past their deadline
            wave = [generator.next()[0] for _ in range(1000)]
            results = await asyncio.gather(*(fraud.score(t, timeout_ms=5) for t in wave))
            timed_out += sum(isinstance(r, TimedOut) for r in results)
            live.append(_live_futures())
        elapsed_s = time.monotonic() - started
        print(f"10,000 timed-out calls in {elapsed_s:.1f}s; pending {fraud.pending}; "
              f"live futures after each wave of 1,000: {live}")
        assert timed_out == 10_000
        assert fraud.pending == 0
        assert live[-1] - live[0] < 50, live
