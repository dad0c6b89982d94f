"""``inferlane bench run|reco|batch|service|soak``: the typer sub-application of the benchmarks.

Registered by the main CLI as ``app.add_typer(bench_app, name="bench")``; also runnable alone
as ``python -m pipeline.bench run --quick``. Writes ``results.md``, ``results.json`` and
``latency.png`` into the results folder, prints the table, and exits 1 when an event had no
result or a phase failed (after writing everything it has).
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, NamedTuple

import typer
from rich.console import Console

from pipeline.bench.report import BenchConfig, BenchRun, rich_table, write_results
from pipeline.bench.sut import IMPLS

__all__ = ["bench_app"]

bench_app = typer.Typer(
    help="Benchmarks on the local stack: the fraud lane against two yardsticks (naive faust "
         "agent, bare aiokafka loop), the history slow path, the reco lane, the batch lane, "
         "the fraud-check service.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Piped output gets a table wide enough to read instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 132)



class _Preset(NamedTuple):
    rates: tuple[float, ...]
    duration_s: float
    drain_events: int


_FULL = _Preset((100.0, 1000.0, 5000.0), 20.0, 100_000)
_QUICK = _Preset((100.0, 1000.0), 5.0, 20_000)


@bench_app.callback()
def _group() -> None:
    """Benchmarks of the lanes on the local stack."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _impls(text: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [key for key in keys if key not in IMPLS]
    if unknown or not keys:
        raise typer.BadParameter(f"choose from {','.join(IMPLS)}; got {text!r}")
    return keys


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"comma-separated events/s, got {text!r}") from None
    if any(r <= 0 for r in rates):
        raise typer.BadParameter("rates must be > 0")
    return rates


