"""``inferlane bench failover``: brokers of a three-node Apache Kafka cluster fail under fraud
traffic, and what the pipeline does about it.

A fresh local cluster (three KRaft nodes, each broker and controller; topics with replication
factor 3 and ``min.insync.replicas=2``), the fraud lane and its history worker
(``bench run``'s implementation ``a``), and open-loop traffic (default 2,000 transactions/s).
Each scenario gets its own topics and groups:

* ``leader`` - SIGKILL the node that leads the most ``fraud.requests`` and ``fraud.scores``
  partitions (one of each at least, when a node has both), wait, start it again;
* ``rolling`` - restart every node in turn (SIGTERM: controlled shutdown), each back in sync
  (no under-replicated partition) before the next;
* ``controller`` - SIGKILL the KRaft controller leader; the other two elect another; start it
  again.

Reported per scenario: acknowledged events, those without a score (must be 0), results read
twice (at-least-once: a fetch redone after a leader change), the history check (every card's
changelog state includes its last transaction: 0 updates lost), the seconds from each
disruption until results flow again on the partitions the failed node led, and p50/p99 of the
events sent before, during each disruption (until the cluster is back in sync) and after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from pipeline.bench.sut import IMPLS, SutProcess, impl_env, settings_for
from pipeline.dev.kafkanode import partition_leaders
from pipeline.dev.loadgen import (
    ProduceReport,
    ResultReader,
    produce_transactions,
    snapshot_end_offsets,
)
from pipeline.dev.stack import LocalStack, bench_stack
from pipeline.features.cardhistory import from_bytes
from pipeline.kafka.connection import client_kwargs, topic_partitions
from pipeline.kafka.partitioner import partition_for
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings

__all__ = ["SCENARIOS", "Disruption", "FailoverConfig", "FailoverResult", "Window", "render",
           "run_failover"]

SCENARIOS = ("leader", "rolling", "controller")
_REQUESTS, _SCORES, _CHANGELOG = "fraud.requests", "fraud.scores", "fraud.history.changelog"


@dataclass(frozen=True)
class FailoverConfig:
    """Traffic and timing of each scenario (seconds)."""

    rate: float = 2000.0
    before_s: float = 10.0
    """Traffic before the first disruption (the first 2 s are a warm-up, not in "before")."""
    down_s: float = 5.0
    """How long a killed node stays down."""
    after_s: float = 10.0
    """Traffic after the cluster is back in sync."""
    seed: int = 7
    result_timeout_s: float = 90.0


@dataclass
class Disruption:
    """One thing done to the cluster, from its start until every partition was in sync again."""

    label: str
    begin: float
    end: float = 0.0
    partitions: list[int] = field(default_factory=list)
    """Partitions of ``fraud.requests`` / ``fraud.scores`` the node led when it went down."""
    detail: str = ""
    recovery_s: float | None = None
    """From ``begin`` until the first result of an event sent after it, on those partitions
    (the slowest of them); None when no such result came."""


@dataclass
class Window:
    """Latency of the events sent in one span of the run."""

    name: str
    events: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class FailoverResult:
    scenario: str
    acked: int
    missing: int
    duplicates: int
    cards: int
    history_lost: int
    disruptions: list[Disruption]
    windows: list[Window]
    send_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.history_lost and self.send_error is None


Script = Callable[[LocalStack, Settings, FailoverConfig], Awaitable[list[Disruption]]]


def run_failover(out: Path, *, scenarios: tuple[str, ...] = SCENARIOS,
                 config: FailoverConfig | None = None,
                 console: Console | None = None) -> list[FailoverResult]:
    """Run ``scenarios`` on a fresh three-node stack under ``out``; write ``results.json``."""
    config = config or FailoverConfig()
    console = console or Console()
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    stack = bench_stack(out / "stack", brokers=3)
    results: list[FailoverResult] = []
    started = time.monotonic()
    endpoints = stack.start()
    console.print(f"failover: three nodes up in {time.monotonic() - started:.1f}s "
                  f"({endpoints.kafka_bootstrap}); {config.rate:g} ev/s")
    try:
        for scenario in scenarios:
            env = impl_env(endpoints.env(), tag="fo", impl="a", phase=scenario,
                           state_dir=out / "state")
            settings = settings_for(env)
            asyncio.run(ensure_topics(settings))
            worker = SutProcess(IMPLS["a"], env, out / "logs" / f"{scenario}.log", cwd=Path.cwd())
            worker.start()
            try:
                result = asyncio.run(_drive(stack, settings, _SCRIPTS[scenario], scenario,
                                            config))
            finally:
                worker.stop()
            results.append(result)
            console.print(f"  {scenario}: {result.acked:,} acknowledged, {result.missing} "
                          f"without a score, {result.history_lost} cards' history behind; "
                          + "; ".join(f"{d.label}: results again after "
                                      f"{_fmt(d.recovery_s, 's')}" for d in result.disruptions))
    finally:
        stack.stop()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(orjson.dumps(
        {"config": asdict(config), "results": [asdict(r) for r in results]},
        option=orjson.OPT_INDENT_2))
    return results


async def _drive(stack: LocalStack, settings: Settings, script: Script, scenario: str,
                 config: FailoverConfig) -> FailoverResult:
    scores_topic = settings.topic(_SCORES)
    reader = ResultReader(settings, scores_topic, await snapshot_end_offsets(settings,
                                                                             scores_topic))
    report = ProduceReport()
    stop = asyncio.Event()
    send_error = None
    async with reader:
        traffic = asyncio.create_task(produce_transactions(
            settings, rate_per_s=config.rate, duration_s=24 * 3600.0, seed=config.seed,
            report=report, stop=stop))
        started = time.time()
        await asyncio.sleep(config.before_s)
        disruptions = await script(stack, settings, config)
        await asyncio.sleep(config.after_s)
        stop.set()
        ended = time.time()
        try:
            await traffic
        except Exception as exc:  # noqa: BLE001 - reported: some event was never acknowledged
            send_error = repr(exc)
        missing = await reader.wait_for(set(report.valid_ids), config.result_timeout_s)
    partitions = len(reader.start_offsets)  # every partition of fraud.scores, read from
    for disruption in disruptions:
        disruption.recovery_s = _recovery_s(reader, disruption, partitions, settings)
    cards, lost = await _history_check(settings, reader, report.valid_ids,
                                       config.result_timeout_s)
    return FailoverResult(
        scenario=scenario, acked=len(report.valid_ids), missing=len(missing),
        duplicates=reader.duplicates, cards=cards, history_lost=lost, disruptions=disruptions,
        windows=_windows(reader, started + 2.0, ended, disruptions), send_error=send_error)


# --- the scenarios --------------------------------------------------------------------------
async def _leader(stack: LocalStack, settings: Settings,
                  config: FailoverConfig) -> list[Disruption]:
    led = await _led_by_node(settings)
    both = [n for n, (req, res) in led.items() if req and res]
    node = max(both or list(led), key=lambda n: len(led[n][0]) + len(led[n][1]))
    req, res = led[node]
    disruption = Disruption(f"SIGKILL node {node}", time.time(),
                            partitions=sorted(req | res),
                            detail=_led(req, res))
    await asyncio.to_thread(stack.kill_broker, node)
    await asyncio.sleep(config.down_s)
    await asyncio.to_thread(stack.start_broker, node)
    await asyncio.to_thread(stack.wait_in_sync)
    disruption.end = time.time()
    return [disruption]


async def _rolling(stack: LocalStack, settings: Settings,
                   config: FailoverConfig) -> list[Disruption]:
    done = []
    for node in [n.node_id for n in stack.nodes]:
        req, res = (await _led_by_node(settings)).get(node, (set(), set()))
        disruption = Disruption(f"restart node {node}", time.time(),
                                partitions=sorted(req | res),
                                detail=_led(req, res))
        await asyncio.to_thread(stack.stop_broker, node)
        await asyncio.to_thread(stack.start_broker, node)
        await asyncio.to_thread(stack.wait_in_sync)
        disruption.end = time.time()
        done.append(disruption)
    return done


async def _controller(stack: LocalStack, settings: Settings,
                      config: FailoverConfig) -> list[Disruption]:
    leader = stack.controller_leader()
    if leader is None:
        raise RuntimeError("no KRaft controller leader known before the kill")
    req, res = (await _led_by_node(settings)).get(leader, (set(), set()))
    disruption = Disruption(f"SIGKILL controller node {leader}", time.time(),
                            partitions=sorted(req | res))
    await asyncio.to_thread(stack.kill_broker, leader)
    elected = None
    while time.time() - disruption.begin < 60:
        if (now := stack.controller_leader()) not in (None, leader):
            elected = (now, time.time() - disruption.begin)
            break
        await asyncio.sleep(0.05)
    disruption.detail = (f"node {elected[0]} elected controller after {elected[1]:.1f}s"
                         if elected else "no new controller within 60 s")
    await asyncio.sleep(max(config.down_s - (time.time() - disruption.begin), 0.0))
    await asyncio.to_thread(stack.start_broker, leader)
    await asyncio.to_thread(stack.wait_in_sync)
    disruption.end = time.time()
    if elected is None:
        raise RuntimeError(f"controller node {leader} SIGKILLed: no other node took over")
    return [disruption]


_SCRIPTS: dict[str, Script] = {"leader": _leader, "rolling": _rolling,
                               "controller": _controller}


# --- measuring ------------------------------------------------------------------------------
def _led(requests: set[int], scores: set[int]) -> str:
    return f"led {_REQUESTS} {sorted(requests)}, {_SCORES} {sorted(scores)}"


async def _led_by_node(settings: Settings) -> dict[int, tuple[set[int], set[int]]]:
    """node -> (partitions of fraud.requests it leads, partitions of fraud.scores it leads)."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        leaders = await partition_leaders(admin, [settings.topic(_REQUESTS),
                                                  settings.topic(_SCORES)])
        brokers = [b["node_id"] for b in (await admin.describe_cluster())["brokers"]]
    finally:
        await admin.close()
    led: dict[int, tuple[set[int], set[int]]] = {n: (set(), set()) for n in brokers}
    for index, name in enumerate((_REQUESTS, _SCORES)):
        for part, node in leaders.get(settings.topic(name), {}).items():
            if node in led:
                led[node][index].add(part)
    return led


