"""Pure computations of the benchmark: percentiles, rates, CPU cost, batch sizes, per scenario.

Everything here works on raw measurements (send times, receive times, CPU seconds) and has no
I/O, so it is unit-tested on synthetic inputs. Definitions used in the report:

* latency = receive time in the reader process - ``sent_at`` stamped by the load generator;
  results of events sent during the first ``warmup_s`` seconds are left out of the percentiles;
* offered ev/s = events sent / (last send - schedule start);
* achieved ev/s (rate scenarios) = results / (last result received - schedule start);
* drain ev/s = results / (last result received - time the SUT reported ready);
* CPU-s per 1k events = CPU seconds of the SUT process tree in the same window / results * 1000;
* an *output batch* = results stamped with the same ``scored_at`` (one scoring call's output).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BatchSummary",
    "LatencySummary",
    "Matched",
    "ScenarioResult",
    "batch_sizes",
    "batch_summary",
    "cpu_per_1k",
    "drain_result",
    "latency_summary",
    "match_results",
    "pow2_histogram",
    "rate",
    "rate_result",
]

ResultRow = tuple[str, float | None, float, float | None]
"""What the reader saw per result record: (event_id, sent_at, received_at, scored_at)."""


@dataclass(frozen=True)
class LatencySummary:
    """End-to-end latency percentiles in milliseconds over ``count`` results."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class BatchSummary:
    """Sizes of output batches (results sharing one ``scored_at``)."""

    batches: int
    mean: float
    p50: float
    p90: float
    max: int
    histogram: dict[int, int]
    """Batches per power-of-two size bucket (same bucketing as
    ``pipeline.batching.batcher.BatchStats``)."""


@dataclass(frozen=True)
class Matched:
    """Results matched to the events that were sent, in send order of arrival."""

    sent_at: NDArray[np.float64]
    received_at: NDArray[np.float64]
    scored_at: NDArray[np.float64]
    missing: int
    duplicates: int
    unexpected: int
    """Result records whose event id was not sent in this scenario."""

    @property
    def count(self) -> int:
        return len(self.received_at)

    @property
    def last_received(self) -> float | None:
        return float(self.received_at.max()) if self.count else None


@dataclass
class ScenarioResult:
    """Every number of one (implementation, scenario) pair; ``None`` = not measurable."""

    impl: str
    scenario: str
    target_rate: float | None
    sent: int
    received: int
    missing: int
    duplicates: int
    offered_rate: float | None
    achieved_rate: float | None
    latency: LatencySummary | None
    cpu_s: float | None
    cpu_per_1k: float | None
    window_s: float | None
    batches: BatchSummary | None
    extra: dict[str, Any] = field(default_factory=dict)