def _results_folder(out: Path | None, kind: str = "") -> Path:
    """``--out``, else ``bench-results/<kind>-<UTC timestamp>`` (no kind: the timestamp)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return (out or Path("bench-results") / (f"{kind}-{stamp}" if kind else stamp)).resolve()


def _config(impl: str, rates: str | None, duration: float | None, drain_events: int | None,
            out: Path | None, poisson: bool, quick: bool, warmup: float,
            result_timeout: float, seed: int, drain_workers: int = 1, workers: int = 1,
            brokers: int = 1, secure: bool = False) -> BenchConfig:
    preset = _QUICK if quick else _FULL
    impls = _impls(impl)
    if max(drain_workers, workers) > 1 and any(IMPLS[key].yardstick for key in impls):
        raise typer.BadParameter("--drain-workers / --workers > 1 run inferlane's own workers: "
                                 "--impl a or r only")
    return BenchConfig(
        drain_workers=drain_workers, workers=workers, brokers=brokers, secure=secure,
        impls=impls,
        rates=_rates(rates) if rates is not None else preset.rates,
        duration_s=duration if duration is not None else preset.duration_s,
        drain_events=drain_events if drain_events is not None else preset.drain_events,
        warmup_s=warmup, poisson=poisson,
        out=_results_folder(out),
        result_timeout_s=result_timeout, seed=seed, quick=quick)


def _run(config: BenchConfig) -> int:
    """Run the scenarios of ``config``, write the results folder; the exit code."""
    from pipeline.bench.runner import new_run, run_bench

    signal.signal(signal.SIGTERM, _interrupt)
    record = new_run(config)
    try:
        run_bench(record, console)
    except KeyboardInterrupt:
        record.notes.append("interrupted: partial results")
        _finish(record)
        raise typer.Exit(130) from None
    return _finish(record)


def _finish(run: BenchRun) -> int:
    from pipeline.bench.plot import plot_results

    paths = write_results(run)
    paths.append(plot_results(run.results, run.labels, run.config.out / "latency.png"))
    console.print(rich_table(run))
    for note in run.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
    missing = sum(r.missing for r in run.results)
    if missing:
        console.print(f"[red]{missing:,} events had no result[/]")
    return 1 if missing or run.notes else 0


@bench_app.command("run")
def run(
    impl: Annotated[str, typer.Option(help="Implementations: a=lane, e=lane exactly-once "
                                           "(INFERLANE_DELIVERY=exactly_once), b=naive faust, "
                                           "c=bare aiokafka; worker layouts: w=every lane "
                                           "in one process, s=fraud,reco | history,archive,"
                                           "batch, t=fraud,reco | history | archive,batch."
                                           )] = "a,b,c",
    rates: Annotated[str | None, typer.Option(help="Offered loads, events/s "
                                                   "(default 100,1000,5000).")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds per rate (default 20).")] = None,
    drain_events: Annotated[int | None, typer.Option(help="Backlog size for the drain, 0 = "
                                                          "skip (default 100000).")] = None,
    out: Annotated[Path | None, typer.Option(help="Results folder (default "
                                                  "bench-results/<UTC timestamp>).")] = None,
    poisson: Annotated[bool, typer.Option("--poisson/--constant",
                                          help="Poisson or constant-rate arrivals.")] = False,
    quick: Annotated[bool, typer.Option(help="Rates 100,1000 for 5 s, drain 20,000.")] = False,
    warmup: Annotated[float, typer.Option(help="Seconds of latencies discarded.")] = 2.0,
    result_timeout: Annotated[float, typer.Option(help="Max wait for results after a rate, "
                                                       "s.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic traffic.")] = 1,
    drain_workers: Annotated[int, typer.Option(
        help="Worker processes draining the backlog together (one consumer group).",
        min=1, max=8)] = 1,
    workers: Annotated[int, typer.Option(
        help="Worker processes of the lane in the rate scenarios (one consumer group; more "
             "than the topic's 4 partitions would sit idle).", min=1, max=8)] = 1,
    brokers: Annotated[int, typer.Option(
        help="Kafka nodes of the local stack (3 = replication factor 3, min.insync 2).",
        min=1, max=5)] = 1,
    secure: Annotated[bool, typer.Option(
        help="A secure stack: every client over TLS with SCRAM-SHA-512, the authorizer "
             "checking ACLs (to measure what security costs).")] = False,
) -> None:
    """Run the scenarios on a fresh local stack and write the results folder."""
    config = _config(impl, rates, duration, drain_events, out, poisson, quick, warmup,
                     result_timeout, seed, drain_workers, workers, brokers, secure)
    raise typer.Exit(_run(config))


@bench_app.command("reco")
def reco(
    rates: Annotated[str, typer.Option(help="Offered loads, requests/s.")] = "2000",
    duration: Annotated[float, typer.Option(help="Seconds per rate.")] = 20.0,
    k: Annotated[int, typer.Option(help="Items asked for by every request.", min=1,
                                   max=100)] = 10,
    candidate_fraction: Annotated[float, typer.Option(
        help="Share of requests with 20-200 candidates (the rest rank the catalogue).",
        min=0.0, max=1.0)] = 0.2,
    drain_events: Annotated[int, typer.Option(help="Backlog size for the drain, 0 = "
                                                   "skip.")] = 20_000,
    out: Annotated[Path | None, typer.Option(help="Results folder (default "
                                                  "bench-results/reco-<UTC timestamp>).")] = None,
    poisson: Annotated[bool, typer.Option("--poisson/--constant",
                                          help="Poisson or constant-rate arrivals.")] = False,
    warmup: Annotated[float, typer.Option(help="Seconds of latencies discarded.")] = 2.0,
    result_timeout: Annotated[float, typer.Option(help="Max wait for results after a rate, "
                                                       "s.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic requests.")] = 1,
) -> None:
    """The reco lane: open-loop requests, end-to-end latency from sent_at, backlog drain."""
    config = BenchConfig(
        impls=("r",), rates=_rates(rates), duration_s=duration, drain_events=drain_events,
        warmup_s=warmup, poisson=poisson,
        out=_results_folder(out, "reco"),
        result_timeout_s=result_timeout, seed=seed, quick=False, reco_k=k,
        reco_candidate_fraction=candidate_fraction)
    raise typer.Exit(_run(config))


@bench_app.command("batch")
def batch(
    rows: Annotated[int, typer.Option(help="Records in the job.")] = 1_000_000,
    workers: Annotated[int, typer.Option(help="Worker processes sharing the job.")] = 1,
    chunk_mb: Annotated[float, typer.Option(help="Chunk size, MiB.")] = 16.0,
    out: Annotated[Path | None, typer.Option(help="Results folder (default "
                                                  "bench-results/batch-<UTC timestamp>).")] = None,
    realtime_rate: Annotated[float, typer.Option(
        help="Also serve the fraud lane at this rate, alone then during the job (0 = off).")] = 0,
    realtime_seconds: Annotated[float, typer.Option(help="Seconds of real-time traffic.")] = 20,
) -> None:
    """One S3 batch job end to end: rows/s, peak RSS, chunks per worker, exact output count."""
    from pipeline.bench.batchjob import render, run_batch_bench

    signal.signal(signal.SIGTERM, _interrupt)
    folder = _results_folder(out, "batch")
    result = run_batch_bench(folder, rows=rows, workers=workers,
                             chunk_bytes=int(chunk_mb * 1024 * 1024), console=console,
                             realtime_rate=realtime_rate, realtime_s=realtime_seconds)
    console.print(render(result))
    console.print(f"wrote {folder / 'results.json'}")
    raise typer.Exit(0 if result.exact else 1)



@bench_app.command("history")
def history(
    events: Annotated[int, typer.Option(help="Transactions in the backlog.", min=1000)] = 100_000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic transactions.")] = 1,
    out: Annotated[Path | None, typer.Option(
        help="Results folder (default bench-results/history-<UTC timestamp>).")] = None,
) -> None:
    """The history slow path alone: one worker drains a transaction backlog into the changelog."""
    from pipeline.bench.history import render as render_history
    from pipeline.bench.history import run_history_drain

    signal.signal(signal.SIGTERM, _interrupt)
    folder = _results_folder(out, "history")
    result = run_history_drain(folder, events=events, seed=seed, console=console)
    console.print(render_history(result))
    console.print(f"wrote {folder / 'results.json'}")


@bench_app.command("service")
def service(
    rate: Annotated[float, typer.Option(help="Offered load, requests/s.", min=1)] = 500,
    duration: Annotated[float, typer.Option(help="Seconds per budget.", min=1)] = 20,
    budgets: Annotated[str, typer.Option(help="Comma-separated fraud-check budgets, ms: one "
                                              "run each.")] = "50,1000",
    warmup: Annotated[float, typer.Option(help="Seconds of latencies discarded.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic transactions.")] = 1,
    out: Annotated[Path | None, typer.Option(
        help="Results folder (default bench-results/service-<UTC timestamp>).")] = None,
) -> None:
    """POST /v1/check latency through HTTP -> Kafka -> worker -> Kafka -> HTTP, open loop."""
    from pipeline.bench.service import render as render_service
    from pipeline.bench.service import run_service_bench

    signal.signal(signal.SIGTERM, _interrupt)
    folder = _results_folder(out, "service")
    results = run_service_bench(folder, rate=rate, duration_s=duration,
                                budgets=list(_rates(budgets)), warmup_s=warmup, seed=seed,
                                console=console)
    console.print(render_service(results))
    console.print(f"wrote {folder / 'results.json'}, {folder / 'latency.png'}")
    failed = sum(r.errors + r.sent - r.answered for r in results)
    raise typer.Exit(1 if failed else 0)


@bench_app.command("failover")
def failover(
    scenarios: Annotated[str, typer.Option(
        help="Comma-separated: leader (SIGKILL the node leading fraud.requests and "
             "fraud.scores partitions), rolling (restart every node in turn), controller "
             "(SIGKILL the KRaft controller leader).")] = "leader,rolling,controller",
    rate: Annotated[float, typer.Option(help="Transactions per second.", min=1)] = 2000,
    before: Annotated[float, typer.Option(help="Seconds of traffic before.", min=3)] = 10.0,
    down: Annotated[float, typer.Option(help="Seconds a killed node stays down.", min=0)] = 5.0,
    after: Annotated[float, typer.Option(help="Seconds of traffic after.", min=1)] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic transactions.")] = 7,
    out: Annotated[Path | None, typer.Option(
        help="Results folder (default bench-results/failover-<UTC timestamp>).")] = None,
) -> None:
    """Brokers of a three-node cluster fail under fraud traffic: lost events, history, the
    time until results flow again, p99 before / during / after."""
    from pipeline.bench.failover import SCENARIOS, FailoverConfig, run_failover
    from pipeline.bench.failover import render as render_failover

    chosen = tuple(s.strip() for s in scenarios.split(",") if s.strip())
    if not chosen or set(chosen) - set(SCENARIOS):
        raise typer.BadParameter(f"choose from {', '.join(SCENARIOS)}",
                                 param_hint="--scenarios")
    signal.signal(signal.SIGTERM, _interrupt)
    folder = _results_folder(out, "failover")
    results = run_failover(folder, scenarios=chosen, console=console, config=FailoverConfig(
        rate=rate, before_s=before, down_s=down, after_s=after, seed=seed))
    console.print(render_failover(results))
    console.print(f"wrote {folder / 'results.json'}")
    failed = [r.scenario for r in results if not r.ok]
    if failed:
        console.print(f"[red]events or history updates lost in: {', '.join(failed)}[/]")
    raise typer.Exit(1 if failed else 0)


@bench_app.command("soak")
def soak(
    minutes: Annotated[int, typer.Option(help="Minutes of traffic.", min=1)] = 10,
    rate: Annotated[float, typer.Option(help="Transactions per second.", min=1)] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic transactions.")] = 1,
    out: Annotated[Path | None, typer.Option(
        help="Results folder (default bench-results/soak-<UTC timestamp>).")] = None,
    external: Annotated[bool, typer.Option(
        "--external",
        help="Use the Kafka and S3 named by INFERLANE_KAFKA_BOOTSTRAP and INFERLANE_S3_* "
             "(e.g. Apache Kafka from docker-compose) instead of a fresh local stack.")] = False,
) -> None:
    """The fraud lane (+ history worker) under steady load: p50/p99 and RSS per minute."""
    from pipeline.bench.soak import render as render_soak
    from pipeline.bench.soak import run_soak

    signal.signal(signal.SIGTERM, _interrupt)
    folder = _results_folder(out, "soak")
    outside = None
    if external:
        outside = {k: v for k, v in os.environ.items() if k.startswith("INFERLANE_")}
        if "INFERLANE_KAFKA_BOOTSTRAP" not in outside:
            console.print("[red]--external needs INFERLANE_KAFKA_BOOTSTRAP (and the "
                          "INFERLANE_S3_* variables) in the environment[/]")
            raise typer.Exit(2)
    result = run_soak(folder, minutes=minutes, rate=rate, seed=seed, console=console,
                      external=outside)
    console.print(render_soak(result))
    console.print(f"wrote {folder / 'results.json'}")
    if result.missing:
        console.print(f"[red]{result.missing:,} events had no result by the end of the run[/]")
    raise typer.Exit(1 if result.missing else 0)
