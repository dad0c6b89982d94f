"""Drive one benchmark run: local stack up, each implementation in turn, everything stopped.

Per implementation, never two at once (the machine has few cores):

1. *rates*: start the SUT on fresh topics, then per offered rate start a result reader
   (separate process), send open-loop traffic for ``duration_s``, wait for every result (or the
   timeout), and compute latency, throughput and the SUT's CPU in that window;
2. *drain*: with the SUT stopped, preload ``drain_events`` on fresh topics, start the SUT
   (``drain_workers`` processes of one consumer group, booted side by side) and time the drain
   from the first one's ready mark to the last result.

Each phase has its own topic prefix and app id (consumer groups), so nothing is shared. A phase
that fails is recorded as a note and the run goes on; Ctrl-C/SIGTERM unwinds through the
``finally`` blocks, which stop every process this module started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

from aiokafka.errors import KafkaError
from rich.console import Console

from pipeline.bench.machine import machine_info
from pipeline.bench.procstat import CpuSampler, ForeignCpuSampler, peak_rss_mb
from pipeline.bench.reader import ReaderProcess
from pipeline.bench.report import BenchConfig, BenchRun, PhaseInfo, main_row
from pipeline.bench.stats import ScenarioResult, drain_result, match_results, rate_result
from pipeline.bench.sut import (
    IMPLS,
    SutProcess,
    impl_env,
    parse_batcher_stats,
    parse_logged_stats,
    settings_for,
)
from pipeline.bench.traffic import Arrivals, SentLog, preload, produce_open_loop
from pipeline.dev.loadgen import RECO, RequestSource, TransactionSource
from pipeline.dev.recogen import RecoRequestSource
from pipeline.dev.stack import LocalStack, bench_stack
from pipeline.errors import InferlaneError
from pipeline.inference.serving import model_path_now
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings

__all__ = ["new_run", "run_bench"]

_DRAIN_SEED_OFFSET = 1_000_000
_IDLE_S = 2.0
_LAG_NOTE_MS = 50.0
_FOREIGN_NOTE_CORES = 0.05




@dataclass
class _Ctx:
    config: BenchConfig
    base_env: dict[str, str]
    tag: str
    console: Console
    run: BenchRun
    foreign: ForeignCpuSampler
    """CPU of processes that are not part of this run, and steal (a shared machine distorts
    the tails)."""
    brokers: list[CpuSampler]
    """One per Kafka node of the stack: the broker side of each scenario's cost."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def new_run(config: BenchConfig) -> BenchRun:
    """An empty run record for ``config`` (filled in place by :func:`run_bench`)."""
    return BenchRun(config=config, machine=machine_info(),
                    labels={key: f"({key}) {IMPLS[key].label}" for key in config.impls},
                    started_at=_utc_now())


