"""Open-loop traffic and result reading, shared by the demo, the benchmarks and the tests.

* a :class:`RequestSource` makes a lane's synthetic requests (and deliberately bad variants)
  and any records that go along on other topics; its :class:`Workload` names the lane's
  topics and id field. :class:`HistoryTransactionSource` is the fraud v2 model's world
  (:class:`~pipeline.training.history_data.HistoryStreamGenerator`: per-card habits, fraud
  episodes, delayed labels, which go to ``fraud.labels``), replayed with simulated event time
  (``ts``) starting 30 days ago: about 5 s of event time pass per transaction, so each card's
  history evolves as in days of traffic while the wire rate is whatever the caller asks.
  :class:`TransactionSource` is the plain transaction stream of :mod:`pipeline.training.synth` (the
  benchmark's), :class:`pipeline.dev.recogen.RecoRequestSource` the reco lane's requests;
* :func:`produce_requests` sends them at a steady rate (open loop: the schedule never waits
  for results, so slow results cannot slow the offered load), stamping ``sent_at`` at send
  time; a fraction can be deliberately invalid, one kind after another
  (:func:`produce_transactions` is the fraud lane's shorthand);
* :class:`ResultReader` reads a topic from given offsets without a consumer group (it never
  disturbs the pipeline's groups) and keeps what arrived, keyed by the workload's id field
  (``event_id``, ``request_id``), with the end-to-end latency from ``sent_at`` to the moment
  it was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.kafka.connection import (
    ProducerHandle,
    client_kwargs,
    make_producer,
    start_reader,
    topic_partitions,
)
from pipeline.kafka.producer import BatchSender
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from pipeline.training.history_data import HistoryStreamGenerator
from pipeline.training.synth import INVALID_KINDS, TransactionGenerator, make_invalid

__all__ = ["FRAUD", "RECO", "HistoryTransactionSource", "ProduceReport", "RequestSource",
           "ResultReader", "SideRecord", "TransactionSource", "Workload", "produce_requests",
           "produce_transactions", "snapshot_end_offsets", "write_transactions_jsonl"]

SideRecord = tuple[str, bytes | None, bytes]
"""A record that goes along with the requests: (logical topic, key, value)."""


@dataclass(frozen=True)
class Workload:
    """A real-time lane as traffic sees it: its topics (logical names), id and key fields."""

    lane: str
    requests_topic: str
    results_topic: str
    dlq_topic: str
    id_field: str
    """Field that identifies a request and its result (``event_id``, ``request_id``)."""
    key_field: str
    """Field whose value is the record key (``card_id``, ``user_id``)."""


FRAUD = Workload("fraud", "fraud.requests", "fraud.scores", "fraud.requests.dlq",
                 id_field="event_id", key_field="card_id")
RECO = Workload("reco", "reco.requests", "reco.results", "reco.requests.dlq",
                id_field="request_id", key_field="user_id")


class RequestSource(Protocol):
    """Deterministic synthetic requests of one lane."""

    @property
    def workload(self) -> Workload: ...

    @property
    def invalid_kinds(self) -> tuple[str, ...]: ...

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` valid requests, without ``sent_at`` (the sender stamps it)."""
        ...

    def side_records(self) -> list[SideRecord]:
        """Records due on other topics since the last call (e.g. fraud labels); sent along."""
        ...

    def make_invalid(self, kind: str, rng: np.random.Generator, base: dict[str, Any]) -> bytes:
        """Raw value bytes of a deliberately bad variant of the valid request ``base``."""
        ...


class TransactionSource:
    """Plain synthetic transactions (:class:`pipeline.training.synth.TransactionGenerator`)."""

    workload = FRAUD
    invalid_kinds = INVALID_KINDS

    def __init__(self, seed: int, start_ts: float | None = None) -> None:
        self._generator = TransactionGenerator(seed=seed, start_ts=start_ts)

    def take(self, n: int) -> list[dict[str, Any]]:
        return [self._generator.next()[0] for _ in range(n)]

    def side_records(self) -> list[SideRecord]:
        return []

    def make_invalid(self, kind: str, rng: np.random.Generator, base: dict[str, Any]) -> bytes:
        return make_invalid(kind, rng, base)


