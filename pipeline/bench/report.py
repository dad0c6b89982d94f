"""The results folder of a benchmark run: ``results.md``, ``results.json`` and the rich table.

:class:`BenchRun` holds everything measured (per-scenario :class:`~pipeline.bench.stats.
ScenarioResult` rows, per-process facts, notes) plus the configuration and machine facts.
Rendering is pure (strings and dicts), so it is unit-tested on synthetic runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from pipeline.bench.stats import ScenarioResult

__all__ = ["BenchConfig", "BenchRun", "PhaseInfo", "render_markdown", "rich_table", "to_json",
           "write_results"]

_DASH = "—"
_MAIN_COLUMNS = ("impl", "scenario", "offered ev/s", "achieved ev/s", "p50 ms", "p90 ms",
                 "p99 ms", "max ms", "CPU-s / 1k ev", "missing", "dup")


@dataclass(frozen=True)
class BenchConfig:
    """What the run was asked to do."""

    impls: tuple[str, ...]
    rates: tuple[float, ...]
    duration_s: float
    drain_events: int
    warmup_s: float
    poisson: bool
    out: Path
    result_timeout_s: float
    seed: int
    quick: bool
    drain_workers: int = 1
    """Worker processes of the SUT (one consumer group, own static member ids) in the drain."""
    workers: int = 1
    """Worker processes of the SUT in the rate scenarios (the same group, sharing partitions)."""
    brokers: int = 1
    """Kafka nodes of the local stack (3: replication factor 3, min.insync.replicas 2)."""
    secure: bool = False
    """Every client over TLS with SCRAM-SHA-512, the broker's authorizer checking ACLs."""
    reco_k: int = 10
    """Reco lane scenarios: ``k`` of every request."""
    reco_candidate_fraction: float = 0.2
    """Reco lane scenarios: share of requests that name candidates (20-200 of them)."""


@dataclass
class PhaseInfo:
    """One process lifetime of an implementation (the rate phase or the drain phase)."""

    impl: str
    phase: str
    log: str
    startup_s: float | None = None
    idle_cpu_cores: float | None = None
    """CPU seconds per second of the SUT after it was ready, before any traffic."""
    peak_rss_mb: float | None = None
    exit_code: int | None = None
    lane_stats: dict[str, Any] | None = None
    batcher_stats: dict[str, Any] | None = None
    history_health: dict[str, Any] | None = None
    """The fraud lane's last logged ``HistoryHealth``: degraded scores by reason, freshness."""
    error: str | None = None


