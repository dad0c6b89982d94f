"""``inferlane bench batch``: one S3 job of N records through the batch lane, on the local stack.

Writes N synthetic transactions as one JSONL object, starts ``--workers`` worker processes with
``INFERLANE_LANES=batch``, submits the job and measures: rows/s from submission to the
``completed`` event, peak RSS of each worker, chunks taken by each worker; then reads every
output part back and checks that the output holds exactly one row per input row.

With ``realtime_rate > 0`` the workers also serve the fraud lane (``INFERLANE_LANES=fraud,batch``)
and the fraud lane's end-to-end latency is measured twice at that rate, open loop, with a
separate reader process: alone, then while the job runs (each on a fresh stack of the same
age), to show what the batch lane costs the real-time lane on the same worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from pipeline.bench.procstat import peak_rss_mb
from pipeline.bench.reader import ReaderProcess
from pipeline.bench.stats import match_results, rate_result
from pipeline.bench.sut import settings_for
from pipeline.bench.traffic import Arrivals, produce_open_loop
from pipeline.clients.batchclient import read_job_output, submit_job, wait_for_job
from pipeline.dev.loadgen import snapshot_end_offsets, write_transactions_jsonl
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import bench_stack
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings
from schemas import BatchJob

__all__ = ["BatchBenchResult", "run_batch_bench"]


@dataclass
class BatchBenchResult:
    """What one batch benchmark measured."""

    rows: int
    workers: int
    chunk_bytes: int
    input_bytes: int = 0
    seconds: float = 0.0
    rows_per_s: float = 0.0
    output_rows: int = 0
    distinct_output_ids: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    chunks_by_worker: dict[str, int] = field(default_factory=dict)
    peak_rss_mb_by_worker: dict[str, float] = field(default_factory=dict)
    realtime_rate: float = 0.0
    realtime_alone: dict[str, float | None] = field(default_factory=dict)
    realtime_during_job: dict[str, float | None] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.output_rows == self.rows == self.distinct_output_ids


def run_batch_bench(out: Path, *, rows: int, workers: int, chunk_bytes: int,
                    console: Console, realtime_rate: float = 0.0,
                    realtime_s: float = 20.0) -> BatchBenchResult:
    """Run the benchmark under ``out`` (stack data, logs, results.json); stop all it started.

    With ``realtime_rate``, the lane alone and the lane during the job are measured on two
    fresh stacks of the same age: the local broker slows as it accumulates data, so measuring
    one after the other on one stack would charge the drift to whichever came second.
    """
    result = BatchBenchResult(rows=rows, workers=workers, chunk_bytes=chunk_bytes,
                              realtime_rate=realtime_rate)
    lanes = "fraud,batch" if realtime_rate > 0 else "batch"
    if realtime_rate > 0:
        console.print(f"real-time lane alone at {realtime_rate:g} ev/s (fresh stack) ...")
        with _stack(out / "alone", workers=workers, lanes=lanes, chunk_bytes=chunk_bytes, rows=0,
                    console=console) as (env, settings, _procs):
            result.realtime_alone = _realtime(env, settings, out / "alone", "alone",
                                              realtime_rate, realtime_s)
    with _stack(out / "job", workers=workers, lanes=lanes, chunk_bytes=chunk_bytes, rows=rows,
                console=console) as (env, settings, procs):
        asyncio.run(_run_job(settings, result, console, env=env, out=out / "job",
                             realtime_s=realtime_s if realtime_rate > 0 else 0.0))
        _collect(procs, result)
    (out / "results.json").write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2))
    return result


@contextlib.contextmanager
def _stack(folder: Path, *, workers: int, lanes: str, chunk_bytes: int, rows: int,
           console: Console) -> Iterator[tuple[dict[str, str], Settings, list[WorkerProcess]]]:
    """A fresh local stack, ``rows`` input records in S3, ``workers`` started; all stopped."""
    stack = bench_stack(folder / "stack")
    procs: list[WorkerProcess] = []
    try:
        env = {**stack.start().env(), "INFERLANE_LANES": lanes,
               "INFERLANE_APP_ID": "bench-batch", "INFERLANE_TOPIC_PREFIX": "benchbatch.",
               "INFERLANE_WEB_ENABLED": "false", "INFERLANE_BATCH_CHUNK_BYTES": str(chunk_bytes)}
        settings = settings_for(env)
        asyncio.run(ensure_topics(settings))
        if rows:
            console.print(f"writing {rows:,} records to S3 ...")
            asyncio.run(write_transactions_jsonl(settings, "bench/input.jsonl", rows))
            # The input's million objects stay alive here: keep them out of the garbage
            # collector's scans, whose pauses would land in this process's generator.
            gc.collect()
            gc.freeze()
        for i in range(workers):
            proc = WorkerProcess({**env, "INFERLANE_WORKER_ID": f"batch-{i}",
                                  "INFERLANE_STATE_DIR": str(folder / "state" / str(i))},
                                 folder / "logs" / f"worker-{i}.log", label=f"worker-{i}")
            procs.append(proc)
            proc.start()
        yield env, settings, procs
    finally:
        for proc in procs:
            proc.terminate()
        stack.stop()


async def _run_job(settings: Settings, result: BatchBenchResult, console: Console, *,
                   env: dict[str, str], out: Path, realtime_s: float) -> None:
    start = await snapshot_end_offsets(settings, settings.topic("batch.results"))
    job = BatchJob(job_id="bench-job", model="fraud",
                   input_uri=f"s3://{settings.s3_bucket}/bench/input.jsonl")
    console.print("job submitted; waiting for completion ...")
    started = time.monotonic()
    await submit_job(settings, job)
    if realtime_s > 0:
        console.print(f"real-time lane at {result.realtime_rate:g} ev/s during the job ...")
        result.realtime_during_job = await asyncio.to_thread(
            _realtime, env, settings, out, "during-job", result.realtime_rate, realtime_s)
    final = await wait_for_job(settings, job.job_id, start, timeout_s=1800)
    result.seconds = time.monotonic() - started
    result.rows_per_s = result.rows / result.seconds
    result.counts = dict(final.get("counts", {}))
    lines = await read_job_output(settings, "batch/bench-job/")
    result.output_rows = len(lines)
    result.distinct_output_ids = len({orjson.loads(line)["event_id"] for line in lines})


def _realtime(env: dict[str, str], settings: Settings, out: Path, name: str, rate: float,
              seconds: float) -> dict[str, float | None]:
    """Open-loop fraud traffic at ``rate`` for ``seconds``; latency summary from a reader
    process (the same machinery as ``inferlane bench run``)."""
    reader = ReaderProcess(env, settings.topic("fraud.scores"), out / "work",
                           out / "logs" / f"realtime-{name}-reader.log")
    try:
        reader.start()
        sent = asyncio.run(produce_open_loop(settings, Arrivals.constant(rate, seconds), seed=7))
        reader.request(sent.ids, 30.0)
        output = reader.collect(60.0)
    finally:
        reader.close()
    # Every result (event id, sent_at, read at, scored_at) for a look at the tail over time.
    (out / f"realtime-{name}-rows.json").write_bytes(orjson.dumps(output.rows))
    matched = match_results(sent.ids, output.rows)
    summary = rate_result("a", target_rate=rate, sent=len(sent.ids), started_at=sent.started_at,
                          last_sent=sent.last_at, matched=matched, cpu_s=None, warmup_s=2.0)
    latency = summary.latency
    return {"sent": float(summary.sent), "missing": float(summary.missing),
            "p50_ms": latency.p50_ms if latency else None,
            "p99_ms": latency.p99_ms if latency else None,
            "max_ms": latency.max_ms if latency else None}


def _collect(procs: list[WorkerProcess], result: BatchBenchResult) -> None:
    for proc in procs:
        if proc.pid is not None:
            result.peak_rss_mb_by_worker[proc.label] = peak_rss_mb(proc.pid) or 0.0
        result.chunks_by_worker[proc.label] = len(
            re.findall(r"batch: job bench-job chunk", proc.log_text()))


def render(result: BatchBenchResult) -> Table:
    """The table printed at the end."""
    table = Table(title=f"batch job: {result.rows:,} records, {result.workers} worker(s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("seconds, submit -> completed", f"{result.seconds:.1f}"),
        ("rows/s", f"{result.rows_per_s:,.0f}"),
        ("completed counts", str(result.counts)),
        ("output rows read back / distinct ids", f"{result.output_rows:,} / "
                                                 f"{result.distinct_output_ids:,}"),
        ("exactly one output row per input row", "yes" if result.exact else "NO"),
        ("chunks by worker", str(result.chunks_by_worker)),
        ("peak RSS MiB by worker", str({k: round(v) for k, v in
                                        result.peak_rss_mb_by_worker.items()})),
    ]
    if result.realtime_rate:
        rows += [(f"fraud lane at {result.realtime_rate:g} ev/s alone: p50 / p99 / max ms",
                  _latency(result.realtime_alone)),
                 (f"fraud lane at {result.realtime_rate:g} ev/s during the job",
                  _latency(result.realtime_during_job))]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _latency(summary: dict[str, float | None]) -> str:
    values = [summary.get(k) for k in ("p50_ms", "p99_ms", "max_ms")]
    text = " / ".join("-" if v is None else f"{v:.1f}" for v in values)
    return f"{text} (missing {int(summary.get('missing') or 0)})"

