"""Open-loop traffic for the benchmark: constant or Poisson arrivals, and a backlog preload,
of any lane's requests (a :class:`~pipeline.dev.loadgen.RequestSource`; transactions by default).

Open loop: the arrival schedule is fixed before the first send and every tick sends what is due,
without waiting for earlier sends or for results, so a slow system under test cannot slow the
offered load. ``sent_at`` is stamped when a record is built for sending; how far the generator
fell behind its schedule is reported (``max_lag_ms``) so a generator that could not keep up is
visible rather than silently lowering the load.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import orjson
from numpy.typing import NDArray

from pipeline.dev.loadgen import RequestSource, TransactionSource
from pipeline.kafka.connection import make_producer
from pipeline.kafka.producer import BatchSender
from pipeline.settings import Settings

__all__ = ["Arrivals", "SentLog", "preload", "produce_open_loop"]

Record = tuple[bytes | None, bytes]


@dataclass
class SentLog:
    """What the generator sent: event ids in order, schedule start, first/last send, lag."""

    ids: list[str] = field(default_factory=list)
    started_at: float | None = None
    """Wall time of schedule offset 0 (the window of offered and achieved rates opens here)."""
    first_at: float | None = None
    last_at: float | None = None
    max_lag_ms: float = 0.0
    max_lag_at_s: float | None = None
    """Schedule offset at which the generator was furthest behind."""
    unsent: int = 0
    """Events whose send the broker never acknowledged (left out of ``ids``)."""
    send_error: str | None = None
    """The first such failure, e.g. the generator's producer timing out on a saturated box."""


class Arrivals:
    """Scheduled send offsets (seconds from start) of every event of a scenario."""

    def __init__(self, offsets: NDArray[np.float64]) -> None:
        self.offsets = offsets

    @classmethod
    def constant(cls, rate_per_s: float, duration_s: float) -> Arrivals:
        count = int(round(rate_per_s * duration_s))
        return cls(np.arange(count, dtype=np.float64) / rate_per_s)

    @classmethod
    def poisson(cls, rate_per_s: float, duration_s: float, seed: int) -> Arrivals:
        """Exponential gaps of mean ``1/rate``; arrivals after ``duration_s`` are dropped."""
        rng = np.random.default_rng(seed)
        expected = rate_per_s * duration_s
        gaps = rng.exponential(1.0 / rate_per_s, size=int(expected + 8 * np.sqrt(expected) + 16))
        offsets = np.cumsum(gaps)
        return cls(offsets[offsets < duration_s])

    def __len__(self) -> int:
        return len(self.offsets)

    def due(self, elapsed_s: float) -> int:
        """How many events should have been sent ``elapsed_s`` after the start."""
        return int(np.searchsorted(self.offsets, elapsed_s, side="right"))


def _records(source: RequestSource, count: int, log: SentLog) -> list[Record]:
    out: list[Record] = []
    id_field, key_field = source.workload.id_field, source.workload.key_field
    for value in source.take(count):
        value["sent_at"] = now = time.time()
        log.ids.append(str(value[id_field]))
        out.append((str(value[key_field]).encode(), orjson.dumps(value)))
        if log.first_at is None:
            log.first_at = now
        log.last_at = now
    return out


async def produce_open_loop(settings: Settings, arrivals: Arrivals, *, seed: int,
                            tick_s: float = 0.002,
                            source: RequestSource | None = None) -> SentLog:
    """Send one request per scheduled arrival to the source's request topic (default:
    transactions to ``fraud.requests``); all acked on return."""
    source = source if source is not None else TransactionSource(seed, start_ts=time.time())
    topic = settings.topic(source.workload.requests_topic)
    source.take(1)  # the first call pays one-off set-up costs: keep them off the schedule
    log = SentLog()
    producer = make_producer(settings, linger_ms=2)
    await producer.start()
    sender = BatchSender(producer)
    pending: set[asyncio.Task[None]] = set()
    unsent: set[str] = set()

    def sent_or_not(task: asyncio.Task[None], ids: list[str]) -> None:
        pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            unsent.update(ids)  # never acknowledged: not an event the pipeline could answer
            log.send_error = log.send_error or repr(exc)

    sent = 0
    try:
        started = time.monotonic()
        log.started_at = time.time()
        while sent < len(arrivals):
            elapsed = time.monotonic() - started
            due = arrivals.due(elapsed)
            if due > sent:
                lag_ms = (elapsed - float(arrivals.offsets[sent])) * 1000.0
                if lag_ms > log.max_lag_ms:
                    log.max_lag_ms, log.max_lag_at_s = lag_ms, float(arrivals.offsets[sent])
                task = asyncio.create_task(sender.send(topic, _records(source, due - sent,
                                                                       log)))
                pending.add(task)
                task.add_done_callback(partial(sent_or_not, ids=log.ids[sent:due]))
                sent = due
            await asyncio.sleep(tick_s)
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await producer.stop()
    if unsent:
        log.ids = [event_id for event_id in log.ids if event_id not in unsent]
        log.unsent = len(unsent)
    return log


async def preload(settings: Settings, count: int, *, seed: int, chunk: int = 5000,
                  source: RequestSource | None = None) -> SentLog:
    """Send ``count`` requests as fast as the broker takes them (a backlog to drain)."""
    source = source if source is not None else TransactionSource(seed, start_ts=time.time())
    topic = settings.topic(source.workload.requests_topic)
    log = SentLog()
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    sender = BatchSender(producer)
    try:
        in_flight: list[asyncio.Task[None]] = []
        for start in range(0, count, chunk):
            records = _records(source, min(chunk, count - start), log)
            in_flight.append(asyncio.create_task(sender.send(topic, records)))
            if len(in_flight) >= 4:  # bounded pipelining keeps memory flat
                await in_flight.pop(0)
        await asyncio.gather(*in_flight)
    finally:
        await producer.stop()
    return log
