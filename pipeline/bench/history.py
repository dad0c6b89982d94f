"""``inferlane bench history``: the history slow path alone drains a backlog of transactions.

On a fresh local stack: ``events`` transactions of the fraud v2 world (cards that come back,
as in production) are preloaded onto ``fraud.requests``; then one worker serving only the
history lane (``INFERLANE_LANES=history``) starts, and this process follows the history
changelog until, in every partition, the newest applied offset (``src_offset``) has reached the
last preloaded transaction. Reported: the drain time from the worker's ready mark (and from its
first changelog write, which leaves the start-up out), events/s, the worker's CPU seconds per
1,000 events, the cards and changelog records written. The changelog reader runs beside the
worker on the same cores (its CPU is not counted, its cost shows in the wall time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
from aiokafka import TopicPartition
from rich.console import Console
from rich.table import Table

from pipeline.bench.procstat import CpuSampler
from pipeline.bench.sut import impl_env, settings_for
from pipeline.bench.traffic import preload
from pipeline.dev.loadgen import HistoryTransactionSource, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess, faust_worker_argv
from pipeline.dev.stack import bench_stack
from pipeline.features.cardhistory import from_bytes
from pipeline.features.historyview import CHANGELOG
from pipeline.kafka.connection import start_reader
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings

__all__ = ["HistoryDrain", "render", "run_history_drain"]


@dataclass
class HistoryDrain:
    """What one drain of the history lane measured."""

    events: int
    seconds_from_ready: float
    seconds_from_first_write: float
    cpu_s: float | None
    changelog_records: int
    cards: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds_from_ready if self.seconds_from_ready else 0.0

    @property
    def steady_events_per_s(self) -> float:
        seconds = self.seconds_from_first_write
        return self.events / seconds if seconds else 0.0


def run_history_drain(out: Path, *, events: int, seed: int, console: Console) -> HistoryDrain:
    """Run the drain under ``out``; write ``results.json``; stop everything it started."""
    stack = bench_stack(out / "stack")
    worker: WorkerProcess | None = None
    try:
        env = {**impl_env(stack.start().env(), tag="", impl="a", phase="history",
                          state_dir=out / "state"), "INFERLANE_LANES": "history"}
        settings = settings_for(env)
        asyncio.run(ensure_topics(settings))
        source = HistoryTransactionSource(seed, start_ts=time.time() - 30 * 86_400.0)
        asyncio.run(preload(settings, events, seed=seed, source=source))
        ends = {tp.partition: end for tp, end in asyncio.run(
            snapshot_end_offsets(settings, settings.topic("fraud.requests"))).items()}
        console.print(f"history drain: {events:,} transactions preloaded; starting the worker")
        worker = WorkerProcess(env, out / "logs" / "history-worker.log", cwd=Path.cwd(),
                               argv=faust_worker_argv("agents"), label="history worker")
        worker.start(ready_timeout_s=120.0)
        assert worker.pid is not None  # noqa: S101 - started
        cpu = CpuSampler(worker.pid, interval_s=0.05).start()
        try:
            first, last, records, cards = asyncio.run(
                _follow(settings, ends, 120.0 + events / 1000))
        finally:
            cpu.stop()
        assert worker.ready_at is not None  # noqa: S101 - started
        spent = cpu.between(worker.ready_at, last)
    finally:
        if worker is not None:
            worker.terminate()
        stack.stop()
    result = HistoryDrain(events, round(last - worker.ready_at, 3), round(last - first, 3),
                          None if spent is None else round(spent, 2), records, cards)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(orjson.dumps(
        {**asdict(result), "events_per_s": round(result.events_per_s),
         "steady_events_per_s": round(result.steady_events_per_s)},
        option=orjson.OPT_INDENT_2))
    return result


async def _follow(settings: Settings, ends: dict[int, int],
                  timeout_s: float) -> tuple[float, float, int, int]:
    """Read the changelog until each partition's ``src_offset`` reached its last transaction;
    return the wall times of the first and the last needed record, records read and cards."""
    topic = settings.topic(CHANGELOG)
    reader = await start_reader(settings, "bench-history-follow", auto_offset_reset="earliest")
    applied = dict.fromkeys(ends, -1)
    cards: set[bytes] = set()
    first: float | None = None
    records = 0
    deadline = time.monotonic() + timeout_s
    try:
        reader.assign([TopicPartition(topic, p) for p in sorted(ends)])
        while any(applied[p] < ends[p] - 1 for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"history drain: changelog not caught up after {timeout_s:.0f}s"
                                   f" (applied {applied}, ends {ends})")
            fetched = await reader.getmany(timeout_ms=200, max_records=50_000)
            now = time.time()
            for tp, batch in fetched.items():
                if batch and first is None:
                    first = now
                for record in batch:
                    records += 1
                    if record.key is not None and record.value is not None:
                        cards.add(record.key)
                        applied[tp.partition] = max(applied[tp.partition],
                                                    from_bytes(record.value).src_offset)
        return first or time.time(), time.time(), records, len(cards)
    finally:
        await reader.stop()


def render(result: HistoryDrain) -> Table:
    table = Table(title=f"history slow path: {result.events:,}-transaction backlog, one worker "
                        "(INFERLANE_LANES=history)")
    for column in ("events/s (from ready)", "events/s (from first write)", "drain s",
                   "CPU s / 1k events", "changelog records", "cards"):
        table.add_column(column, justify="right")
    per_1k = "-" if result.cpu_s is None else f"{result.cpu_s * 1000 / result.events:.3f}"
    table.add_row(f"{result.events_per_s:,.0f}", f"{result.steady_events_per_s:,.0f}",
                  f"{result.seconds_from_ready:.2f}", per_1k, f"{result.changelog_records:,}",
                  f"{result.cards:,}")
    return table