class HistoryTransactionSource(TransactionSource):
    """The fraud v2 world: transactions, and their delayed labels for ``fraud.labels``."""

    def __init__(self, seed: int, start_ts: float) -> None:
        self._history = HistoryStreamGenerator(seed=seed, start_ts=start_ts)
        self._labels: list[SideRecord] = []

    def take(self, n: int) -> list[dict[str, Any]]:
        stream = self._history.stream(n)
        self._labels.extend(("fraud.labels", label["card_id"].encode(), orjson.dumps(label))
                            for label in stream.labels)
        return list(stream.txns)

    def side_records(self) -> list[SideRecord]:
        labels, self._labels = self._labels, []
        return labels


@dataclass
class ProduceReport:
    """What the generator sent: valid request ids and invalid records by kind."""

    valid_ids: list[str] = field(default_factory=list)
    invalid_by_kind: dict[str, int] = field(default_factory=dict)
    invalid_keys: list[bytes] = field(default_factory=list)
    labels: int = 0
    """Records sent along on other topics, e.g. labels to ``fraud.labels`` (not in :attr:`sent`)."""

    @property
    def sent(self) -> int:
        return len(self.valid_ids) + sum(self.invalid_by_kind.values())


async def produce_transactions(
    settings: Settings, *, rate_per_s: float, count: int | None = None,
    duration_s: float | None = None, invalid_fraction: float = 0.0, seed: int = 0,
    tick_s: float = 0.005, report: ProduceReport | None = None, stop: asyncio.Event | None = None,
) -> ProduceReport:
    """:func:`produce_requests` of the fraud v2 world: transactions to ``fraud.requests``,
    their labels to ``fraud.labels``."""
    source = HistoryTransactionSource(seed, start_ts=time.time() - 30 * 86_400.0)
    return await produce_requests(
        settings, source, rate_per_s=rate_per_s, count=count, duration_s=duration_s,
        invalid_fraction=invalid_fraction, seed=seed, tick_s=tick_s, report=report, stop=stop)


async def produce_requests(
    settings: Settings,
    source: RequestSource,
    *,
    rate_per_s: float,
    count: int | None = None,
    duration_s: float | None = None,
    invalid_fraction: float = 0.0,
    seed: int = 0,
    tick_s: float = 0.005,
    report: ProduceReport | None = None,
    stop: asyncio.Event | None = None,
) -> ProduceReport:
    """Produce ``source``'s requests at ``rate_per_s`` until ``count`` or ``duration_s``.

    ``report`` (filled in place, so a caller can watch progress) is returned at the end; every
    record in it has been acknowledged by the broker when this returns (else this raises).
    """
    if count is None and duration_s is None:
        raise ValueError("give count or duration_s")
    rng = np.random.default_rng(seed + 1)
    report = report if report is not None else ProduceReport()
    producer = ProducerHandle(lambda: make_producer(settings, linger_ms=2))
    await producer.start()
    sender = BatchSender(producer)
    started = time.monotonic()
    sends: list[asyncio.Task[None]] = []
    try:
        while stop is None or not stop.is_set():
            elapsed = time.monotonic() - started
            due = int(elapsed * rate_per_s) if count is None else min(
                int(elapsed * rate_per_s), count)
            if due > report.sent:
                sends += _send_due(settings, sender, source, due - report.sent, rng,
                                   invalid_fraction, report)
            if (count is not None and report.sent >= count) or (
                    duration_s is not None and elapsed >= duration_s):
                break
            await asyncio.sleep(tick_s)
            sends = [t for t in sends if not t.done() or t.cancelled() or t.exception() is not None]
        await asyncio.gather(*sends)  # a send the broker never acknowledged raises here
    finally:
        await producer.stop()
    return report


def _send_due(settings: Settings, sender: BatchSender, source: RequestSource, n: int,
              rng: np.random.Generator, invalid_fraction: float,
              report: ProduceReport) -> list[asyncio.Task[None]]:
    """Start sending the next ``n`` requests and the records due along with them."""
    by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {
        source.workload.requests_topic: [_next_record(source, value, rng, invalid_fraction, report)
                                         for value in source.take(n)]}
    for topic, key, value in source.side_records():
        by_topic.setdefault(topic, []).append((key, value))
        report.labels += 1
    return [asyncio.create_task(sender.send(settings.topic(topic), records))
            for topic, records in by_topic.items() if records]


