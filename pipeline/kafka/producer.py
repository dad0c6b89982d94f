"""Batched produce: many records to one topic with one batch per partition, all acks awaited.

One ``producer.send()`` per result costs a future and a Python round trip per record; building
record batches per partition (aiokafka's ``create_batch`` / ``send_batch``) amortises that. The
partition of a keyed record is the one Kafka's default partitioner picks (murmur2 of the key),
so co-partitioning with other Kafka clients holds.

Concurrent sends to one partition are **coalesced**: aiokafka takes one batch per partition at
a time, so records that arrive while a partition's batch waits for its slot join the next batch
instead of queueing a batch each. Without that, many small concurrent sends (a load generator
ticking every 2 ms, a lane's micro-batches) queued one tiny batch per partition per round trip
-- a throughput ceiling near partitions x batch / RTT (~4,000 records/s measured here) -- and
every waiting send woke at each drain (767,184 ``asyncio.wait`` calls for 100,000 records: the
generator of ``bench soak`` at 5,000 ev/s took a whole core and fell minutes behind).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError
from aiokafka.partitioner import DefaultPartitioner

from pipeline.errors import TopicError
from pipeline.kafka.connection import ProducerHandle
from pipeline.metrics import PRODUCE_ACK

__all__ = ["BatchSender"]

_partitioner = DefaultPartitioner()


class BatchSender:
    """Send lists of ``(key, value)`` pairs to a topic and return when the broker acked all."""

    def __init__(self, producer: AIOKafkaProducer | ProducerHandle, *,
                 lane: str | None = None) -> None:
        self._handle = producer if isinstance(producer, ProducerHandle) else None
        self._fixed = producer if isinstance(producer, AIOKafkaProducer) else None
        self._partitions: dict[str, list[int]] = {}
        self._ack_seconds = PRODUCE_ACK.labels(lane) if lane is not None else None
        self._queues: dict[tuple[int, str, int], _PartitionQueue] = {}

    async def _partitions_for(self, producer: AIOKafkaProducer, topic: str) -> list[int]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            try:
                partitions = sorted(await producer.partitions_for(topic))
            except UnknownTopicOrPartitionError as exc:
                # The brokers do not create topics on first use (auto.create.topics.enable is
                # off in the local stack and in most production clusters).
                raise TopicError(f"topic {topic} does not exist: create it first "
                                 f"(`inferlane topics create`)") from exc
            self._partitions[topic] = partitions
        return partitions

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]], *,
                   partition: int | None = None,
                   timestamps_ms: Sequence[int] | None = None) -> None:
        """Produce ``records`` to ``topic``; raise if any batch is not acknowledged.

        ``partition`` sends them all to that partition instead of the key's (a table changelog
        follows its source's partition); ``timestamps_ms`` gives each record its timestamp
        instead of now.

        Given a :class:`ProducerHandle`, a producer whose broker state was lost is replaced and
        the records are sent once more (some may then be written twice: at-least-once); so are
        the records of every send still waiting on the replaced producer."""
        if self._handle is None:
            assert self._fixed is not None  # noqa: S101 - one of the two is set
            await self._send(self._fixed, None, topic, records, partition, timestamps_ms)
            return
        await self._handle.send_renewing(
            lambda producer, retired: self._send(producer, retired, topic, records, partition,
                                                 timestamps_ms))

    async def _send(self, producer: AIOKafkaProducer, retired: asyncio.Event | None, topic: str,
                    records: Sequence[tuple[bytes | None, bytes]], partition: int | None = None,
                    timestamps_ms: Sequence[int] | None = None) -> None:
        if not records:
            return
        now_ms = int(time.time() * 1000)
        stamps = timestamps_ms if timestamps_ms is not None else [now_ms] * len(records)
        by_partition: dict[int, list[tuple[bytes | None, bytes, int]]] = {}
        if partition is not None:
            by_partition[partition] = [(k, v, ts) for (k, v), ts in zip(records, stamps,
                                                                        strict=True)]
        else:
            partitions = await self._partitions_for(producer, topic)
            # The producer's own partitioner (make_producer sets INFERLANE_PARTITIONER's), so
            # a key lands where every other producer of the pipeline puts it.
            place = getattr(producer, "_partitioner", _partitioner)
            for (key, value), ts in zip(records, stamps, strict=True):
                if key is None:
                    part = partitions[hash(value) % len(partitions)]
                else:
                    part = place(key, partitions, partitions)
                by_partition.setdefault(part, []).append((key, value, ts))
        started = time.monotonic()
        acked = asyncio.gather(*(self._queue(producer, topic, part, items)
                                 for part, items in by_partition.items()))
        if retired is None:
            await acked
        else:
            await ProducerHandle.acked(retired, acked)
        if self._ack_seconds is not None:
            self._ack_seconds.observe(time.monotonic() - started)

    def _queue(self, producer: AIOKafkaProducer, topic: str, partition: int,
               items: list[tuple[bytes | None, bytes, int]]) -> asyncio.Future[None]:
        """Add ``items`` to the partition's next batch; the future is settled when the broker
        acknowledged that batch (all of it), or with the error that stopped it."""
        key = (id(producer), topic, partition)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _PartitionQueue()
        if queue.done is None:
            queue.done = asyncio.get_running_loop().create_future()
        queue.items.extend(items)
        done = queue.done
        if queue.task is None:
            queue.task = asyncio.create_task(self._flush(producer, topic, partition, queue, key))
        return done

    async def _flush(self, producer: AIOKafkaProducer, topic: str, partition: int,
                     queue: _PartitionQueue, key: tuple[int, str, int]) -> None:
        """Hand the partition's waiting records to the producer, a coalesced batch at a time,
        until none wait; then forget the queue (a later send starts another)."""
        try:
            while queue.items and queue.done is not None:
                items, done = queue.items, queue.done
                queue.items, queue.done = [], None
                try:
                    acks = await self._send_partition(producer, topic, partition, items)
                except asyncio.CancelledError:
                    done.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - the senders of these records get it
                    _settle(done, exc)
                    continue
                asyncio.gather(*acks).add_done_callback(partial(_settle_from, done))
        finally:
            queue.task = None
            if queue.done is not None and not queue.done.done():  # cancelled meanwhile
                queue.done.cancel()
            queue.items, queue.done = [], None
            self._queues.pop(key, None)

    @staticmethod
    async def _send_partition(
        producer: AIOKafkaProducer, topic: str, partition: int,
        items: list[tuple[bytes | None, bytes, int]],
    ) -> list[asyncio.Future[object]]:
        acks: list[asyncio.Future[object]] = []
        batch = producer.create_batch()
        for key, value, timestamp_ms in items:
            if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                batch.close()
                acks.append(await _enqueue(producer, batch, topic, partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                    raise ValueError(
                        f"record of {len(value)} bytes exceeds the producer batch size")
        batch.close()
        acks.append(await _enqueue(producer, batch, topic, partition))
        return acks


class _PartitionQueue:
    """Records waiting for one partition's slot in one producer, the future their senders
    await, and the task that hands them over (None when idle)."""

    __slots__ = ("done", "items", "task")

    def __init__(self) -> None:
        self.items: list[tuple[bytes | None, bytes, int]] = []
        self.done: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


def _settle_from(done: asyncio.Future[None], acks: asyncio.Future[list[object]]) -> None:
    if acks.cancelled():
        done.cancel()
    else:
        _settle(done, acks.exception())


#: How long a batch may wait for its partition's slot in the producer (one batch in flight per
#: partition) before the send fails: the producer's request timeout.
ENQUEUE_TIMEOUT_S = 60.0
"""Long enough for a broker restarted after a crash under load (tens of seconds on 2 cores)."""


async def _enqueue(producer: AIOKafkaProducer, batch: Any, topic: str,
                   partition: int) -> asyncio.Future[object]:
    """``producer.send_batch``, waiting up to :data:`ENQUEUE_TIMEOUT_S` for the partition's slot.

    aiokafka 0.14's ``add_batch`` subtracts the *total* time waited so far from its timeout at
    every wake-up, so a batch queued behind many others for one partition (say, sends piled up
    while the broker restarted) gives up after a fraction of a second. A batch that timed out
    there was never handed to the producer (aiokafka documents this), so trying again cannot
    duplicate it.
    """
    deadline = time.monotonic() + ENQUEUE_TIMEOUT_S
    while True:
        try:
            ack: asyncio.Future[object] = await producer.send_batch(batch, topic,
                                                                    partition=partition)
            return ack
        except KafkaTimeoutError:
            if time.monotonic() >= deadline:
                raise
