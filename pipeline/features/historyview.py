"""The fast path's read-only view of the slow path's card history.

The history agent (:mod:`agents.history`) keeps one
:class:`~pipeline.features.cardhistory.CardHistory` per card in a faust Table whose changelog topic
(``fraud.history.changelog``) is co-partitioned with ``fraud.requests``: the history of a card
lives in the partition its transactions arrive on. The fraud lane of a worker may own other
``fraud.requests`` partitions than the worker's history agent (they are different consumer groups),
so it does not read faust's table; it tails the changelog partitions matching its own assignment
into memory (:class:`HistoryView`) and reads snapshots from there. It never waits for them.

Freshness. Every changelog value carries ``src_offset``, the offset of the newest transaction
the agent had applied in that partition, so the view knows per partition how far the slow path
has got (:meth:`HistoryView.applied`). The lane remembers offset and broker timestamp of the
valid transactions it has seen (:class:`PartitionClock`); an event's history *lag* is the age of
the oldest earlier transaction of its partition that the slow path has not applied yet (0 when
it is up to date). A lag above ``history_max_staleness_ms`` makes the event use default history
and carry ``degraded: true``. Unlike "time since the card's last update", this does not punish
quiet cards and does catch a slow path that fell behind, crashed, or is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.features.cardhistory import CardHistory, from_bytes
from pipeline.kafka.connection import start_reader
from pipeline.metrics import HISTORY_FRESHNESS
from pipeline.settings import Settings

__all__ = ["CHANGELOG", "TABLE_NAME", "HistoryView", "PartitionClock"]

log = logging.getLogger(__name__)

TABLE_NAME = "card-history"
#: Logical name of the history table's changelog topic (see :mod:`pipeline.kafka.topics`).
CHANGELOG = "fraud.history.changelog"


class PartitionClock:
    """Offsets and broker timestamps of the transactions the fast path saw in one partition.

    Bounded: when the slow path is so far behind that ``maxlen`` transactions are waiting, the
    oldest entries drop out and the lag computed is a lower bound (already far past any sane
    staleness bound). Entries at or below the applied offset are discarded as the slow path
    catches up.
    """

    def __init__(self, maxlen: int = 65_536) -> None:
        self._seen: deque[tuple[int, float]] = deque(maxlen=maxlen)
        self._first: int | None = None

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, offset: int, ts_s: float) -> None:
        """Record a transaction (offsets must arrive in increasing order per partition)."""
        if self._first is None:
            self._first = offset
        if not self._seen or offset > self._seen[-1][0]:
            self._seen.append((offset, ts_s))

    def lag_s(self, offset: int, ts_s: float, applied: int) -> float:
        """How old the oldest transaction before ``offset`` not yet applied is, at ``ts_s``.

        ``inf`` when unknown: the slow path is behind the first offset this clock saw (e.g.
        after a restart), so transactions nobody timed here are still missing.
        """
        if self._first is not None and applied < self._first - 1:
            return math.inf
        seen = self._seen
        while seen and seen[0][0] <= applied:
            seen.popleft()
        if seen and seen[0][0] < offset:
            return max(ts_s - seen[0][1], 0.0)
        return 0.0


class HistoryView:
    """In-memory replica of the changelog partitions co-partitioned with the lane's own.

    ``assign`` / ``release`` follow the fraud lane's rebalances; a newly assigned partition is
    read from the beginning of its changelog in the background (its events count as lagging,
    hence degraded, until the view has caught up).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(CHANGELOG)
        self._cards: dict[int, dict[str, CardHistory]] = {}
        self._applied: dict[int, int] = {}
        self._loading: dict[int, int] = {}
        """Partitions still being read up to the changelog end offset seen when assigned."""
        self._wanted: set[int] = set()
        self._changed = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.records = 0
        self.bad_records = 0
        self.freshness_s: deque[float] = deque(maxlen=20_000)
        """The latest live updates' freshness (what :data:`HISTORY_FRESHNESS` observes)."""

    # --- what the fast path reads ------------------------------------------------------------
    def get(self, partition: int, card_id: str) -> CardHistory | None:
        """The card's latest snapshot, or None (partition not loaded yet, or card unknown)."""
        if partition in self._loading:
            return None
        cards = self._cards.get(partition)
        return cards.get(card_id) if cards is not None else None

    def loading(self, partition: int) -> bool:
        """True until ``partition`` is followed and read up to its end offset at assignment."""
        return partition in self._loading or partition not in self._cards

    def applied(self, partition: int) -> int:
        """Highest ``fraud.requests`` offset the slow path has applied in ``partition`` (-1)."""
        return self._applied.get(partition, -1)

    def size(self) -> int:
        """Cards held, over all loaded partitions."""
        return sum(len(cards) for cards in self._cards.values())

    # --- following the lane's assignment ------------------------------------------------------
    def assign(self, partitions: Iterable[int]) -> None:
        """Start following these partitions too (read from the changelog's beginning)."""
        self._wanted |= set(partitions)
        self._changed.set()

    def release(self, partitions: Iterable[int]) -> None:
        """Stop following these partitions and free their snapshots."""
        for p in partitions:
            self._wanted.discard(p)
            self._cards.pop(p, None)
            self._applied.pop(p, None)
            self._loading.pop(p, None)
        self._changed.set()

    async def start(self) -> None:
        self._consumer = await start_reader(
            self.settings, f"{self.settings.app_id}-history-view",
            auto_offset_reset="earliest")
        self._task = asyncio.create_task(self._run(), name="history-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # noqa: S101 - set in start()
        assigned: set[int] = set()
        while True:
            if self._wanted != assigned:
                assigned = await self._reassign(consumer, assigned)
            self._changed.clear()
            if not assigned:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)
                continue
            try:
                fetched = await consumer.getmany(timeout_ms=100, max_records=10_000)
            except KafkaError as exc:  # the fast path degrades meanwhile; keep trying
                log.warning("history view: fetch failed: %r", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in fetched.items():
                if tp.partition in self._wanted:
                    self._apply(tp.partition, records)

    async def _reassign(self, consumer: AIOKafkaConsumer, assigned: set[int]) -> set[int]:
        wanted = set(self._wanted)
        if wanted and not await self._topic_exists(consumer):
            return assigned
        positions = {}
        for p in assigned & wanted:
            with contextlib.suppress(KafkaError, AssertionError):
                positions[p] = await consumer.position(TopicPartition(self.topic, p))
        consumer.assign([TopicPartition(self.topic, p) for p in sorted(wanted)])
        fresh = [TopicPartition(self.topic, p) for p in wanted - positions.keys()]
        ends = await consumer.end_offsets(fresh) if fresh else {}
        for p in wanted:
            tp = TopicPartition(self.topic, p)
            if p in positions:
                consumer.seek(tp, positions[p])
                continue
            self._cards[p] = {}
            self._applied.pop(p, None)
            await consumer.seek_to_beginning(tp)
            if ends.get(tp, 0) > 0:
                self._loading[p] = ends[tp]
        log.info("history view: following %s partitions %s", self.topic, sorted(wanted))
        return wanted

    async def _topic_exists(self, consumer: AIOKafkaConsumer) -> bool:
        try:
            if self.topic in await consumer.topics():
                return True
        except KafkaError as exc:
            log.warning("history view: metadata request failed: %r", exc)
        log.info("history view: waiting for topic %s (created by the worker's topic setup)",
                 self.topic)
        await asyncio.sleep(1.0)
        return False

    def _apply(self, partition: int, records: list) -> None:  # type: ignore[type-arg]
        cards = self._cards.setdefault(partition, {})
        applied = self._applied.get(partition, -1)
        # Freshness of live updates only: a partition's load replays old records.
        fresh = None if partition in self._loading else HISTORY_FRESHNESS.labels(str(partition))
        now_ms = time.time() * 1000.0
        for record in records:
            self.records += 1
            key = record.key.decode("utf-8", "replace") if record.key is not None else ""
            if record.value is None:  # tombstone: the card's history was deleted
                cards.pop(key, None)
                continue
            try:
                history = from_bytes(record.value)
            except ValueError as exc:
                self.bad_records += 1
                if self.bad_records <= 5:
                    log.warning("history view: skipping %s-%d@%d: %s", self.topic, partition,
                                record.offset, exc)
                continue
            cards[key] = history
            applied = max(applied, history.src_offset)
            if fresh is not None:
                age_s = max(now_ms - record.timestamp, 0.0) / 1000.0
                fresh.observe(age_s)
                self.freshness_s.append(age_s)
        self._applied[partition] = applied
        loading_until = self._loading.get(partition)
        if loading_until is not None and records and records[-1].offset + 1 >= loading_until:
            del self._loading[partition]
            log.info("history view: partition %d loaded (%d cards)", partition, len(cards))