def latency_summary(latencies_ms: Sequence[float] | NDArray[np.float64]) -> LatencySummary | None:
    """p50/p90/p99/max (linear interpolation between closest ranks); None when empty."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencySummary(count=int(values.size), p50_ms=float(p50), p90_ms=float(p90),
                          p99_ms=float(p99), max_ms=float(values.max()))


def rate(events: int, start: float | None, end: float | None) -> float | None:
    """Events per second over ``[start, end]``; None when the window is empty or unknown."""
    if start is None or end is None or events <= 0 or end <= start:
        return None
    return events / (end - start)


def cpu_per_1k(cpu_s: float | None, events: int) -> float | None:
    """CPU seconds per 1,000 events; None without events or without a CPU reading."""
    if cpu_s is None or events <= 0:
        return None
    return cpu_s / events * 1000.0


def pow2_histogram(sizes: Iterable[int]) -> dict[int, int]:
    """Count sizes into power-of-two buckets: 1, 2, 4, 8, ... (a size goes to the next bucket)."""
    histogram: dict[int, int] = {}
    for size in sizes:
        bucket = 1 << max(int(size) - 1, 0).bit_length()
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return dict(sorted(histogram.items()))


def batch_sizes(scored_at: NDArray[np.float64]) -> NDArray[np.int64]:
    """Sizes of the groups of results that share an identical ``scored_at`` stamp."""
    stamps = scored_at[np.isfinite(scored_at)]
    if stamps.size == 0:
        return np.empty(0, dtype=np.int64)
    _, counts = np.unique(stamps, return_counts=True)
    return counts.astype(np.int64)


def batch_summary(scored_at: NDArray[np.float64]) -> BatchSummary | None:
    """Distribution of output batch sizes; None when no result carries ``scored_at``."""
    sizes = batch_sizes(scored_at)
    if sizes.size == 0:
        return None
    p50, p90 = np.percentile(sizes, [50, 90])
    return BatchSummary(batches=int(sizes.size), mean=float(sizes.mean()), p50=float(p50),
                        p90=float(p90), max=int(sizes.max()),
                        histogram=pow2_histogram(sizes.tolist()))


def match_results(sent_ids: Sequence[str], rows: Iterable[ResultRow]) -> Matched:
    """Keep the first result per sent event id; count missing, duplicate and foreign results."""
    wanted = set(sent_ids)
    seen: set[str] = set()
    kept: list[tuple[float, float, float]] = []
    duplicates = unexpected = 0
    for event_id, sent_at, received_at, scored_at in rows:
        if event_id not in wanted:
            unexpected += 1
        elif event_id in seen:
            duplicates += 1
        else:
            seen.add(event_id)
            kept.append((np.nan if sent_at is None else sent_at, received_at,
                         np.nan if scored_at is None else scored_at))
    table = np.asarray(kept, dtype=np.float64).reshape(-1, 3)
    return Matched(sent_at=table[:, 0], received_at=table[:, 1], scored_at=table[:, 2],
                   missing=len(wanted) - len(seen), duplicates=duplicates, unexpected=unexpected)


def rate_result(impl: str, *, target_rate: float, sent: int, started_at: float | None,
                last_sent: float | None, matched: Matched, cpu_s: float | None,
                warmup_s: float) -> ScenarioResult:
    """The numbers of one steady-rate scenario whose schedule started at ``started_at``."""
    latencies = (matched.received_at - matched.sent_at) * 1000.0
    if started_at is not None:
        latencies = latencies[matched.sent_at >= started_at + warmup_s]
    end = matched.last_received
    window = None if end is None or started_at is None else end - started_at
    return ScenarioResult(
        impl=impl, scenario=f"rate {target_rate:g}/s", target_rate=target_rate, sent=sent,
        received=matched.count, missing=matched.missing, duplicates=matched.duplicates,
        offered_rate=rate(sent, started_at, last_sent),
        achieved_rate=rate(matched.count, started_at, end),
        latency=latency_summary(latencies), cpu_s=cpu_s,
        cpu_per_1k=cpu_per_1k(cpu_s, matched.count), window_s=window,
        batches=batch_summary(matched.scored_at))


def drain_result(impl: str, *, sent: int, ready_at: float, matched: Matched,
                 cpu_s: float | None) -> ScenarioResult:
    """The numbers of a backlog drain: throughput from SUT ready to the last result."""
    end = matched.last_received
    first = float(matched.received_at.min()) if matched.count else None
    after_first = None if first is None else rate(matched.count - 1, first, end)
    return ScenarioResult(
        impl=impl, scenario="drain", target_rate=None, sent=sent, received=matched.count,
        missing=matched.missing, duplicates=matched.duplicates, offered_rate=None,
        achieved_rate=rate(matched.count, ready_at, end), latency=None, cpu_s=cpu_s,
        cpu_per_1k=cpu_per_1k(cpu_s, matched.count),
        window_s=None if end is None else end - ready_at,
        batches=batch_summary(matched.scored_at),
        extra={"first_result_after_ready_s": None if first is None else first - ready_at,
               "rate_after_first_result": after_first})
