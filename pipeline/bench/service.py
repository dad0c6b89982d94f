"""``inferlane bench service``: ``POST /v1/check`` through the whole chain, open loop.

HTTP → fraud-check service → ``fraud.requests`` → fraud worker (+ its history worker) →
``fraud.scores`` → the service's reply consumer → HTTP answer. On a fresh local stack, per
budget: start ``inferlane serve fraud-check --budget-ms B``, send transactions at a fixed rate
from this process (aiohttp, no connection limit; the schedule is fixed in advance, so a slow
chain cannot slow the offered load), and measure every call's round trip **from its scheduled
send time** (a generator that falls behind is counted against the chain, not hidden), which
answers came from the pipeline and which from the rules, and each process's CPU.

A small budget (the default 50 ms) shows what callers get: latency capped near the budget, and
the share of answers that had to fall back. A large one (e.g. 1000 ms) shows the chain's own
latency, uncapped.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from pipeline.bench.procstat import ForeignCpuSampler, tree_cpu_seconds
from pipeline.bench.stats import latency_summary
from pipeline.bench.sut import IMPLS, SutProcess, impl_env, settings_for
from pipeline.dev.loadgen import HistoryTransactionSource
from pipeline.dev.processes import ServiceProcess
from pipeline.dev.stack import LocalStack, bench_stack
from pipeline.kafka.topics import ensure_topics

__all__ = ["ServiceBenchResult", "render", "run_service_bench"]

@dataclass
class ServiceBenchResult:
    """One budget's run."""

    budget_ms: float
    rate: float
    duration_s: float
    sent: int = 0
    answered: int = 0
    errors: int = 0
    """Calls without a 200 answer (HTTP error or connection failure)."""
    from_pipeline: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    degraded: int = 0
    round_trip_ms: dict[str, float] = field(default_factory=dict)
    """p50/p99/max of every answered call after the warm-up, from its scheduled send time."""
    pipeline_round_trip_ms: dict[str, float] = field(default_factory=dict)
    """The same for answers that carried the pipeline's score."""
    service_ms: dict[str, float] = field(default_factory=dict)
    """The service's own ``latency_ms`` (from receiving the request to the answer)."""
    max_generator_lag_ms: float = 0.0
    cpu_cores: dict[str, float] = field(default_factory=dict)
    """Average cores used during the run, per process (and foreign: other processes, steal)."""
    round_trips_ms: list[float] = field(default_factory=list, repr=False)
    """Every measured round trip (for the plot; not written to results.json)."""


@dataclass
class _Calls:
    round_trip_ms: list[float] = field(default_factory=list)
    pipeline_ms: list[float] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0


_JSON = {"Content-Type": "application/json"}


def run_service_bench(out: Path, *, rate: float, duration_s: float, budgets: list[float],
                      warmup_s: float, seed: int, console: Console) -> list[ServiceBenchResult]:
    """Run every budget on its own fresh stack and fraud worker (the local broker slows as it
    accumulates data, so runs sharing one would not be comparable); write ``results.json``."""
    results: list[ServiceBenchResult] = []
    for i, budget in enumerate(budgets):
        console.print(f"budget {budget:g} ms: {rate:g} req/s for {duration_s:g} s ...")
        folder = out / f"budget-{budget:g}"
        stack = bench_stack(folder / "stack")
        worker: SutProcess | None = None
        try:
            env = impl_env(stack.start().env(), tag="svc", impl="a", phase="service",
                           state_dir=folder / "state")
            asyncio.run(ensure_topics(settings_for(env)))
            worker = SutProcess(IMPLS["a"], env, folder / "logs" / "worker.log",
                                cwd=Path.cwd())
            worker.start()
            results.append(_one_budget(folder, env, worker, stack, budget, rate=rate,
                                       duration_s=duration_s, warmup_s=warmup_s,
                                       seed=seed + i))
        finally:
            if worker is not None:
                worker.stop()
            stack.stop()
    rows = [{k: v for k, v in asdict(r).items() if k != "round_trips_ms"} for r in results]
    (out / "results.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    plot_round_trips(results, out / "latency.png")
    return results


def _one_budget(out: Path, env: dict[str, str], worker: SutProcess, stack: LocalStack,
                budget_ms: float, *,
                rate: float, duration_s: float, warmup_s: float,
                seed: int) -> ServiceBenchResult:
    result = ServiceBenchResult(budget_ms=budget_ms, rate=rate, duration_s=duration_s)
    service = ServiceProcess("fraud-check", env, out / "logs" / f"service-{budget_ms:g}.log",
                             "--budget-ms", str(budget_ms), cwd=Path.cwd())
    service.start()
    try:
        pids = {"fraud worker": worker.pid, "history worker": (
            worker.companion.pid if worker.companion else None), "fraud-check service":
            service.pid, "broker": stack.broker.pid if stack.broker else None}
        before = {name: tree_cpu_seconds(pid) if pid else None for name, pid in pids.items()}
        own_before = time.process_time()
        foreign = ForeignCpuSampler(os.getpid()).start()
        started = time.monotonic()
        calls, sent, lag_ms = asyncio.run(_open_loop(service.url, rate, duration_s, warmup_s,
                                                     seed))
        elapsed = time.monotonic() - started
        result.cpu_cores["load generator (this process)"] = round(
            (time.process_time() - own_before) / elapsed, 3)
        foreign.stop()
        for name, pid in pids.items():
            after, first = (tree_cpu_seconds(pid) if pid else None), before[name]
            if after is not None and first is not None:
                result.cpu_cores[name] = round((after - first) / elapsed, 3)
        foreign_s = foreign.sample()
        if foreign_s is not None:
            result.cpu_cores["foreign (other processes, steal)"] = round(foreign_s / elapsed, 3)
    finally:
        service.terminate()
    _summarise(result, calls, sent, lag_ms)
    result.round_trips_ms = calls.round_trip_ms
    return result


def _summarise(result: ServiceBenchResult, calls: _Calls, sent: int, lag_ms: float) -> None:
    result.sent = sent
    result.answered = len(calls.answers)
    result.errors = calls.errors
    result.max_generator_lag_ms = round(lag_ms, 1)
    for answer in calls.answers:
        if answer["fallback"]:
            reason = str(answer.get("fallback_reason"))
            result.fallbacks[reason] = result.fallbacks.get(reason, 0) + 1
        else:
            result.from_pipeline += 1
        result.degraded += bool(answer["degraded"]) and not answer["fallback"]
    for target, values in ((result.round_trip_ms, calls.round_trip_ms),
                           (result.pipeline_round_trip_ms, calls.pipeline_ms),
                           (result.service_ms, calls.service_ms)):
        summary = latency_summary(values)
        if summary is not None:
            target.update(p50=round(summary.p50_ms, 1), p99=round(summary.p99_ms, 1),
                          max=round(summary.max_ms, 1))


async def _open_loop(url: str, rate: float, duration_s: float, warmup_s: float,
                     seed: int) -> tuple[_Calls, int, float]:
    """Send ``rate`` checks/s for ``duration_s`` on a fixed schedule; collect every answer."""
    count = int(rate * duration_s)
    txns = HistoryTransactionSource(seed, start_ts=time.time()).take(count)
    calls = _Calls()
    tasks: set[asyncio.Task[None]] = set()
    # Earlier runs' objects must not cost a full collection in the middle of the schedule.
    gc.collect()
    gc.freeze()
    max_lag_s = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        begin = time.monotonic()
        for i, txn in enumerate(txns):
            due = begin + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag_s = max(max_lag_s, time.monotonic() - due)
            task = asyncio.create_task(_call(session, url, txn, due, due - begin >= warmup_s,
                                             calls))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30.0)
    return calls, count, max_lag_s * 1000.0