def run_bench(run: BenchRun, console: Console) -> BenchRun:
    """Run every requested implementation and scenario, filling ``run`` as results come."""
    config = run.config
    stack = bench_stack(config.out / "stack", brokers=config.brokers, secure=config.secure)
    console.print(f"[bold]inferlane bench[/] -> {config.out}")
    try:
        # The readiness probe's refused connections are expected; aiokafka would print them.
        kafka_log = logging.getLogger("aiokafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            endpoints = stack.start()
        finally:
            kafka_log.setLevel(level)
        console.print(f"  local stack: {config.brokers} broker(s) {endpoints.kafka_bootstrap} "
                      f"(JIT {stack.jit}, warmed up in {stack.warm_up_s or 0:.1f}s)")
        tag = datetime.now(timezone.utc).strftime("%H%M%S")
        base_env = _bench_user(stack, tag) if config.secure else endpoints.env()
        foreign = ForeignCpuSampler(os.getpid())
        foreign.start()
        brokers = [CpuSampler(proc.pid, interval_s=0.1).start()
                   for proc in stack.brokers.values() if proc.pid is not None]
        ctx = _Ctx(config, base_env, tag, console, run, foreign, brokers)
        try:
            for impl in config.impls:
                if config.rates:
                    _guarded(ctx, impl, "rates", partial(_rates_phase, ctx, impl))
                if config.drain_events > 0:
                    _guarded(ctx, impl, "drain", partial(_drain_phase, ctx, impl))
        finally:
            ctx.foreign.stop()
            for sampler in ctx.brokers:
                sampler.stop()
    finally:
        stack.stop()
        shutil.rmtree(stack.data_dir, ignore_errors=True)
        shutil.rmtree(config.out / "work", ignore_errors=True)
        run.finished_at = _utc_now()
    return run


def _bench_user(stack: LocalStack, tag: str) -> dict[str, str]:
    """On a secure stack: a SCRAM user allowed everything on this run's topics, groups and
    transactional ids (``bench<tag>`` prefixes, :func:`~pipeline.bench.sut.impl_env`) and
    the environment that connects as it over TLS."""
    return stack.add_user("bench", [[
        "--add", "--allow-principal", "User:bench", "--operation", "All",
        "--resource-pattern-type", "prefixed", "--topic", f"bench{tag}", "--group", f"bench{tag}",
        "--transactional-id", f"bench{tag}"]])


def _source(ctx: _Ctx, impl: str, settings: Settings, seed: int) -> RequestSource:
    """The traffic of ``impl``: reco requests for the reco lane, transactions otherwise."""
    if IMPLS[impl].workload == RECO:
        return RecoRequestSource.for_model(
            model_path_now(settings, "reco"), seed, k=ctx.config.reco_k,
            candidate_fraction=ctx.config.reco_candidate_fraction)
    return TransactionSource(seed, start_ts=time.time())


def _reader(ctx: _Ctx, impl: str, settings: Settings, env: dict[str, str],
            name: str) -> ReaderProcess:
    workload = IMPLS[impl].workload
    return ReaderProcess(env, settings.topic(workload.results_topic), ctx.config.out / "work",
                         ctx.config.out / "logs" / f"{impl}-{name}-reader.log",
                         id_field=workload.id_field)


def _guarded(ctx: _Ctx, impl: str, phase: str, body: Callable[[], None]) -> None:
    try:
        body()
    except (InferlaneError, KafkaError, OSError, RuntimeError, TimeoutError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        ctx.run.notes.append(f"({impl}) {phase} phase failed: {type(exc).__name__}: {first_line}")
        ctx.console.print(f"  [red]({impl}) {phase} failed:[/] {first_line}")


def _phase_env(ctx: _Ctx, impl: str, phase: str) -> tuple[dict[str, str], Settings]:
    env = impl_env(ctx.base_env, tag=ctx.tag, impl=impl, phase=phase,
                   state_dir=ctx.config.out / "state")
    settings = settings_for(env)
    asyncio.run(ensure_topics(settings))
    return env, settings


def _start_sut(ctx: _Ctx, impl: str, phase: str, env: dict[str, str], *,
               workers: int = 1) -> tuple[SutProcess, PhaseInfo]:
    log = ctx.config.out / "logs" / f"{impl}-{phase}.log"
    sut = SutProcess(IMPLS[impl], env, log, cwd=ctx.config.out / "state", workers=workers)
    info = PhaseInfo(impl=impl, phase=phase, log=str(log))
    ctx.run.phases.append(info)
    return sut, info


def _launch(ctx: _Ctx, sut: SutProcess, info: PhaseInfo) -> CpuSampler:
    started = time.time()
    ready = sut.start()
    info.startup_s = ready - started
    assert sut.pid is not None  # noqa: S101 - started above
    ctx.console.print(f"  ({info.impl}) {info.phase}: ready in {info.startup_s:.1f}s "
                      f"(pid {sut.pid}, log {sut.log_path.name})")
    return CpuSampler(sut.pid, interval_s=0.02).start()


def _stop_sut(sut: SutProcess, info: PhaseInfo) -> None:
    if sut.pid is not None and sut.alive:
        info.peak_rss_mb = peak_rss_mb(sut.pid)
    info.exit_code = sut.stop()
    text = sut.log_text()
    info.lane_stats = parse_logged_stats(text, "LaneStats")
    info.batcher_stats = parse_batcher_stats(text)
    info.history_health = parse_logged_stats(text, "HistoryHealth")


def _record(ctx: _Ctx, result: ScenarioResult, start: float | None) -> None:
    end = time.time()
    ctx.foreign.sample()
    foreign_s = ctx.foreign.between(start, end)
    if foreign_s is not None and start is not None and end > start:
        cores = foreign_s / (end - start)
        result.extra["foreign_cpu_cores"] = round(cores, 3)
        if cores > _FOREIGN_NOTE_CORES:
            ctx.run.notes.append(
                f"({result.impl}) {result.scenario}: other processes (or the hypervisor) took "
                f"{cores:.2f} cores meanwhile; its figures may be distorted")
    ctx.run.results.append(result)
    cells = main_row(result)
    brokers = result.extra.get("broker_cpu_per_1k")
    broker_part = "" if brokers is None else (
        f" (brokers {brokers:.3f}, {result.extra['broker_cores']:.2f} cores)")
    ctx.console.print(f"    {cells[1]}: offered {cells[2]} achieved {cells[3]} ev/s, "
                      f"p50 {cells[4]} p99 {cells[6]} ms, CPU-s/1k {cells[8]}{broker_part}, "
                      f"missing {cells[9]}")


def _idle_cpu(sampler: CpuSampler, seconds: float) -> float | None:
    """CPU cores the SUT uses while it waits for traffic (measured over ``seconds``)."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    sampler.sample()
    spent = sampler.between(start, end)
    return None if spent is None else spent / seconds


def _rates_phase(ctx: _Ctx, impl: str) -> None:
    env, settings = _phase_env(ctx, impl, "rates")
    sut, info = _start_sut(ctx, impl, "rates", env, workers=ctx.config.workers)
    try:
        samplers = _launch_all(ctx, sut, info)
        try:
            info.idle_cpu_cores = _idle_cpu(samplers[0], _IDLE_S)
            for index, target in enumerate(ctx.config.rates):
                start = time.time()
                _record(ctx, _rate_scenario(ctx, impl, env, settings, samplers, target,
                                            seed=ctx.config.seed + index), start)
        finally:
            for sampler in samplers:
                sampler.stop()
    finally:
        _stop_sut(sut, info)


def _launch_all(ctx: _Ctx, sut: SutProcess, info: PhaseInfo) -> list[CpuSampler]:
    """Start the SUT with its peers; a CPU sampler for each worker of the lane."""
    samplers = [_launch(ctx, sut, info)]
    samplers += [CpuSampler(peer.pid, interval_s=0.02).start()
                 for peer in sut.peers if peer.pid is not None]
    return samplers


def _cpu_between(samplers: list[CpuSampler], start: float | None,
                 end: float | None) -> float | None:
    """CPU seconds of every sampled worker between two instants; None if one is unknown."""
    spent = [sampler.between(start, end) for sampler in samplers]
    return None if None in spent else sum(s or 0.0 for s in spent)


def _rate_scenario(ctx: _Ctx, impl: str, env: dict[str, str], settings: Settings,
                   samplers: list[CpuSampler], target: float, *, seed: int) -> ScenarioResult:
    cfg = ctx.config
    arrivals = (Arrivals.poisson(target, cfg.duration_s, seed) if cfg.poisson
                else Arrivals.constant(target, cfg.duration_s))
    reader = _reader(ctx, impl, settings, env, f"rate{target:g}")
    source = _source(ctx, impl, settings, seed)
    loadavg = os.getloadavg()
    try:
        reader.start()
        sent = asyncio.run(produce_open_loop(settings, arrivals, seed=seed, source=source))
        reader.request(sent.ids, cfg.result_timeout_s)
        output = reader.collect(cfg.result_timeout_s + 30)
    finally:
        reader.close()
    matched = match_results(sent.ids, output.rows)
    result = rate_result(impl, target_rate=target, sent=len(sent.ids), started_at=sent.started_at,
                         last_sent=sent.last_at, matched=matched,
                         cpu_s=_cpu_between(samplers, sent.started_at, matched.last_received),
                         warmup_s=cfg.warmup_s)
    _broker_cpu(ctx, result, sent.started_at, matched.last_received)
    result.extra.update(arrivals="poisson" if cfg.poisson else "constant",
                        generator_max_lag_ms=sent.max_lag_ms,
                        generator_max_lag_at_s=sent.max_lag_at_s, loadavg_before=list(loadavg),
                        generator_unsent=sent.unsent,
                        unexpected_results=matched.unexpected, unparsed_results=output.unparsed)
    _lag_note(ctx, result, sent)
    return result


def _broker_cpu(ctx: _Ctx, result: ScenarioResult, start: float | None,
                end: float | None) -> None:
    """The brokers' CPU over the scenario's window (all nodes summed), per 1k events and as
    cores: on one machine they share the cores with the workers, on a cluster they do not."""
    for sampler in ctx.brokers:
        sampler.sample()
    spent = _cpu_between(ctx.brokers, start, end)
    if spent is None or not ctx.brokers or start is None or end is None or end <= start:
        return
    result.extra["broker_cpu_s"] = round(spent, 2)
    result.extra["broker_cores"] = round(spent / (end - start), 3)
    if result.received:
        result.extra["broker_cpu_per_1k"] = round(spent / result.received * 1000.0, 4)


def _lag_note(ctx: _Ctx, result: ScenarioResult, sent: SentLog) -> None:
    if sent.unsent:
        ctx.run.notes.append(
            f"({result.impl}) {result.scenario}: the generator could not send {sent.unsent:,} "
            f"events ({sent.send_error}); they are not counted as sent")
    if sent.max_lag_ms > _LAG_NOTE_MS:
        ctx.run.notes.append(
            f"({result.impl}) {result.scenario}: the generator fell up to "
            f"{sent.max_lag_ms:.0f} ms behind its schedule (at {sent.max_lag_at_s or 0:.2f} s); "
            "the events due were then sent together, each stamped when sent")


def _drain_phase(ctx: _Ctx, impl: str) -> None:
    cfg = ctx.config
    env, settings = _phase_env(ctx, impl, "drain")
    reader = _reader(ctx, impl, settings, env, "drain")
    seed = cfg.seed + _DRAIN_SEED_OFFSET
    source = _source(ctx, impl, settings, seed)
    timeout_s = 120.0 + cfg.drain_events / 500.0
    loadavg = os.getloadavg()
    try:
        reader.start()
        sent = asyncio.run(preload(settings, cfg.drain_events, seed=seed, source=source))
        ctx.console.print(f"  ({impl}) drain: {len(sent.ids):,} events preloaded")
        reader.request(sent.ids, timeout_s)
        sut, info = _start_sut(ctx, impl, "drain", env, workers=cfg.drain_workers)
        try:
            samplers = _launch_all(ctx, sut, info)
            try:
                output = reader.collect(timeout_s + 30)
            finally:
                for sampler in samplers:
                    sampler.stop()
        finally:
            _stop_sut(sut, info)
    finally:
        reader.close()
    assert sut.ready_at is not None  # noqa: S101 - _launch returned
    matched = match_results(sent.ids, output.rows)
    result = drain_result(impl, sent=len(sent.ids), ready_at=sut.ready_at, matched=matched,
                          cpu_s=_cpu_between(samplers, sut.ready_at, matched.last_received))
    _broker_cpu(ctx, result, sut.ready_at, matched.last_received)
    result.extra.update(loadavg_before=list(loadavg), unexpected_results=matched.unexpected,
                        unparsed_results=output.unparsed, workers=cfg.drain_workers)
    _record(ctx, result, sut.ready_at)