def _next_record(source: RequestSource, value: dict[str, Any], rng: np.random.Generator,
                 invalid_fraction: float, report: ProduceReport) -> tuple[bytes | None, bytes]:
    workload = source.workload
    key = str(value[workload.key_field]).encode()
    if invalid_fraction and rng.random() < invalid_fraction:
        kinds = source.invalid_kinds
        kind = kinds[sum(report.invalid_by_kind.values()) % len(kinds)]
        report.invalid_by_kind[kind] = report.invalid_by_kind.get(kind, 0) + 1
        report.invalid_keys.append(key)
        return key, source.make_invalid(kind, rng, value)
    value["sent_at"] = time.time()
    report.valid_ids.append(str(value[workload.id_field]))
    return key, orjson.dumps(value)


async def snapshot_end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """Current end offset of every partition of ``topic`` (read results from there on)."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings, client_id="inferlane-reader"))
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


class ResultReader:
    """Read a result topic from given start offsets (no group) and index values by their id."""

    def __init__(self, settings: Settings, topic: str, start: dict[TopicPartition, int], *,
                 id_field: str = "event_id") -> None:
        self.settings = settings
        self.topic = topic
        self.id_field = id_field
        self.start_offsets = start
        self.results: dict[str, dict[str, Any]] = {}
        self.received_at: dict[str, float] = {}
        """When each result was read (wall clock, per fetch)."""
        self.latencies_ms: list[float] = []
        self.duplicates = 0
        self.records = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        self._consumer = await start_reader(self.settings, "inferlane-reader")
        self._consumer.assign(list(self.start_offsets))
        for tp, offset in self.start_offsets.items():
            self._consumer.seek(tp, offset)
        self._task = asyncio.create_task(self._run(), name=f"reader-{self.topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def __aenter__(self) -> ResultReader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        assert self._consumer is not None  # noqa: S101
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.time()
            for records in batches.values():
                for record in records:
                    self._add(orjson.loads(record.value or b"{}"), now)
            if batches:
                self._arrived.set()

    def _add(self, value: dict[str, Any], now: float) -> None:
        self.records += 1
        event_id = value.get(self.id_field)
        if not isinstance(event_id, str):
            return
        if event_id in self.results:
            self.duplicates += 1
            return
        self.results[event_id] = value
        self.received_at[event_id] = now
        sent_at = value.get("sent_at")
        if isinstance(sent_at, (int, float)):
            self.latencies_ms.append((now - sent_at) * 1000.0)

    async def wait_for(self, event_ids: set[str], timeout_s: float) -> set[str]:
        """Wait until every id has a result or the timeout passes; return the missing ids."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            missing = event_ids - self.results.keys()
            if not missing:
                return set()
            await asyncio.sleep(0.05)
        return event_ids - self.results.keys()

    async def wait_for_count(self, count: int, timeout_s: float) -> int:
        """Wait until ``count`` records were read or the timeout passes; return records read."""
        deadline = time.monotonic() + timeout_s
        while self.records < count and time.monotonic() < deadline:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
        return self.records


async def write_transactions_jsonl(settings: Settings, key: str, rows: int, *, seed: int = 31,
                                   invalid_every: int = 0) -> tuple[set[str], int]:
    """Upload ``rows`` synthetic transactions as JSONL to ``key``; every ``invalid_every``-th
    row gets a negative amount. Returns the valid event ids and the number of invalid rows."""
    generator = TransactionGenerator(seed=seed, start_ts=1.79e9)
    ids: set[str] = set()
    lines, invalid = [], 0
    for i in range(rows):
        txn, _ = generator.next()
        if invalid_every and i % invalid_every == invalid_every - 1:
            txn["amount"] = -1.0
            invalid += 1
        else:
            ids.add(txn["event_id"])
        lines.append(orjson.dumps(txn))
    async with S3Store(settings) as store:
        await store.put(key, b"\n".join(lines) + b"\n", content_type="application/x-ndjson")
    return ids, invalid
