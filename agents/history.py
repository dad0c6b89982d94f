"""The slow path: a lane that keeps every card's history, applied per fetched batch.

It reads ``fraud.requests`` and ``fraud.labels`` (both keyed by ``card_id``, same partition
count; the history consumer group uses the range assignor, so a member owns the same partition
numbers of both) and applies each valid transaction / label to the card's
:class:`~pipeline.features.cardhistory.CardHistory` (pure transitions in
:mod:`pipeline.features.cardhistory`) in memory. Per fetched batch and partition, each card that
changed is written once to the changelog (``fraud.history.changelog``, compacted), to the
partition its records came from, in the order of the cards' newest applied offsets; the input
offsets are committed only once those writes are acknowledged. The fraud lane's
:class:`~pipeline.features.historyview.HistoryView` tails the same changelog for its snapshots.

Why a lane and not a faust Table: faust's stream costs ~330 µs per event whatever the table does
(a naive faust agent drains ~3k events/s on this machine, the lanes 29-40k), so a Table with
batched writes still caps a process near 3k events/s; docs/design.md has the figures.

Recovery. When the group gives this worker a partition it does not hold, the partition's state
is read back from the changelog (to the end offset seen at assignment) before any of its records
is applied: the rebalance listener waits for it, so fetching resumes only on complete state. A
partition given back after a rebalance keeps its state; one moved away is dropped.

Idempotent updates. Delivery is at least once (a crash or a rebalance redelivers what was not
committed yet). Each card's state keeps the highest offset it has applied from each input topic
(``src_offset``, ``label_offset``), so a redelivered record is recognised and skipped instead of
being counted twice. (A card's records always arrive on the same partition, so the per-card
offsets are comparable.)

Producer retries. A producer that retries a send can write the same transaction twice, at two
offsets. ``event_id`` is unique per transaction, so a transaction whose ``event_id`` is the
card's newest one (``last_event_id``) is such a copy: it only moves the card's ``src_offset``
and is not counted again. (A copy that arrives after another transaction of the same card is
not recognised and counts twice; producers retry within milliseconds, so that is rare.) The
fraud lane scores every copy again: scores are keyed by ``event_id`` and readers keep one.

Invalid records: a transaction the fraud lane will dead-letter is skipped here (the lane
reports it); an invalid label goes to ``fraud.labels.dlq`` with its reason.

Freshness. Each changelog record carries, as its timestamp, the ``sent_at`` of the newest
transaction it includes (the record's own timestamp when there is none), so the history view
measures how long a transaction took to reach the fast path's snapshots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faust
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.features.cardhistory import (
    CardHistory,
    from_bytes,
    to_bytes,
    update_with_label,
    update_with_transaction,
)
from pipeline.features.historyview import CHANGELOG
from pipeline.kafka.connection import start_reader
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.faustapp import attach_lane
from pipeline.kafka.lane import Lane, LaneContext, PartitionRecords, Record
from pipeline.kafka.partitioner import PartitionerCheck
from pipeline.kafka.supervisor import LaneSupervisor
from pipeline.settings import Settings
from schemas import FraudLabel, Transaction, validate_record

__all__ = [
    "LANE",
    "HistoryHandler",
    "HistoryStats",
    "apply_label",
    "apply_transaction",
    "is_retry",
    "register",
]

LANE = "history"

log = logging.getLogger(__name__)

@dataclass
class HistoryStats:
    """What the agent did (logged periodically)."""

    transactions: int = 0
    labels: int = 0
    skipped_invalid: int = 0
    redelivered: int = 0
    retried: int = 0
    """Copies of the card's newest transaction (same ``event_id``, a later offset): not counted."""
    labels_dead_lettered: int = 0


def apply_transaction(h: CardHistory | None, txn: dict[str, Any],
                      offset: int) -> CardHistory | None:
    """The card's state after ``txn`` at ``offset``; None when that offset is already in it.

    A producer's retry of the card's newest transaction (see :func:`is_retry`) only moves
    ``src_offset`` (the fast path's "applied up to here"); its amounts are not counted again.
    """
    if h is not None and offset <= h.src_offset:
        return None
    if h is not None and is_retry(h, txn):
        return msgspec.structs.replace(h, src_offset=offset)
    return update_with_transaction(h, txn, offset=offset)


def is_retry(h: CardHistory, txn: dict[str, Any]) -> bool:
    """True when ``txn`` has the ``event_id`` of the card's newest transaction: a copy."""
    return h.last_event_id != "" and txn.get("event_id") == h.last_event_id


