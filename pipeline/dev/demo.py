"""``make demo`` / ``inferlane demo``: the fraud and reco lanes on the embedded local stack.

Starts the broker and S3 server, creates the topics, starts two ``faust -A agents worker``
processes (the real-time lanes, and the fraud history slow path), produces synthetic
transactions with their delayed labels and recommendation requests (a few percent deliberately
invalid) at steady rates while readers follow ``fraud.scores``, ``reco.results`` and the DLQs,
shows live progress, and after ``duration_s`` drains, stops the workers gracefully (the archive
writes its last windows), counts the S3 archive and prints a summary. Everything it started is
stopped before it returns, whatever happens.
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

from pipeline.dev.loadgen import (
    RECO,
    ProduceReport,
    ResultReader,
    produce_requests,
    produce_transactions,
    snapshot_end_offsets,
)
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.recogen import RecoRequestSource
from pipeline.dev.stack import LocalStack
from pipeline.inference.serving import model_path
from pipeline.kafka.topics import ensure_topics
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings, load_settings

__all__ = ["WARMUP_S", "WORKER_LAYOUT", "DemoSummary", "RecoSummary", "render_summary",
           "run_demo"]


@dataclass
class RecoSummary:
    """The reco lane's share of the demo."""

    produced: int
    answered: int
    dead_lettered: int
    duplicates: int
    p50_ms: float
    p99_ms: float
    s3_records: int

    @property
    def ok(self) -> bool:
        return (self.answered + self.dead_lettered == self.produced
                and self.s3_records >= self.answered)


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
    reco: RecoSummary | None = None
    steady_p99_ms: float = float("nan")
    """p99 of the transactions sent after the first :data:`WARMUP_S` seconds."""
    degraded_by_reason: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return (self.scored + self.dead_lettered == self.produced
                and self.s3_records >= self.scored and (self.reco is None or self.reco.ok))


def run_demo(root: Path, *, duration_s: float, rate_per_s: float, invalid_fraction: float,
             console: Console, reco_rate_per_s: float = 0.0) -> DemoSummary:
    """Run the demo under ``root`` (wiped first) and return its summary; reco requests go at
    ``reco_rate_per_s`` alongside the transactions (0 = none)."""
    stack = LocalStack(root / "stack", fresh=True)
    console.print(f"[bold]inferlane demo[/] - starting the local stack under {root}")
    endpoints = stack.start()
    workers: list[WorkerProcess] = []
    try:
        env = {**endpoints.env(), "INFERLANE_ARCHIVE_MAX_AGE_MS": "5000",
               "INFERLANE_STATE_DIR": str(root / "state")}
        settings = load_settings(**{k[len("INFERLANE_"):].lower(): v for k, v in env.items()})
        asyncio.run(ensure_topics(settings))
        console.print(f"  broker {endpoints.kafka_bootstrap} (warmed up in "
                      f"{stack.warm_up_s or 0:.1f}s)  S3 {endpoints.s3_endpoint_url}")
        # The deployed layout (docs/design.md, "Which lanes share a process"): the real-time
        # lanes, the history slow path, and archive + batch each in a process of their own, so
        # neither the slow path nor the archive competes for the real-time lanes' interpreter.
        for name, lanes in WORKER_LAYOUT:
            worker = WorkerProcess({**env, "INFERLANE_WORKER_ID": f"demo-{name}",
                                    "INFERLANE_LANES": lanes}, root / "logs" / f"{name}.log",
                                   label=name)
            workers.append(worker)
            started = time.monotonic()
            worker.start()
            console.print(f"  {name} worker ({lanes}) ready in "
                          f"{time.monotonic() - started:.1f}s (log {worker.log_path})",
                          soft_wrap=True)
        return asyncio.run(_traffic(settings, workers, duration_s, rate_per_s,
                                    invalid_fraction, console, reco_rate_per_s))
    finally:
        for worker in workers:
            worker.terminate()
        stack.stop()


WORKER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("worker", "fraud,reco"), ("history", "history"), ("offpath", "archive,batch"))
"""The worker processes of the demo: (name, INFERLANE_LANES); every lane exactly once, as in
docker-compose.yml (tests/unit/test_deploy.py checks both)."""


