"""``make demo`` / ``inferlane demo``: the whole fraud lane on the embedded local stack.

Starts the broker and S3 server, creates the topics, starts one ``faust -A agents worker``,
produces synthetic transactions (a few percent deliberately invalid) at a steady rate while a
reader follows ``fraud.scores`` and the DLQ, shows live progress, and after ``duration_s`` drains,
stops the worker gracefully (the archive writes its last windows), counts the S3 archive and
prints a summary. Everything it started is stopped before it returns, whatever happens.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.loadgen import ProduceReport, ResultReader, produce_transactions, snapshot_end_offsets
from pipeline.s3 import S3Store
from pipeline.settings import KNOWN_LANES, Settings, load_settings
from pipeline.stack import LocalStack
from pipeline.topics import ensure_topics
from pipeline.worker import WorkerProcess

__all__ = ["DemoSummary", "render_summary", "run_demo"]


@dataclass
class DemoSummary:
    """The numbers the demo prints, and ``ok`` when every event is accounted for."""

    produced: int
    valid: int
    invalid: int
    scored: int
    dead_lettered: int
    duplicates: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    s3_objects: int
    s3_records: int
    decisions: dict[str, int]
    degraded: int = 0
    labels: int = 0

    @property
    def ok(self) -> bool:
        return (self.scored + self.dead_lettered == self.produced
                and self.s3_records >= self.scored)


def run_demo(root: Path, *, duration_s: float, rate_per_s: float, invalid_fraction: float,
             console: Console) -> DemoSummary:
    """Run the demo under ``root`` (wiped first) and return its summary."""
    stack = LocalStack(root / "stack", fresh=True)
    console.print(f"[bold]inferlane demo[/] - starting the local stack under {root}")
    endpoints = stack.start()
    workers: list[WorkerProcess] = []
    try:
        env = {**endpoints.env(), "INFERLANE_ARCHIVE_MAX_AGE_MS": "5000",
               "INFERLANE_STATE_DIR": str(root / "state")}
        settings = load_settings(**{k[len("INFERLANE_"):].lower(): v for k, v in env.items()})
        asyncio.run(ensure_topics(settings))
        console.print(f"  broker {endpoints.kafka_bootstrap}  S3 {endpoints.s3_endpoint_url}")
        # The slow path runs in its own worker process: its faust agent never competes with
        # the real-time lanes for their interpreter (GIL), as recommended in docs/design.md.
        realtime = ",".join(lane for lane in KNOWN_LANES if lane != "history")
        for name, lanes in (("worker", realtime), ("history", "history")):
            worker = WorkerProcess({**env, "INFERLANE_WORKER_ID": f"demo-{name}",
                                    "INFERLANE_LANES": lanes}, root / "logs" / f"{name}.log",
                                   label=name)
            workers.append(worker)
            started = time.monotonic()
            worker.start()
            console.print(f"  {name} worker ({lanes}) ready in "
                          f"{time.monotonic() - started:.1f}s (log {worker.log_path})")
        return asyncio.run(_traffic(settings, workers, duration_s, rate_per_s,
                                    invalid_fraction, console))
    finally:
        for worker in workers:
            worker.terminate()
        stack.stop()


async def _traffic(settings: Settings, workers: list[WorkerProcess], duration_s: float,
                   rate_per_s: float, invalid_fraction: float, console: Console) -> DemoSummary:
    scores_topic, dlq_topic = settings.topic("fraud.scores"), settings.topic("fraud.requests.dlq")
    scores_from = await snapshot_end_offsets(settings, scores_topic)
    dlq_from = await snapshot_end_offsets(settings, dlq_topic)
    scores = ResultReader(settings, scores_topic, scores_from)
    dlq = ResultReader(settings, dlq_topic, dlq_from)
    async with scores, dlq:
        report = ProduceReport()
        with Live(_progress(report, scores, dlq, 0.0, duration_s), console=console,
                  refresh_per_second=4) as live:
            produce = asyncio.create_task(produce_transactions(
                settings, rate_per_s=rate_per_s, duration_s=duration_s,
                invalid_fraction=invalid_fraction, report=report))
            started = time.monotonic()
            while not produce.done():
                live.update(_progress(report, scores, dlq, time.monotonic() - started, duration_s))
                await asyncio.sleep(0.25)
            report = produce.result()
            await scores.wait_for(set(report.valid_ids), timeout_s=20)
            await dlq.wait_for_count(sum(report.invalid_by_kind.values()), timeout_s=10)
            live.update(_progress(report, scores, dlq, time.monotonic() - started, duration_s))
    console.print("  stopping the workers (the archive writes its last windows) ...")
    for worker in workers:
        await asyncio.to_thread(worker.terminate)
    objects, records = await _count_archive(settings, scores_topic)
    return _summary(report, scores, dlq, objects, records)


def _progress(report: ProduceReport, scores: ResultReader, dlq: ResultReader, elapsed: float,
              duration_s: float) -> Table:
    table = Table(title=f"fraud lane - {min(elapsed, duration_s):.0f}/{duration_s:.0f}s")
    for column in ("produced", "scored", "dead-lettered", "in flight", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    p50, p99 = _percentiles(scores.latencies_ms[-5000:])
    in_flight = report.sent - len(scores.results) - dlq.records
    table.add_row(f"{report.sent:,}", f"{len(scores.results):,}", f"{dlq.records:,}",
                  f"{max(in_flight, 0):,}", f"{p50:.1f}", f"{p99:.1f}")
    return table


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return float(p50), float(p99)


async def _count_archive(settings: Settings, topic: str) -> tuple[int, int]:
    objects = records = 0
    async with S3Store(settings) as store:
        async for key in store.list_keys(f"results/{topic}/"):
            objects += 1
            body = await store.get(key)
            records += len(gzip.decompress(body).splitlines())
    return objects, records


def _summary(report: ProduceReport, scores: ResultReader, dlq: ResultReader, objects: int,
             records: int) -> DemoSummary:
    decisions: dict[str, int] = {}
    degraded = 0
    for value in scores.results.values():
        decisions[value["decision"]] = decisions.get(value["decision"], 0) + 1
        degraded += bool(value.get("degraded"))
    latencies = np.asarray(scores.latencies_ms) if scores.latencies_ms else np.asarray([np.nan])
    p50, p99 = _percentiles(scores.latencies_ms)
    return DemoSummary(
        produced=report.sent, valid=len(report.valid_ids),
        invalid=sum(report.invalid_by_kind.values()), scored=len(scores.results),
        dead_lettered=dlq.records, duplicates=scores.duplicates, p50_ms=p50, p99_ms=p99,
        max_ms=float(np.nanmax(latencies)), s3_objects=objects, s3_records=records,
        decisions=decisions, degraded=degraded, labels=report.labels)


def render_summary(summary: DemoSummary, duration_s: float, rate_per_s: float) -> Table:
    """The closing table of the demo."""
    table = Table(title=f"inferlane demo summary ({duration_s:.0f}s at {rate_per_s:.0f} ev/s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("produced", f"{summary.produced:,}"),
        ("  valid / invalid", f"{summary.valid:,} / {summary.invalid:,}"),
        ("scored (fraud.scores)", f"{summary.scored:,}"),
        ("dead-lettered (fraud.requests.dlq)", f"{summary.dead_lettered:,}"),
        ("scored + dead-lettered == produced",
         "yes" if summary.scored + summary.dead_lettered == summary.produced else "NO"),
        ("duplicate results", f"{summary.duplicates:,}"),
        ("decisions", ", ".join(f"{k} {v:,}" for k, v in sorted(summary.decisions.items()))),
        ("scored on default history (degraded)",
         f"{summary.degraded:,} ({summary.degraded / max(summary.scored, 1):.1%})"),
        ("labels sent (fraud.labels)", f"{summary.labels:,}"),
        ("e2e latency p50 / p99 / max (ms)",
         f"{summary.p50_ms:.1f} / {summary.p99_ms:.1f} / {summary.max_ms:.1f}"),
        ("S3 archive objects", f"{summary.s3_objects:,}"),
        ("S3 archived records", f"{summary.s3_records:,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
