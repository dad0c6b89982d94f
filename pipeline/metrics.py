"""Prometheus metrics of a worker process (prometheus-client), served at ``/metrics`` by the
worker's web server (:mod:`pipeline.kafka.faustapp`); what each means and what to alert on:
docs/operations.md.

One registry per process. Handlers observe into the module-level metrics below; the counters a
lane already keeps (:class:`pipeline.kafka.lane.LaneStats`) and its consumer lag are read at scrape
time by :class:`LaneCollector`, so the hot path pays nothing for them. Label values are lane,
batcher, model and version names and DLQ error classes, never free text.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_QUEUE_WAIT",
    "BATCH_ROWS",
    "CONSUME_LAG",
    "CONTENT_TYPE_LATEST",
    "CPU_PER_1K_EVENTS",
    "DEGRADED",
    "LANE_RESTARTS",
    "LANE_UP",
    "MISROUTED",
    "HISTORY_FRESHNESS",
    "E2E_LATENCY",
    "INFERENCE_SECONDS",
    "LANES",
    "PRODUCE_ACK",
    "TXN_COMMIT",
    "S3_BYTES",
    "S3_ERRORS",
    "S3_OBJECTS",
    "S3_RETRIES",
    "LaneCollector",
    "DRIFT_ABS_DELTA",
    "DRIFT_FLIPS",
    "DRIFT_ROWS",
    "MODEL_COLD_START",
    "MODEL_INFO",
    "MODEL_LOAD_FAILURES",
    "MODEL_SWAPS",
    "REGISTRY",
    "SHADOW_ROWS",
    "render",
]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes

MODEL_INFO = Gauge(
    "inferlane_model_info", "1 for the model version a lane serves (0 once replaced)",
    ["lane", "model", "version", "precision"], registry=REGISTRY)
MODEL_COLD_START = Gauge(
    "inferlane_model_cold_start_seconds",
    "Load + sha256 check + warm-up time of the served model version",
    ["lane", "model", "version"], registry=REGISTRY)
MODEL_SWAPS = Counter(
    "inferlane_model_swaps_total", "Model versions swapped in without a restart",
    ["lane", "model"], registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter(
    "inferlane_model_load_failures_total",
    "Model versions refused (sha256 mismatch, unreadable card or file, rejected graph)",
    ["lane", "model"], registry=REGISTRY)
SHADOW_ROWS = Counter(
    "inferlane_shadow_rows_total", "Rows scored by the shadow model",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_ROWS = Counter(
    "inferlane_drift_rows_total", "Rows scored by both the INT8 and the FP32 file",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_FLIPS = Counter(
    "inferlane_drift_decision_flips_total",
    "Sampled rows whose decision differs between INT8 and FP32",
    ["lane", "model", "version"], registry=REGISTRY)
DRIFT_ABS_DELTA = Histogram(
    "inferlane_drift_abs_score_delta", "|INT8 score - FP32 score| of sampled rows",
    ["lane", "model", "version"], registry=REGISTRY,
    buckets=(1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))


_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
            5.0, 10.0)
E2E_LATENCY = Histogram(
    "inferlane_e2e_latency_seconds",
    "From the request's sent_at (else its record timestamp) to its result being built",
    ["lane"], registry=REGISTRY, buckets=_SECONDS)
CONSUME_LAG = Histogram(
    "inferlane_consume_lag_seconds",
    "Record timestamp to consumed, for the oldest record of each fetched partition batch",
    ["lane"], registry=REGISTRY, buckets=_SECONDS)
BATCH_QUEUE_WAIT = Histogram(
    "inferlane_batch_queue_wait_seconds",
    "How long the oldest row of a model batch waited in the micro-batcher",
    ["batcher"], registry=REGISTRY, buckets=_SECONDS)
BATCH_ROWS = Histogram(
    "inferlane_batch_rows", "Rows per model call", ["batcher"], registry=REGISTRY,
    buckets=tuple(float(1 << i) for i in range(17)))
HISTORY_FRESHNESS = Histogram(
    "inferlane_history_freshness_seconds",
    "From a transaction's sent_at until the fraud lane's history view holds the card state that "
    "includes it, per fraud.requests partition", ["partition"], registry=REGISTRY,
    buckets=_SECONDS)
DEGRADED = Counter(
    "inferlane_degraded_by_reason",
    "Scores on default history, by reason: no_history (the card has no earlier transaction), "
    "stale (the slow path lags more than the staleness bound), loading (the view's partition is "
    "not loaded yet), misrouted (the record is on a partition its key does not hash to: its "
    "history may be split)", ["lane", "reason"], registry=REGISTRY)
MISROUTED = Counter(
    "inferlane_misrouted_records",
    "Keyed records on a partition other than the expected partitioner (INFERLANE_PARTITIONER) "
    "gives their key; likely = the partitioner that does give it (crc32: librdkafka's "
    "default), or unknown", ["lane", "topic", "likely"], registry=REGISTRY)
LANE_UP = Gauge(
    "inferlane_lane_up",
    "1 while the lane runs, 0 while it is restarting after a crash (lanes off the latency "
    "path restart in-process; a real-time lane's crash ends the worker)", ["lane"],
    registry=REGISTRY)
LANE_RESTARTS = Counter(
    "inferlane_lane_restarts",
    "In-process restarts of a lane after a crash, by the crash's exception type",
    ["lane", "error"], registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "inferlane_inference_seconds", "Time of one model call (a whole batch)", ["batcher"],
    registry=REGISTRY, buckets=_SECONDS)
PRODUCE_ACK = Histogram(
    "inferlane_produce_ack_seconds",
    "From handing a lane's results to the producer to the broker's last ack", ["lane"],
    registry=REGISTRY, buckets=_SECONDS)
TXN_COMMIT = Histogram(
    "inferlane_transaction_commit_seconds",
    "Exactly-once lanes: from a partition's idle transaction to its commit acknowledged "
    "(offsets added + EndTxn)", ["lane"], registry=REGISTRY, buckets=_SECONDS)
S3_OBJECTS = Counter(
    "inferlane_s3_objects_total", "S3 calls that succeeded, by operation", ["op"],
    registry=REGISTRY)
S3_BYTES = Counter(
    "inferlane_s3_bytes_total", "Bytes written (put) or read (get, stream)", ["op"],
    registry=REGISTRY)
S3_ERRORS = Counter(
    "inferlane_s3_errors_total", "S3 calls that failed, by operation and retriable",
    ["op", "retriable"], registry=REGISTRY)
S3_RETRIES = Counter(
    "inferlane_s3_retries_total", "Retries of S3 work after a retriable failure",
    registry=REGISTRY)
CPU_PER_1K_EVENTS = Gauge(
    "inferlane_cpu_seconds_per_1k_events",
    "Process CPU seconds per 1,000 events consumed by all its lanes, over the last stats "
    "interval (10 s)", registry=REGISTRY)


class _InFlight(Protocol):
    @property
    def total_in_flight(self) -> int: ...


class CollectedLane(Protocol):
    """What the collector reads of a lane (:class:`pipeline.kafka.lane.Lane` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> Any: ...

    @property
    def tracker(self) -> _InFlight: ...

    def consumer_lag(self) -> dict[tuple[str, int], int]: ...


class LaneCollector(Collector):  # type: ignore[misc]
    """Reads every registered lane's counters and consumer lag at scrape time."""

    def __init__(self) -> None:
        self._lanes: dict[str, CollectedLane] = {}
        self._cpu_mark: tuple[float, int] | None = None

    def register(self, lane: CollectedLane) -> None:
        self._lanes[lane.name] = lane

    def unregister(self, lane: CollectedLane) -> None:
        if self._lanes.get(lane.name) is lane:
            del self._lanes[lane.name]

    def describe(self) -> Iterable[Metric]:
        return []  # label sets change at run time: collected each scrape

    def collect(self) -> Iterator[Metric]:
        counters = {name: CounterMetricFamily(f"inferlane_{name}", text, labels=["lane"])
                    for name, text in _LANE_COUNTERS.items()}
        dead = CounterMetricFamily("inferlane_dead_letters_by_error",
                                   "Records dead-lettered, by error class",
                                   labels=["lane", "error"])
        in_flight = GaugeMetricFamily("inferlane_in_flight_records",
                                      "Records consumed whose results are not acked yet",
                                      labels=["lane"])
        lag = GaugeMetricFamily("inferlane_consumer_lag_records",
                                "High watermark minus the next offset the lane will consume",
                                labels=["lane", "topic", "partition"])
        for name, lane in sorted(self._lanes.items()):
            stats = lane.stats
            for field, family in counters.items():
                family.add_metric([name], float(getattr(stats, _STATS_FIELD.get(field, field))))
            for error, count in sorted(stats.dlq_reasons.items()):
                dead.add_metric([name, error], float(count))
            in_flight.add_metric([name], float(lane.tracker.total_in_flight))
            for (topic, partition), records in sorted(lane.consumer_lag().items()):
                lag.add_metric([name, topic, str(partition)], float(records))
        yield from counters.values()
        yield from (dead, in_flight, lag)

    def update_cpu_per_1k(self) -> None:
        """Refresh :data:`CPU_PER_1K_EVENTS` from the CPU and events since the last call."""
        cpu = time.process_time()
        events = sum(lane.stats.consumed for lane in self._lanes.values())
        if self._cpu_mark is not None and events > self._cpu_mark[1]:
            CPU_PER_1K_EVENTS.set((cpu - self._cpu_mark[0]) * 1000.0
                                  / (events - self._cpu_mark[1]))
        self._cpu_mark = (cpu, events)


_LANE_COUNTERS = {
    "events_in": "Records consumed by the lane",
    "events_out": "Results produced by the lane (acknowledged)",
    "dead_letters": "Records dead-lettered by the lane (all error classes)",
    "late": "Results produced after the lane's end-to-end budget",
    "degraded": "Results built on default history (stale or missing slow-path state)",
    "commits": "Offset commits",
    "commit_failures": "Offset commits that failed (retried with the next one)",
}
_STATS_FIELD = {"events_in": "consumed", "events_out": "produced",
                "dead_letters": "dead_lettered"}

#: The collector of this process's lanes (registered in :data:`REGISTRY`).
LANES = LaneCollector()
REGISTRY.register(LANES)


def render() -> bytes:
    """The registry in the Prometheus text exposition format."""
    return _generate_latest(REGISTRY)