class _RecoTraffic:
    """Reco requests at a steady rate, and readers of their results and dead letters."""

    def __init__(self, settings: Settings, rate_per_s: float) -> None:
        self.settings, self.rate_per_s = settings, rate_per_s
        self.report = ProduceReport()
        self.results: ResultReader | None = None
        self.dlq: ResultReader | None = None

    async def readers(self) -> tuple[ResultReader, ResultReader]:
        topics = [self.settings.topic(t) for t in (RECO.results_topic, RECO.dlq_topic)]
        starts = [await snapshot_end_offsets(self.settings, t) for t in topics]
        self.results = ResultReader(self.settings, topics[0], starts[0], id_field=RECO.id_field)
        self.dlq = ResultReader(self.settings, topics[1], starts[1])
        return self.results, self.dlq

    async def produce(self, duration_s: float, invalid_fraction: float) -> ProduceReport:
        if self.rate_per_s <= 0:
            return self.report
        source = RecoRequestSource.for_model(
            await model_path(self.settings, "reco"), seed=7)
        return await produce_requests(self.settings, source, rate_per_s=self.rate_per_s,
                                      duration_s=duration_s, invalid_fraction=invalid_fraction,
                                      seed=7, report=self.report)

    async def drain(self) -> None:
        assert self.results is not None and self.dlq is not None  # noqa: S101
        await self.results.wait_for(set(self.report.valid_ids), timeout_s=20)
        await self.dlq.wait_for_count(sum(self.report.invalid_by_kind.values()), timeout_s=10)


async def _traffic(settings: Settings, workers: list[WorkerProcess], duration_s: float,
                   rate_per_s: float, invalid_fraction: float, console: Console,
                   reco_rate_per_s: float) -> DemoSummary:
    scores_topic, dlq_topic = settings.topic("fraud.scores"), settings.topic("fraud.requests.dlq")
    scores_from = await snapshot_end_offsets(settings, scores_topic)
    dlq_from = await snapshot_end_offsets(settings, dlq_topic)
    scores = ResultReader(settings, scores_topic, scores_from)
    dlq = ResultReader(settings, dlq_topic, dlq_from)
    reco = _RecoTraffic(settings, reco_rate_per_s)
    reco_results, reco_dlq = await reco.readers()
    async with scores, dlq, reco_results, reco_dlq:
        report = ProduceReport()
        rows = [("fraud", report, scores, dlq), ("reco", reco.report, reco_results, reco_dlq)]
        with Live(_progress(rows, 0.0, duration_s), console=console,
                  refresh_per_second=4) as live:
            produce = asyncio.gather(produce_transactions(
                settings, rate_per_s=rate_per_s, duration_s=duration_s,
                invalid_fraction=invalid_fraction, report=report),
                reco.produce(duration_s, invalid_fraction))
            started = time.monotonic()
            while not produce.done():
                live.update(_progress(rows, time.monotonic() - started, duration_s))
                await asyncio.sleep(0.25)
            report = produce.result()[0]
            await scores.wait_for(set(report.valid_ids), timeout_s=20)
            await dlq.wait_for_count(sum(report.invalid_by_kind.values()), timeout_s=10)
            await reco.drain()
            live.update(_progress(rows, time.monotonic() - started, duration_s))
    console.print("  stopping the workers (the archive writes its last windows) ...")
    for worker in workers:
        await asyncio.to_thread(worker.terminate)
    objects, records = await _count_archive(settings, scores_topic)
    summary = _summary(report, scores, dlq, objects, records)
    if reco_rate_per_s > 0:
        _, reco_records = await _count_archive(settings, settings.topic(RECO.results_topic))
        summary.reco = _reco_summary(reco.report, reco_results, reco_dlq, reco_records)
    return summary


_Row = tuple[str, ProduceReport, ResultReader, ResultReader]