@dataclass
class BenchRun:
    """Everything a run measured, ready to render."""

    config: BenchConfig
    machine: dict[str, Any]
    labels: dict[str, str]
    started_at: str
    finished_at: str = ""
    results: list[ScenarioResult] = field(default_factory=list)
    phases: list[PhaseInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return _DASH
    return f"{value:,.{digits}f}"


def main_row(result: ScenarioResult) -> list[str]:
    """The cells of one result in the main table (same for markdown and rich)."""
    lat = result.latency
    return [
        result.impl, result.scenario, _num(result.offered_rate, 0),
        _num(result.achieved_rate, 0),
        _num(lat.p50_ms if lat else None), _num(lat.p90_ms if lat else None),
        _num(lat.p99_ms if lat else None), _num(lat.max_ms if lat else None),
        _num(result.cpu_per_1k, 3), f"{result.missing:,}", f"{result.duplicates:,}",
    ]


def _md_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _batch_rows(results: list[ScenarioResult]) -> list[list[str]]:
    rows = []
    for r in results:
        b = r.batches
        if b is None:
            rows.append([r.impl, r.scenario, _DASH, _DASH, _DASH, _DASH, _DASH, _DASH])
            continue
        histogram = " ".join(f"≤{size}:{count}" for size, count in b.histogram.items())
        rows.append([r.impl, r.scenario, f"{b.batches:,}", _num(b.mean), _num(b.p50, 0),
                     _num(b.p90, 0), f"{b.max:,}", histogram])
    return rows


def _drain_rows(results: list[ScenarioResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.scenario != "drain":
            continue
        rows.append([r.impl, f"{r.sent:,}", _num(r.extra.get("first_result_after_ready_s"), 3),
                     _num(r.window_s, 3), _num(r.achieved_rate, 0), _num(r.cpu_s, 2),
                     _num(r.cpu_per_1k, 3)])
    return rows


def _broker_rows(results: list[ScenarioResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if "broker_cpu_s" not in r.extra:
            continue
        worker = r.cpu_per_1k
        brokers = r.extra.get("broker_cpu_per_1k")
        ratio = None if not worker or brokers is None else brokers / worker
        rows.append([r.impl, r.scenario, _num(r.cpu_per_1k, 3), _num(brokers, 3),
                     _num(ratio, 1), _num(r.extra.get("broker_cores"), 2)])
    return rows


def _phase_rows(phases: list[PhaseInfo]) -> list[list[str]]:
    rows = []
    for p in phases:
        stats = _DASH
        if p.lane_stats is not None:
            stats = ", ".join(f"{k}={v}" for k, v in p.lane_stats.items())
        if p.batcher_stats is not None:
            stats += f"; batcher: {p.batcher_stats}"
        if p.history_health is not None:
            stats += f"; history: {p.history_health}"
        rows.append([p.impl, p.phase, _num(p.startup_s, 2), _num(p.idle_cpu_cores, 2),
                     _num(p.peak_rss_mb, 0),
                     _DASH if p.exit_code is None else str(p.exit_code), stats,
                     p.error or ""])
    return rows


def _intro(run: BenchRun) -> list[str]:
    cfg, machine = run.config, run.machine
    arrivals = "Poisson" if cfg.poisson else "constant-rate"
    lines = [
        f"# inferlane bench — {run.started_at}", "",
        f"Open-loop {arrivals} load, {cfg.duration_s:g} s per rate (first {cfg.warmup_s:g} s "
        f"of latencies discarded), backlog drain of {cfg.drain_events:,} events. One "
        "implementation at a time on the same local broker, model and machine "
        f"({machine.get('cpu_count')} CPUs, {machine.get('cpu_model')}); load generator and "
        "result reader (a separate process) share the machine with the system under test.", "",
    ]
    if cfg.secure:
        lines += ["Secure stack: every client (system under test, load generator, reader) "
                  "connects over TLS (SASL_SSL) as a SCRAM-SHA-512 user, and the broker's "
                  "standard authorizer checks each request against ACLs (prefixed `All` on the "
                  "run's topics, groups and transactional ids).", ""]
    lines += [f"- **{key}**: {label}" for key, label in run.labels.items()]
    if "r" in run.labels:
        lines += ["", f"Reco requests: users uniform over the model's users, k = {cfg.reco_k}, "
                  f"{cfg.reco_candidate_fraction:.0%} with a list of 20-200 candidates, the "
                  "rest ranked over the whole catalogue."]
    if {"b", "c"} & set(run.labels):
        lines += ["", "(b) and (c) are yardsticks to put (a) in context, not features."]
    return [*lines, ""]


_DEFINITIONS = [
    "## Definitions", "",
    "- latency: result received by the reader process - `sent_at` stamped by the generator.",
    "- offered ev/s: events sent / (last send - schedule start).",
    "- achieved ev/s: results / (last result - schedule start); drain: results / (last result "
    "- time the SUT logged ready), which includes the SUT's time to its first result.",
    "- CPU-s / 1k ev: utime+stime of the SUT process tree (from /proc) in that same window, "
    "per 1,000 results.",
    "- missing: events without a result when the wait ended; dup: extra results for an event.",
    "- idle CPU cores: CPU-s per second of the SUT while ready but without traffic (polling "
    "cost, which dominates CPU-s / 1k ev at low rates).",
    "- output batch: results carrying the same `scored_at`, i.e. one scoring call's output. "
    "For (a) that is one lane `handle()` call (one fetch); its micro-batcher may merge or "
    "split model calls, which only the batcher's own stats show. For (b) one `take` batch, "
    "for (c) one `getmany` fetch.",
]


def render_markdown(run: BenchRun) -> str:
    """``results.md``: main table, batch sizes, per-process facts, definitions, notes."""
    lines = _intro(run)
    lines += _md_table(_MAIN_COLUMNS, [main_row(r) for r in run.results])
    drains = _drain_rows(run.results)
    if drains:
        lines += ["", "## Backlog drain", ""]
        lines += _md_table(("impl", "events", "ready → first result s", "ready → last result s",
                            "drain ev/s", "CPU-s", "CPU-s / 1k ev"), drains)
    brokers = _broker_rows(run.results)
    if brokers:
        lines += ["", "## Worker and broker CPU (all nodes of the stack summed)", ""]
        lines += _md_table(("impl", "scenario", "workers CPU-s / 1k ev", "brokers CPU-s / 1k ev",
                            "brokers / workers", "brokers cores"), brokers)
    lines += ["", "## Output batch sizes (results per scoring call)", ""]
    lines += _md_table(("impl", "scenario", "batches", "mean", "p50", "p90", "max",
                        "histogram (bucket: batches)"), _batch_rows(run.results))
    lines += ["", "## Processes", ""]
    lines += _md_table(("impl", "phase", "start-up s", "idle CPU cores", "peak RSS MiB", "exit",
                        "logged stats", "error"), _phase_rows(run.phases))
    lines += ["", *_DEFINITIONS, ""]
    if run.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in run.notes], ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(run: BenchRun) -> bytes:
    """``results.json``: every raw number, the configuration and the machine facts."""
    return orjson.dumps(dataclasses.asdict(run), default=_jsonable,
                        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def rich_table(run: BenchRun) -> Table:
    """The main table for the terminal."""
    cfg = run.config
    layout = "".join([f", {cfg.workers} workers" if cfg.workers > 1 else "",
                      f", {cfg.brokers} brokers" if cfg.brokers > 1 else "",
                      ", SASL_SSL + ACLs" if cfg.secure else ""])
    table = Table(title=f"inferlane bench ({run.started_at}{layout})")
    for i, column in enumerate(_MAIN_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for result in run.results:
        table.add_row(*main_row(result))
    return table


def write_results(run: BenchRun) -> list[Path]:
    """Write ``results.md`` and ``results.json`` into ``run.config.out``; return the paths."""
    out = run.config.out
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "results.md", out / "results.json"
    md.write_text(render_markdown(run), encoding="utf-8")
    js.write_bytes(to_json(run) + b"\n")
    return [md, js]
