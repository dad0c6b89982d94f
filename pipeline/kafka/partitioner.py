"""Which partition a keyed record belongs to, and a cheap check that producers agree.

The fraud lane's history is co-partitioned with ``fraud.requests``: the slow path keeps a card's
state on the partition its transactions arrive on, and the fraud lane reads it there. That only
holds if every producer maps a key to the same partition. The Java client and aiokafka hash keys
with murmur2; librdkafka-based clients (confluent-kafka, kcat, the Go and .NET clients) default
to ``consistent_random``, a CRC32 hash. Cards produced by both land on two partitions and have two
half histories.

:class:`PartitionerCheck` recomputes the partition of every keyed record with the expected
partitioner (``INFERLANE_PARTITIONER``, murmur2 by default), counts the records that disagree in
``inferlane_misrouted_records_total{lane,topic,likely}`` and logs a rate-limited warning that
names the partitioner the producer most likely used. The per-key answer is cached (keys repeat:
cards, users), so a record costs a dict lookup.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, TypeAlias, cast

from aiokafka.partitioner import DefaultPartitioner, murmur2

from pipeline.metrics import MISROUTED

__all__ = ["PARTITIONERS", "Partitioner", "PartitionerCheck", "partition_for",
           "producer_partitioner"]

log = logging.getLogger(__name__)

Partitioner: TypeAlias = Literal["murmur2", "crc32"]
PARTITIONERS: tuple[Partitioner, ...] = ("murmur2", "crc32")

class _Keyed(Protocol):
    """What the check reads of a consumer record."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...


_PRODUCER_SETTING = {
    "murmur2": "the Java client's and aiokafka's default; librdkafka: partitioner=murmur2_random",
    "crc32": "librdkafka's default partitioner (consistent_random; kcat, confluent-kafka)",
}


def partition_for(key: bytes, partitions: int, partitioner: Partitioner = "murmur2") -> int:
    """The partition ``partitioner`` gives a non-null ``key`` among ``partitions``.

    murmur2: the Java client's ``Utils.toPositive(murmur2(key)) % n`` (aiokafka's
    DefaultPartitioner). crc32: librdkafka's ``consistent``/``consistent_random`` for a keyed
    record, ``crc32(key) % n``.
    """
    if partitioner == "murmur2":
        return int(murmur2(key) & 0x7FFFFFFF) % partitions
    return zlib.crc32(key) % partitions


def producer_partitioner(partitioner: Partitioner) -> Callable[..., int]:
    """An aiokafka ``partitioner=`` callable that places keyed records with ``partitioner``
    (records without a key go to a random available partition, as aiokafka's default)."""
    if partitioner == "murmur2":
        return cast(Callable[..., int], DefaultPartitioner())

    def crc32_partitioner(key: bytes | None, all_partitions: list[int],
                          available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        return all_partitions[zlib.crc32(key) % len(all_partitions)]

    return crc32_partitioner


class PartitionerCheck:
    """Per lane: flag records whose partition is not the one the expected partitioner gives.

    ``misrouted(records, partitions)`` returns one flag per record (records without a key are
    never misrouted: a producer spreads them as it likes). Counting and warning happen here;
    the caller decides what a flag means for its result (the fraud lane marks the score
    ``degraded`` with reason ``misrouted``).
    """

    warn_interval_s = 30.0
    max_cached_keys = 200_000

    def __init__(self, lane: str, expected: Partitioner = "murmur2") -> None:
        self.lane = lane
        self.expected = expected
        self.misrouted_total = 0
        self._cache: dict[bytes, int] = {}
        """Key -> expected partition (the partition count is fixed: the start check)."""
        self._warned_at: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def misrouted(self, records: Sequence[_Keyed], partitions: int) -> list[bool]:
        """One flag per record: True when its key hashes elsewhere among ``partitions``."""
        flags = [False] * len(records)
        cache = self._cache
        bad: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            key = record.key
            if key is None:
                continue
            wanted = cache.get(key)
            if wanted is None:
                if len(cache) >= self.max_cached_keys:
                    cache.clear()
                wanted = cache[key] = partition_for(key, partitions, self.expected)
            if wanted != record.partition:
                flags[i] = True
                bad.setdefault(record.topic, []).append(i)
        for topic, rows in bad.items():
            example = records[rows[-1]]
            assert example.key is not None  # noqa: S101 - only keyed records are flagged
            self._count(topic, example.partition, len(rows), example.key, partitions)
        return flags

    def _count(self, topic: str, partition: int, bad: int, example: bytes,
               partitions: int) -> None:
        likely = self._likely(example, partition, partitions)
        MISROUTED.labels(self.lane, topic, likely).inc(bad)
        self.misrouted_total += bad
        self._pending[topic] = self._pending.get(topic, 0) + bad
        now = time.monotonic()
        if now - self._warned_at.get(topic, -self.warn_interval_s) < self.warn_interval_s:
            return
        self._warned_at[topic] = now
        count, self._pending[topic] = self._pending[topic], 0
        guess = (f"looks like {_PRODUCER_SETTING[likely]}" if likely != "unknown"
                 else "matches neither murmur2 nor crc32 (a custom partitioner or explicit "
                      "partitions?)")
        log.warning(
            "%s: %d records of %s are on a partition other than the %s partitioner gives their "
            "key (e.g. key %r on partition %d, expected %d); their producer %s. Their history "
            "may be split across partitions: they are scored degraded (reason misrouted). Fix: "
            "make every producer of %s use the %s partitioner (librdkafka: "
            "partitioner=murmur2_random), or set INFERLANE_PARTITIONER to match the producers",
            self.lane, count, topic, self.expected, example[:64], partition,
            partition_for(example, partitions, self.expected), guess, topic, self.expected)

    def _likely(self, key: bytes, partition: int, partitions: int) -> str:
        for candidate in PARTITIONERS:
            if (candidate != self.expected
                    and partition_for(key, partitions, candidate) == partition):
                return candidate
        return "unknown"
