"""Exactly-once lanes: each input partition's results and offsets commit in one transaction.

With ``INFERLANE_DELIVERY=exactly_once`` a lane whose handler is transactional (fraud, reco)
owns, per assigned input partition, a transactional producer with the id
``<app_id>-<lane>-<topic>-<partition>``:

* **fencing.** The id belongs to the partition, not to the process, so whoever is assigned the
  partition next (a restarted worker, another replica) starts a producer with the same id; the
  broker's ``InitProducerId`` then bumps the epoch, aborts the old owner's open transaction and
  refuses every later write or commit of the old producer (a paused "zombie" worker that wakes
  up cannot commit). Only then are the partition's committed offsets read and the consumer
  placed there. (aiokafka 0.14 speaks ``TxnOffsetCommit`` v0, without the group generation of
  KIP-447, so a producer per worker could not be fenced by the group; a producer per partition
  is what Kafka Streams' first exactly-once mode did for the same reason.)
* **one transaction per partition per interval.** The lane hands each partition's records to
  the handler in a call of their own, inside :meth:`Transactions.work` (bound at fetch time to
  the assignment they were fetched under, so records of a revoked partition are dropped, never
  sent in a later owner's transaction); every send the handler makes there (results, dead
  letters, shadow scores) goes to that partition's producer through
  :class:`TransactionalSender`, found by a context variable. Every ``transaction_interval_ms``
  the lane commits every partition that had work, together (:meth:`Transactions.commit`): it
  closes each one's gate, waits for its calls in flight to finish (their chunks are then
  done), adds its finished offset to the transaction and commits it; new work for the
  partition waits at the gate meanwhile. (Measured on one broker, side by side: a committer
  per partition, committing 20 ms after work first entered its transaction, gave p50 / p99 at
  5,000 ev/s of 169 / 461 ms against 52 / 278 ms for this shared tick: staggered commits keep
  some gate closed nearly all the time.)
* **visibility.** ``read_committed`` readers (the archive, the services, the bench reader) see
  a result only once its transaction commits: the interval bounds the extra latency.

A failed commit (fenced, or the broker gave up) raises: the lane crashes, the open transaction
is aborted (by the broker, or by the next owner's fencing) and the records are redone by the
next owner from the committed offsets: nothing committed twice, nothing lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced, TransactionCoordinatorFenced

from pipeline.kafka.connection import make_producer
from pipeline.kafka.producer import BatchSender
from pipeline.metrics import TXN_COMMIT
from pipeline.settings import Settings

__all__ = ["FENCED", "TransactionalSender", "Transactions", "transactional_id"]

#: What the broker answers a producer whose transactional id a newer producer took over.
FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionCoordinatorFenced)

log = logging.getLogger(__name__)

_SOURCE: contextvars.ContextVar[TopicPartition | None] = contextvars.ContextVar(
    "inferlane_source_partition", default=None)


def transactional_id(settings: Settings, lane: str, tp: TopicPartition) -> str:
    """The transactional id of ``lane``'s producer for input partition ``tp``: the same on
    every worker, so the partition's next owner fences the previous one."""
    return f"{settings.app_id}-{lane}-{tp.topic}-{tp.partition}"


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    producer: AIOKafkaProducer
    sender: BatchSender
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while new work may enter the open transaction; cleared during a commit."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    dirty: bool = False
    """Work entered since the last commit (there is something to commit)."""
    released: bool = False
    """Revoked: work still waiting for the gate is dropped (the next owner redoes it)."""
    failed: BaseException | None = None
    """A commit failed (fenced, or the broker gave up): the transaction is lost, never
    committed later (the lane crashes; the next owner redoes its records)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.gate.set()
        self.idle.set()


class Transactions:
    """The transactional producers of one lane's assigned partitions, and their commits."""

    def __init__(self, settings: Settings, lane: str) -> None:
        self.settings = settings
        self.lane = lane
        self.group_id = settings.group_id(lane)
        self._parts: dict[TopicPartition, _Partition] = {}
        self.commit_seconds = TXN_COMMIT.labels(lane)

    async def assign(self, tps: set[TopicPartition], consumer: AIOKafkaConsumer) -> None:
        """Start (and so fence) each new partition's producer, open its transaction, place the
        consumer at the partition's committed offset (read after the fencing, so a previous
        owner's last transaction is settled), and only then take the partition's records.

        aiokafka fetches for a new assignment while this listener runs (its coordinator awaits
        between assigning and calling it), so records may arrive from a position read before
        the fencing: until the partition is registered here they are dropped (``bind`` gives
        None), and the seek discards what was buffered, so nothing is handled twice."""
        new = [tp for tp in tps if tp not in self._parts]
        parts = await asyncio.gather(*(self._open(tp) for tp in new))
        positions = [await consumer.committed(tp) for tp in new]
        beginnings = await consumer.beginning_offsets(new) if new else {}
        # No await from the first seek to the last registration: records fetched from a
        # seeked position are all handled, records from before it are all dropped.
        for part, committed in zip(parts, positions, strict=True):
            consumer.seek(part.tp, committed if committed is not None
                          else beginnings[part.tp])  # none committed: auto_offset_reset
        for part in parts:
            self._parts[part.tp] = part
        if new:
            log.info("%s: transactional producers for %s (fenced their previous owners)",
                     self.lane, sorted(tp.partition for tp in new))

    async def _open(self, tp: TopicPartition) -> _Partition:
        producer = make_producer(self.settings, transactional_id=transactional_id(
            self.settings, self.lane, tp))
        await producer.start()
        await producer.begin_transaction()  # waits for InitProducerId: the fencing
        return _Partition(tp, producer, BatchSender(producer, lane=self.lane))

    def bind(self, tp: TopicPartition) -> _Partition | None:
        """The transaction state ``tp``'s records just fetched belong to (None: not ours)."""
        return self._parts.get(tp)

    async def work(self, part: _Partition, body: Callable[[], Awaitable[None]]) -> bool:
        """Run ``body`` (a handler call for records of ``part``) inside its transaction, once
        no commit of it runs; False (``body`` not run) if the partition was revoked first."""
        while not part.gate.is_set():
            await part.gate.wait()
        if part.released:
            return False
        if part.failed is not None:
            raise part.failed
        part.active += 1
        part.dirty = True
        part.idle.clear()
        token = _SOURCE.set(part.tp)
        try:
            await body()
        finally:
            _SOURCE.reset(token)
            part.active -= 1
            if part.active == 0:
                part.idle.set()
        return True

    def sender(self, tp: TopicPartition | None) -> BatchSender:
        part = self._parts.get(tp) if tp is not None else None
        if part is None:
            raise RuntimeError(f"{self.lane}: a send outside any partition's transaction "
                               f"(source {tp}); exactly-once lanes send only from handle()")
        return part.sender

    async def commit(self, tps: Sequence[TopicPartition],
                     finished: Callable[[TopicPartition], int | None]) -> dict[TopicPartition, int]:
        """Commit the open transaction of each partition in ``tps`` that has work in it, with
        the partition's finished offset; return the offsets committed."""
        results = await asyncio.gather(*(self._commit_one(tp, finished) for tp in tps
                                         if tp in self._parts))
        return {tp: offset for item in results if item is not None for tp, offset in [item]}

    async def _commit_one(self, tp: TopicPartition,
                          finished: Callable[[TopicPartition], int | None],
                          ) -> tuple[TopicPartition, int] | None:
        part = self._parts[tp]
        async with part.lock:
            if part.failed is not None:
                raise part.failed
            if not part.dirty:
                return None
            part.gate.clear()
            try:
                await part.idle.wait()
                started = time.monotonic()
                offset = finished(tp)
                if offset is not None:
                    await part.producer.send_offsets_to_transaction({tp: offset}, self.group_id)
                await part.producer.commit_transaction()
                self.commit_seconds.observe(time.monotonic() - started)
                part.dirty = False
                await part.producer.begin_transaction()
            except BaseException as exc:
                part.failed = exc
                raise
            finally:
                part.gate.set()
        return None if offset is None else (tp, offset)

    async def release(self, tps: set[TopicPartition]) -> None:
        """Stop the producers of revoked partitions (an uncommitted transaction is aborted by
        the broker: its records are redone by the next owner)."""
        parts = [self._parts.pop(tp) for tp in list(tps) if tp in self._parts]
        for part in parts:
            part.released = True
            part.gate.set()  # work waiting at the gate sees the release and is dropped
        await asyncio.gather(*(_stop(part.producer) for part in parts))

    async def close(self) -> None:
        await self.release(set(self._parts))

    @property
    def failed(self) -> BaseException | None:
        """The first lost transaction's error, if one was lost."""
        return next((p.failed for p in self._parts.values() if p.failed is not None), None)

    @property
    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)


async def _stop(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 10.0)
    except Exception as exc:  # noqa: BLE001 - a fenced or dead producer: nothing to save
        log.warning("stopping a transactional producer: %r", exc)


class TransactionalSender:
    """:class:`BatchSender`'s ``send`` for an exactly-once lane: each record goes out with the
    producer of the input partition whose handler call sends it, inside its transaction."""

    def __init__(self, transactions: Transactions) -> None:
        self._txns = transactions

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]], *,
                   partition: int | None = None,
                   timestamps_ms: Sequence[int] | None = None) -> None:
        if not records:
            return
        await self._txns.sender(_SOURCE.get()).send(topic, records, partition=partition,
                                                    timestamps_ms=timestamps_ms)