def _recovery_s(reader: ResultReader, disruption: Disruption, partitions: int,
                settings: Settings) -> float | None:
    watched = set(disruption.partitions) or set(range(partitions))
    first: dict[int, float] = {}
    for event_id, value in reader.results.items():
        sent_at = value.get("sent_at")
        if not isinstance(sent_at, float) or sent_at < disruption.begin:
            continue
        part = partition_for(str(value["card_id"]).encode(), partitions, settings.partitioner)
        if part in watched:
            received = reader.received_at[event_id]
            first[part] = min(first.get(part, received), received)
    if set(first) != watched:
        return None
    return round(max(first.values()) - disruption.begin, 2)


def _windows(reader: ResultReader, start: float, end: float,
             disruptions: list[Disruption]) -> list[Window]:
    spans = [("before", start, disruptions[0].begin if disruptions else end)]
    spans += [(d.label, d.begin, d.end) for d in disruptions]
    spans.append(("after", disruptions[-1].end if disruptions else start, end))
    latencies: list[list[float]] = [[] for _ in spans]
    for event_id, value in reader.results.items():
        sent_at = value.get("sent_at")
        if not isinstance(sent_at, float):
            continue
        for index, (_, lo, hi) in enumerate(spans):
            if lo <= sent_at < hi:
                latencies[index].append((reader.received_at[event_id] - sent_at) * 1000.0)
    windows = []
    for (name, _, _), values in zip(spans, latencies, strict=True):
        p50, p99 = (None, None) if not values else (
            round(float(v), 1) for v in np.percentile(np.asarray(values), [50, 99]))
        windows.append(Window(name, len(values), p50, p99))
    return windows


