"""Batched produce: many records to one topic with one batch per partition, all acks awaited.

One ``producer.send()`` per result costs a future and a Python round trip per record; building
record batches per partition (aiokafka's ``create_batch`` / ``send_batch``) amortises that. The
partition of a keyed record is the one Kafka's default partitioner picks (murmur2 of the key),
so co-partitioning with other Kafka clients holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
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
        acks = []
        started = time.monotonic()
        for part, items in by_partition.items():
            acks.extend(await self._send_partition(producer, topic, part, items))
        acked = asyncio.gather(*acks)
        if retired is None:
            await acked
        else:
            await ProducerHandle.acked(retired, acked)
        if self._ack_seconds is not None:
            self._ack_seconds.observe(time.monotonic() - started)

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
