"""``inferlane bench soak``: the fraud lane under steady load for minutes, reported per minute.

On a fresh local stack: the fraud worker and its history worker (as deployed), open-loop
transactions at ``rate`` for ``minutes``, one result reader process for the whole run. Every
5 s the resident memory (VmRSS) of the worker, the history worker and the broker is sampled;
at the end each minute gets the latency percentiles of the events *sent* in it, its results
and missing count, and the peak RSS of each process in it. The local broker keeps every record
in memory (docs/design.md), so its RSS is expected to grow with the run; the worker's should not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from pipeline.bench.procstat import rss_mb
from pipeline.bench.reader import ReaderProcess
from pipeline.bench.stats import ResultRow
from pipeline.bench.sut import IMPLS, SutProcess, impl_env, settings_for
from pipeline.bench.traffic import Arrivals, produce_open_loop
from pipeline.dev.stack import bench_stack
from pipeline.kafka.topics import ensure_topics

__all__ = ["SoakMinute", "SoakResult", "render", "run_soak"]

_SAMPLE_S = 5.0


@dataclass
class SoakResult:
    """The whole soak: events sent (acknowledged by the broker), results, and each minute."""

    rate: float
    sent: int
    """Events whose send the broker acknowledged within the run."""
    unacknowledged: int
    """Events sent whose ack never came (the broker may still have written them)."""
    results: int
    """Distinct events of ``sent`` that have a result."""
    minutes: list[SoakMinute]

    @property
    def missing(self) -> int:
        return self.sent - self.results


@dataclass
class SoakMinute:
    """What one minute of the soak measured."""

    minute: int
    results: int = 0
    """Results read by the end of the run (60 s after the last send) of events sent in it
    (the generator falls behind its schedule when the machine saturates: a minute then holds
    fewer events)."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    rss_mib: dict[str, float] = field(default_factory=dict)
    """Peak VmRSS in this minute, per process."""


class _RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int | None]) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids = pids
        self.samples: list[tuple[float, str, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(_SAMPLE_S):
            now = time.time()
            for name, pid in self.pids.items():
                if pid is not None and (rss := rss_mb(pid)) is not None:
                    self.samples.append((now, name, rss))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=_SAMPLE_S * 2)


def run_soak(out: Path, *, minutes: int, rate: float, seed: int, console: Console,
             external: dict[str, str] | None = None) -> SoakResult:
    """Run the soak under ``out``; write ``results.json``; stop everything it started.

    ``external``: the ``INFERLANE_*`` variables of a Kafka (and S3) to use instead of a fresh
    local stack, e.g. Apache Kafka from docker-compose; the run gets topics and groups of its
    own (prefix ``benchsoak<UTC time>.``) and the broker's memory is not sampled."""
    stack = None if external is not None else bench_stack(out / "stack")
    worker: SutProcess | None = None
    reader: ReaderProcess | None = None
    try:
        base = stack.start().env() if stack is not None else dict(external or {})
        # A shared broker keeps earlier runs' topics and groups: this run gets its own.
        tag = "soak" + (time.strftime("%Y%m%d%H%M%S", time.gmtime()) if stack is None else "")
        env = impl_env(base, tag=tag, impl="a", phase="soak", state_dir=out / "state")
        settings = settings_for(env)
        asyncio.run(ensure_topics(settings))
        worker = SutProcess(IMPLS["a"], env, out / "logs" / "worker.log", cwd=Path.cwd())
        worker.start()
        reader = ReaderProcess(env, settings.topic("fraud.scores"), out / "work",
                               out / "logs" / "reader.log")
        reader.start()
        sampler = _RssSampler({"fraud worker": worker.pid, "history worker": (
            worker.companion.pid if worker.companion else None),
            "broker": stack.broker.pid if stack and stack.broker else None})
        sampler.start()
        console.print(f"soak: {rate:g} ev/s for {minutes} min ...")
        started = time.time()
        sent = asyncio.run(produce_open_loop(settings, Arrivals.constant(rate, minutes * 60.0),
                                             seed=seed))
        reader.request(sent.ids, 60.0)
        output = reader.collect(120.0)
        sampler.stop()
    finally:
        if reader is not None:
            reader.close()
        if worker is not None:
            worker.stop()
        if stack is not None:
            stack.stop()
    scored = {row[0] for row in output.rows}
    result = SoakResult(rate, len(sent.ids), sent.unsent, len(scored.intersection(sent.ids)),
                        _per_minute(started, minutes, output.rows, sampler.samples))
    (out / "results.json").write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2))
    return result


def _per_minute(started: float, minutes: int, rows: list[ResultRow],
                samples: list[tuple[float, str, float]]) -> list[SoakMinute]:
    result = [SoakMinute(minute=i + 1) for i in range(minutes)]
    per_minute: list[list[float]] = [[] for _ in range(minutes)]
    for _, sent_at, received_at, _ in rows:
        if sent_at is not None:
            index = min(int((sent_at - started) // 60), minutes - 1)
            per_minute[max(index, 0)].append((received_at - sent_at) * 1000.0)
    for minute, latencies in zip(result, per_minute, strict=True):
        minute.results = len(latencies)
        if latencies:
            values = np.asarray(latencies)
            minute.p50_ms, minute.p99_ms, minute.max_ms = (
                round(float(np.percentile(values, q)), 1) for q in (50, 99, 100))
    for when, name, rss in samples:
        index = min(max(int((when - started) // 60), 0), minutes - 1)
        peaks = result[index].rss_mib
        peaks[name] = round(max(peaks.get(name, 0.0), rss), 1)
    return result


def render(result: SoakResult) -> Table:
    """One row per minute: results by send minute, latency, RSS per process."""
    names = sorted({name for minute in result.minutes for name in minute.rss_mib})
    table = Table(title=f"soak: fraud lane offered {result.rate:g} ev/s: {result.sent:,} sent "
                        f"(= {result.sent / (60 * len(result.minutes)):,.0f}/s), "
                        f"{result.results:,} of them scored, {result.missing:,} missing; "
                        f"{result.unacknowledged:,} sends never acknowledged")
    for column in ("minute", "results", "p50 ms", "p99 ms", "max ms",
                   *(f"RSS {n} MiB" for n in names)):
        table.add_column(column, justify="right")
    for m in result.minutes:
        table.add_row(str(m.minute), f"{m.results:,}", *(
            "-" if v is None else f"{v:.1f}" for v in (m.p50_ms, m.p99_ms, m.max_ms)),
            *(f"{m.rss_mib.get(n, 0.0):.0f}" for n in names))
    return table