async def _call(session: aiohttp.ClientSession, url: str, txn: dict[str, Any], due: float,
                measured: bool, calls: _Calls) -> None:
    try:
        async with session.post(f"{url}/v1/check", data=orjson.dumps(txn),
                                headers=_JSON) as response:
            body = orjson.loads(await response.read()) if response.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        body = None
    if body is None:
        calls.errors += 1
        return
    calls.answers.append(body)
    if measured:
        elapsed_ms = (time.monotonic() - due) * 1000.0
        calls.round_trip_ms.append(elapsed_ms)
        calls.service_ms.append(float(body["latency_ms"]))
        if not body["fallback"]:
            calls.pipeline_ms.append(elapsed_ms)


def render(results: list[ServiceBenchResult]) -> Table:
    """The table printed at the end: one column per budget."""
    table = Table(title="POST /v1/check through the whole chain (HTTP -> Kafka -> worker -> "
                        "Kafka -> HTTP)")
    table.add_column("measure")
    for result in results:
        table.add_column(f"budget {result.budget_ms:g} ms", justify="right")

    def row(name: str, values: list[str]) -> None:
        table.add_row(name, *values)

    row("offered rate, req/s x s", [f"{r.rate:g} x {r.duration_s:g}" for r in results])
    row("sent / answered / errors", [f"{r.sent:,} / {r.answered:,} / {r.errors}"
                                     for r in results])
    row("answered by the pipeline", [_share(r.from_pipeline, r.answered) for r in results])
    row("rules fallbacks by reason", [str(r.fallbacks or "-") for r in results])
    row("round trip p50 / p99 / max, ms", [_ms(r.round_trip_ms) for r in results])
    row("  pipeline answers only", [_ms(r.pipeline_round_trip_ms) for r in results])
    row("inside the service p50 / p99 / max", [_ms(r.service_ms) for r in results])
    row("generator max lag, ms", [f"{r.max_generator_lag_ms:.1f}" for r in results])
    for name in results[0].cpu_cores if results else ():
        row(f"CPU cores: {name}", [f"{r.cpu_cores.get(name, 0):.2f}" for r in results])
    return table


def plot_round_trips(results: list[ServiceBenchResult], path: Path) -> Path:
    """``latency.png``: the distribution (CDF) of round trips per budget, budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, result in enumerate(results):
        if not result.round_trips_ms:
            continue
        values = np.sort(np.asarray(result.round_trips_ms))
        share = np.arange(1, len(values) + 1) / len(values)
        ax.plot(values, share, color=f"C{index}",
                label=f"budget {result.budget_ms:g} ms ({result.rate:g} req/s)")
        ax.axvline(result.budget_ms, color=f"C{index}", linestyle=":", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("round trip from scheduled send, ms (log)")
    ax.set_ylabel("share of calls")
    ax.set_title("POST /v1/check through the whole chain")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _share(part: int, whole: int) -> str:
    return f"{part:,} ({100.0 * part / whole:.1f} %)" if whole else "-"


def _ms(summary: dict[str, float]) -> str:
    if not summary:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f} / {summary['max']:.1f}"
