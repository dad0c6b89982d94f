"""A worker's /metrics after real traffic: the per-lane counters, histograms and lag gauges say
exactly what happened (events in and out, dead letters by error, one latency observation per
result, every scored row in a model batch, no lag once drained)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pipeline.dev.loadgen import produce_transactions
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import free_port
from tests.integration.conftest import EnvFactory, ready_settings
from tests.integration.test_fraud_lane import _readers
from tests.integration.test_models import _metric, _metrics

WorkerFactory = Callable[..., WorkerProcess]


def _sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_lane_metrics_account_for_every_event(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    port = free_port()
    env = test_env(lanes="fraud,history", web_port=str(port), drift_sample="0")
    settings = await ready_settings(env)
    worker_factory(env, web=True)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        report = await produce_transactions(settings, rate_per_s=2000, count=2000,
                                            invalid_fraction=0.05, seed=21)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=30)
        invalid = sum(report.invalid_by_kind.values())
        await dlq.wait_for_count(invalid, timeout_s=30)
    valid = len(report.valid_ids)
    deadline = time.monotonic() + 10
    while True:  # counters move when acks arrive; the lag gauge with the next fetch
        text = await asyncio.to_thread(_metrics, port)
        if (_metric(text, "inferlane_events_out_total", lane="fraud") == valid and
                _sum(text, "inferlane_consumer_lag_records", lane="fraud") == 0 and
                _sum(text, "inferlane_history_freshness_seconds_count") > 0) or \
                time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert _metric(text, "inferlane_events_in_total", lane="fraud") == report.sent
    assert _metric(text, "inferlane_events_out_total", lane="fraud") == valid
    assert _metric(text, "inferlane_dead_letters_total", lane="fraud") == invalid
    assert _sum(text, "inferlane_dead_letters_by_error_total", lane="fraud") == invalid
    assert _metric(text, "inferlane_e2e_latency_seconds_count", lane="fraud") == valid
    assert _metric(text, "inferlane_batch_rows_sum", batcher="fraud") == valid
    assert _metric(text, "inferlane_inference_seconds_count", batcher="fraud") == \
        _metric(text, "inferlane_batch_rows_count", batcher="fraud") > 0
    assert _metric(text, "inferlane_produce_ack_seconds_count", lane="fraud") > 0
    assert _metric(text, "inferlane_consume_lag_seconds_count", lane="fraud") > 0
    assert _sum(text, "inferlane_consumer_lag_records", lane="fraud") == 0
    assert 'inferlane_consumer_lag_records{lane="fraud",partition="0"' in text
    assert _metric(text, "inferlane_in_flight_records", lane="fraud") == 0
    # Every degraded score has one reason; the view saw the slow path's updates arrive.
    degraded = _metric(text, "inferlane_degraded_total", lane="fraud")
    assert degraded > 0  # at least the cards' first transactions
    assert _sum(text, "inferlane_degraded_by_reason_total", lane="fraud") == degraded
    assert _sum(text, "inferlane_history_freshness_seconds_count") > 0
