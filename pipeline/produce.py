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

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.metrics import PRODUCE_ACK

__all__ = ["BatchSender"]

_partitioner = DefaultPartitioner()


class BatchSender:
    """Send lists of ``(key, value)`` pairs to a topic and return when the broker acked all."""

    def __init__(self, producer: AIOKafkaProducer, *, lane: str | None = None) -> None:
        self._producer = producer
        self._partitions: dict[str, list[int]] = {}
        self._ack_seconds = PRODUCE_ACK.labels(lane) if lane is not None else None

    async def _partitions_for(self, topic: str) -> list[int]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = sorted(await self._producer.partitions_for(topic))
            self._partitions[topic] = partitions
        return partitions

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Produce ``records`` to ``topic``; raise if any batch is not acknowledged."""
        if not records:
            return
        partitions = await self._partitions_for(topic)
        by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
        for key, value in records:
            if key is None:
                part = partitions[hash(value) % len(partitions)]
            else:
                part = _partitioner(key, partitions, partitions)
            by_partition.setdefault(part, []).append((key, value))
        acks = []
        started = time.monotonic()
        timestamp_ms = int(time.time() * 1000)
        for part, items in by_partition.items():
            acks.extend(await self._send_partition(topic, part, items, timestamp_ms))
        await asyncio.gather(*acks)
        if self._ack_seconds is not None:
            self._ack_seconds.observe(time.monotonic() - started)

    async def _send_partition(
        self, topic: str, partition: int, items: list[tuple[bytes | None, bytes]],
        timestamp_ms: int,
    ) -> list[asyncio.Future[object]]:
        acks: list[asyncio.Future[object]] = []
        batch = self._producer.create_batch()
        for key, value in items:
            if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                batch.close()
                acks.append(await self._producer.send_batch(batch, topic, partition=partition))
                batch = self._producer.create_batch()
                if batch.append(key=key, value=value, timestamp=timestamp_ms) is None:
                    raise ValueError(
                        f"record of {len(value)} bytes exceeds the producer batch size")
        batch.close()
        acks.append(await self._producer.send_batch(batch, topic, partition=partition))
        return acks