async def _history_check(settings: Settings, reader: ResultReader, valid_ids: list[str],
                         timeout_s: float) -> tuple[int, int]:
    """(cards, cards whose changelog state lacks their last transaction), reading the history
    changelog from the start until every card has caught up or ``timeout_s`` passes."""
    last: dict[str, str] = {}
    for event_id in valid_ids:  # in send order, so the last one per card wins
        value = reader.results.get(event_id)
        if value is not None:
            last[str(value["card_id"])] = event_id
    topic = settings.topic(_CHANGELOG)
    consumer = AIOKafkaConsumer(**client_kwargs(settings, client_id="inferlane-failover"),
                                enable_auto_commit=False)
    await consumer.start()
    latest: dict[str, str] = {}
    try:
        consumer.assign([TopicPartition(topic, p)
                         for p in sorted(await topic_partitions(consumer, topic))])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200, max_records=50_000)).values():
                for record in records:
                    if record.key is not None and record.value is not None:
                        latest[record.key.decode()] = from_bytes(record.value).last_event_id
            if all(latest.get(card) == event_id for card, event_id in last.items()):
                break
    finally:
        await consumer.stop()
    return len(last), sum(latest.get(card) != event_id for card, event_id in last.items())


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}"


def render(results: list[FailoverResult]) -> Table:
    """One row per latency window of each scenario, with the scenario's counts on its first."""
    table = Table(title="inferlane bench failover (three KRaft nodes, RF 3, min.insync 2)")
    for column in ("scenario", "window", "what happened", "events", "p50 ms", "p99 ms",
                   "results again after", "acked / missing / dup", "history cards / lost"):
        table.add_column(column, justify="left" if column in (
            "scenario", "window", "what happened") else "right")
    for result in results:
        by_label = {d.label: d for d in result.disruptions}
        for index, window in enumerate(result.windows):
            disruption = by_label.get(window.name)
            table.add_row(
                result.scenario if index == 0 else "", window.name,
                disruption.detail if disruption else "", f"{window.events:,}",
                _fmt(window.p50_ms), _fmt(window.p99_ms),
                _fmt(disruption.recovery_s, " s") if disruption else "",
                f"{result.acked:,} / {result.missing} / {result.duplicates}" if index == 0
                else "",
                f"{result.cards:,} / {result.history_lost}" if index == 0 else "")
    return table