def _progress(rows: list[_Row], elapsed: float, duration_s: float) -> Table:
    table = Table(title=f"inferlane demo - {min(elapsed, duration_s):.0f}/{duration_s:.0f}s")
    for column in ("lane", "produced", "answered", "dead-lettered", "in flight", "p50 ms",
                   "p99 ms"):
        table.add_column(column, justify="right")
    for lane, report, results, dlq in rows:
        p50, p99 = _percentiles(results.latencies_ms[-5000:])
        in_flight = report.sent - len(results.results) - dlq.records
        table.add_row(lane, f"{report.sent:,}", f"{len(results.results):,}", f"{dlq.records:,}",
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


WARMUP_S = 5.0
"""The summary also gives the p99 of the transactions sent after the first seconds: a fresh
broker JVM once made those seconds the whole tail (p99 295 ms in the first 2 s, 15-30 ms
later); the stack's quick JIT mode and warm-up fixed that (docs/performance.md, "A fresh
broker's first seconds"), and the line shows whether a tail is a cold start or steady."""


def _summary(report: ProduceReport, scores: ResultReader, dlq: ResultReader, objects: int,
             records: int) -> DemoSummary:
    decisions: dict[str, int] = {}
    degraded = 0
    reasons: dict[str, int] = {}
    sent = [v["sent_at"] for v in scores.results.values() if isinstance(v.get("sent_at"), float)]
    steady_from = (min(sent) if sent else 0.0) + WARMUP_S
    steady: list[float] = []
    for value in scores.results.values():
        decisions[value["decision"]] = decisions.get(value["decision"], 0) + 1
        if value.get("degraded"):
            degraded += 1
            reason = str(value.get("degraded_reason") or "unknown")
            reasons[reason] = reasons.get(reason, 0) + 1
        sent_at = value.get("sent_at")
        if isinstance(sent_at, float) and sent_at >= steady_from:
            steady.append((value["scored_at"] - sent_at) * 1000.0)
    latencies = np.asarray(scores.latencies_ms) if scores.latencies_ms else np.asarray([np.nan])
    p50, p99 = _percentiles(scores.latencies_ms)
    return DemoSummary(
        produced=report.sent, valid=len(report.valid_ids),
        invalid=sum(report.invalid_by_kind.values()), scored=len(scores.results),
        dead_lettered=dlq.records, duplicates=scores.duplicates, p50_ms=p50, p99_ms=p99,
        max_ms=float(np.nanmax(latencies)), s3_objects=objects, s3_records=records,
        decisions=decisions, degraded=degraded, labels=report.labels,
        steady_p99_ms=_percentiles(steady)[1], degraded_by_reason=reasons)


def _reco_summary(report: ProduceReport, results: ResultReader, dlq: ResultReader,
                  s3_records: int) -> RecoSummary:
    p50, p99 = _percentiles(results.latencies_ms)
    return RecoSummary(produced=report.sent, answered=len(results.results),
                       dead_lettered=dlq.records, duplicates=results.duplicates, p50_ms=p50,
                       p99_ms=p99, s3_records=s3_records)


def render_summary(summary: DemoSummary, duration_s: float, rate_per_s: float,
                   budget_ms: float = 50.0) -> Table:
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
        ("degraded (history missing or partial)",
         f"{summary.degraded:,} ({summary.degraded / max(summary.scored, 1):.1%})"),
        ("  by reason", ", ".join(f"{k} {v:,}" for k, v in
                                  sorted((summary.degraded_by_reason or {}).items())) or "-"),
        ("labels sent (fraud.labels)", f"{summary.labels:,}"),
        (f"e2e latency p50 / p99 / max (ms; budget p99 {budget_ms:.0f})",
         f"{summary.p50_ms:.1f} / {summary.p99_ms:.1f} / {summary.max_ms:.1f} "
         + ("(met)" if summary.p99_ms <= budget_ms else "(OVER)")),
        (f"e2e p99 after the first {WARMUP_S:.0f} s", f"{summary.steady_p99_ms:.1f}"),
        ("S3 archive objects", f"{summary.s3_objects:,}"),
        ("S3 archived records", f"{summary.s3_records:,}"),
    ]
    if (reco := summary.reco) is not None:
        rows += [
            ("reco requests produced", f"{reco.produced:,}"),
            ("reco results + dead-lettered == produced",
             f"{reco.answered:,} + {reco.dead_lettered:,}: "
             + ("yes" if reco.answered + reco.dead_lettered == reco.produced else "NO")),
            ("reco e2e latency p50 / p99 (ms)", f"{reco.p50_ms:.1f} / {reco.p99_ms:.1f}"),
            ("reco results archived in S3", f"{reco.s3_records:,}"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table