def apply_label(h: CardHistory | None, label: dict[str, Any], offset: int) -> CardHistory | None:
    """The card's state after ``label`` at ``offset``; None when that offset is already in it."""
    if h is not None and offset <= h.label_offset:
        return None
    return msgspec.structs.replace(update_with_label(h, label), label_offset=offset)


class HistoryHandler:
    """The history lane's handler: per-partition card state, one changelog write per changed
    card per batch, recovery from the changelog on assignment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.requests = settings.topic("fraud.requests")
        self.labels = settings.topic("fraud.labels")
        self.changelog = settings.topic(CHANGELOG)
        self.labels_dlq = settings.topic("fraud.labels.dlq")
        self.stats = HistoryStats()
        self._cards: dict[int, dict[bytes, CardHistory]] = {}
        self._lock = asyncio.Lock()
        self._tails: dict[int, asyncio.Future[None]] = {}
        """Per changelog partition, the latest write queued (see :meth:`_chain`)."""
        self._ctx: LaneContext | None = None
        self._reader: AIOKafkaConsumer | None = None
        # Labels only: fraud.requests is checked by the fraud lane, which flags the scores.
        self._partitioner = PartitionerCheck(LANE, settings.partitioner)

    @property
    def topics(self) -> Sequence[str]:
        return (self.requests, self.labels)

    def cards(self) -> int:
        """Cards held, over all owned partitions."""
        return sum(len(cards) for cards in self._cards.values())

    async def start(self, ctx: LaneContext) -> None:
        self._ctx = ctx
        self._reader = await start_reader(self.settings, f"{self.settings.app_id}-history-recovery",
                                          auto_offset_reset="earliest")

    async def stop(self) -> None:
        log.info("history agent: %s, table holds %d cards", self.stats, self.cards())
        if self._reader is not None:
            await self._reader.stop()

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Nothing yet: the assignment that follows says which partitions stay (kept) and
        which moved away (dropped)."""

    async def on_assigned(self, tps: set[TopicPartition]) -> None:
        owned = {tp.partition for tp in tps}
        async with self._lock:
            for partition in set(self._cards) - owned:
                del self._cards[partition]
            await self._recover(owned - set(self._cards))

    async def _recover(self, partitions: set[int]) -> None:
        """Read the changelog of ``partitions`` from the beginning to its current end."""
        if not partitions:
            return
        reader = self._reader
        assert reader is not None  # noqa: S101 - set in start()
        started = time.monotonic()
        tps = [TopicPartition(self.changelog, p) for p in sorted(partitions)]
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        pending = {tp for tp in tps if ends.get(tp, 0) > 0}
        for tp in tps:
            self._cards[tp.partition] = {}
            await reader.seek_to_beginning(tp)
        records = bad = 0
        while pending:
            fetched = await reader.getmany(*pending, timeout_ms=500, max_records=20_000)
            for tp, batch in fetched.items():
                cards = self._cards[tp.partition]
                for record in batch:
                    records += 1
                    if record.offset >= ends[tp]:
                        break
                    if record.key is None:
                        continue
                    if record.value is None:  # tombstone
                        cards.pop(record.key, None)
                        continue
                    try:
                        cards[record.key] = from_bytes(record.value)
                    except ValueError:
                        bad += 1
                if await reader.position(tp) >= ends[tp]:
                    pending.discard(tp)
        reader.assign([])
        log.info("history agent: recovered partitions %s from %s (%d cards, %d records, %d "
                 "unreadable) in %.2fs", sorted(partitions), self.changelog,
                 sum(len(self._cards[p]) for p in partitions), records, bad,
                 time.monotonic() - started)

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        ctx = self._ctx
        assert ctx is not None  # noqa: S101 - set in start()
        async with self._lock:  # applied in fetch order, never during a recovery
            changed, letters = self._apply(batch)
            # Queued in apply order: a partition's writes go out one after the other.
            sends = [self._chain(partition, rows) for partition, rows in changed.items()]
        if letters:
            sends.append(asyncio.ensure_future(ctx.sender.send(self.labels_dlq, letters)))
        await asyncio.gather(*sends)
        for part in batch:
            ctx.done(part.chunk)

    def _chain(self, partition: int, rows: list[tuple[bytes, CardHistory, int]]
               ) -> asyncio.Future[None]:
        """Send ``rows`` to the changelog once the partition's previous write is acknowledged.

        Two sends in flight for one partition may reach the broker in either order (the
        producer takes whichever batch gets the partition's slot first), and the older state
        would then win: each write waits for the one before it.
        """
        previous = self._tails.get(partition)
        task = asyncio.ensure_future(self._send_after(previous, partition, rows))
        self._tails[partition] = task

        def forget(done: asyncio.Future[None]) -> None:
            if self._tails.get(partition) is done:
                del self._tails[partition]

        task.add_done_callback(forget)
        return task

    async def _send_after(self, previous: asyncio.Future[None] | None, partition: int,
                          rows: list[tuple[bytes, CardHistory, int]]) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        assert self._ctx is not None  # noqa: S101 - set in start()
        await self._ctx.sender.send(self.changelog, [(key, to_bytes(h)) for key, h, _ in rows],
                                    partition=partition, timestamps_ms=[ts for _, _, ts in rows])

    def _apply(self, batch: Sequence[PartitionRecords]
               ) -> tuple[dict[int, list[tuple[bytes, CardHistory, int]]],
                          list[tuple[bytes | None, bytes]]]:
        """Apply a fetch; per partition, the changed cards (newest applied offset order) with
        the timestamp their changelog record gets, and the dead letters of invalid labels."""
        touched: dict[int, dict[bytes, tuple[int, int]]] = {}
        letters: list[tuple[bytes | None, bytes]] = []
        max_bytes = self.settings.max_message_bytes
        for part in batch:
            partition = part.tp.partition
            cards = self._cards.setdefault(partition, {})
            marks = touched.setdefault(partition, {})
            if part.tp.topic == self.requests:
                for record in part.records:
                    self._on_transaction(cards, marks, record, max_bytes)
            else:
                # Misrouted labels are counted and warned about, and applied where they are
                # (docs/producers.md).
                self._partitioner.misrouted(part.records, self.settings.realtime_partitions)
                for record in part.records:
                    letter = self._on_label(cards, marks, record, max_bytes)
                    if letter is not None:
                        letters.append((record.key, letter))
        changed = {}
        for partition, marks in touched.items():
            if marks:
                cards = self._cards[partition]
                order = sorted(marks.items(), key=lambda item: item[1][0])
                changed[partition] = [(key, cards[key], ts) for key, (_, ts) in order]
        return changed, letters

    def _on_transaction(self, cards: dict[bytes, CardHistory],
                        marks: dict[bytes, tuple[int, int]], record: Record,
                        max_bytes: int) -> None:
        txn, _ = validate_record(record.value, Transaction, max_bytes=max_bytes)
        if txn is None:  # dead-lettered by the fraud lane
            self.stats.skipped_invalid += 1
            return
        key = txn["card_id"].encode()
        current = cards.get(key)
        state = apply_transaction(current, txn, record.offset)
        if state is None:
            self.stats.redelivered += 1
            return
        cards[key] = state
        sent_at = txn.get("sent_at")
        marks[key] = (record.offset, int(sent_at * 1000) if sent_at else record.timestamp)
        if current is not None and is_retry(current, txn):
            self.stats.retried += 1
        else:
            self.stats.transactions += 1

    def _on_label(self, cards: dict[bytes, CardHistory], marks: dict[bytes, tuple[int, int]],
                  record: Record, max_bytes: int) -> bytes | None:
        label, rejection = validate_record(record.value, FraudLabel, max_bytes=max_bytes)
        if label is None:
            self.stats.labels_dead_lettered += 1
            assert rejection is not None  # noqa: S101 - validate_record returns one of the two
            return dead_letter(record.value, error=rejection.error, reason=rejection.reason,
                               topic=record.topic, partition=record.partition,
                               offset=record.offset, lane="history")
        key = label["card_id"].encode()
        current = cards.get(key)
        state = apply_label(current, label, record.offset)
        if state is None:
            self.stats.redelivered += 1
            return None
        cards[key] = state
        if key not in marks:  # keeps the transaction's place and timestamp when there is one
            marks[key] = (state.src_offset, record.timestamp)
        self.stats.labels += 1
        return None


def register(app: faust.App, settings: Settings) -> LaneSupervisor | None:
    """Attach the history lane to ``app`` when ``INFERLANE_LANES`` includes it (off the latency
    path: restarted in-process after a crash; the fraud lane meanwhile counts stale history)."""
    if LANE not in settings.lanes:
        return None
    return attach_lane(app, settings, LANE, lambda: Lane(
        settings, LANE, HistoryHandler(settings),
        consumer_overrides={"partition_assignment_strategy": (RangePartitionAssignor,)}),
        realtime=False)
