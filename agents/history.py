"""The slow path: a faust agent that keeps every card's history in a changelogged faust Table.

It reads ``fraud.requests`` and ``fraud.labels`` (both keyed by ``card_id``, same partition
count) as one co-partitioned stream and applies each valid transaction / label to the card's
:class:`~pipeline.features.cardhistory.CardHistory` (pure transitions in
:mod:`pipeline.features.cardhistory`). faust writes every update to the table's changelog
(``fraud.history.changelog``, compacted on Apache Kafka), recovers the table from it after a
restart or a rebalance, and the fraud lane's :class:`~pipeline.features.historyview.HistoryView`
tails the same changelog for its snapshots.

Idempotent updates. faust delivers at least once (a crash or a rebalance redelivers what was
not committed yet). Each card's state keeps the highest offset it has applied from each input
topic (``src_offset``, ``label_offset``), so a redelivered record is recognised and skipped
instead of being counted twice. (A card's records always arrive on the same partition, so the
per-card offsets are comparable.)

Producer retries. A producer that retries a send can write the same transaction twice, at two
offsets. ``event_id`` is unique per transaction, so a transaction whose ``event_id`` is the
card's newest one (``last_event_id``) is such a copy: it only moves the card's ``src_offset``
and is not counted again. (A copy that arrives after another transaction of the same card is
not recognised and counts twice; producers retry within milliseconds, so that is rare.) The
fraud lane scores every copy again: scores are keyed by ``event_id`` and readers keep one.

Invalid records: a transaction the fraud lane will dead-letter is skipped here (the lane
reports it); an invalid label goes to ``fraud.labels.dlq`` with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faust
import msgspec
from faust.types import TableT

from pipeline.features.cardhistory import (
    CardHistory,
    from_bytes,
    to_bytes,
    update_with_label,
    update_with_transaction,
)
from pipeline.features.historyview import CHANGELOG, TABLE_NAME
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.topics import spec, topic_configs
from pipeline.settings import Settings
from schemas import FraudLabel, Transaction, validate_record

__all__ = [
    "HistoryStats",
    "HistoryTable",
    "apply_label",
    "apply_transaction",
    "attach_history_agent",
    "is_retry",
]

LANE = "history"

log = logging.getLogger(__name__)

#: card_id (UTF-8) -> :func:`pipeline.features.cardhistory.to_bytes` of its state.
HistoryTable = TableT[bytes, bytes]


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


def attach_history_agent(app: faust.App, settings: Settings) -> tuple[HistoryTable, HistoryStats]:
    """Declare the history table and its agent on ``app``; return the table and its counters."""
    partitions = settings.realtime_partitions
    requests = settings.topic("fraud.requests")
    labels = settings.topic("fraud.labels")
    labels_dlq = app.topic(settings.topic("fraud.labels.dlq"), value_serializer="raw",
                           key_serializer="raw")
    # internal=True: faust creates what is missing itself, with the layout pipeline.kafka.topics
    # uses.
    source = app.topic(requests, labels, partitions=partitions, internal=True,
                       config=topic_configs(spec("fraud.requests"), settings),
                       key_serializer="raw", value_serializer="raw")
    changelog_spec = spec(CHANGELOG)
    changelog = app.topic(settings.topic(CHANGELOG), partitions=partitions, internal=True,
                          compacting=changelog_spec.compact,
                          config=topic_configs(changelog_spec, settings),
                          key_serializer="raw", value_serializer="raw")
    # Keys and values stay bytes: the app's serializers are "raw" (see pipeline.kafka.faustapp).
    table: HistoryTable = app.Table(TABLE_NAME, partitions=partitions, changelog_topic=changelog,
                                    help="per-card history for the fraud model")
    stats = HistoryStats()
    max_bytes = settings.max_message_bytes

    async def history(stream: faust.StreamT[bytes]) -> None:
        try:
            async for event in stream.events():
                message = event.message
                if message.topic == requests:
                    _on_transaction(table, stats, message.value, message.offset, max_bytes)
                else:
                    letter = _on_label(table, stats, message, max_bytes)
                    if letter is not None:
                        await labels_dlq.send(key=message.key, value=letter)
        finally:
            log.info("history agent: %s, table holds %d cards", stats, len(table))

    app.agent(source, name="history")(history)

    async def history_stats() -> None:
        log.info("history agent: %s, table holds %d cards", stats, len(table))

    app.timer(interval=10.0)(history_stats)

    return table, stats


def _on_transaction(table: HistoryTable, stats: HistoryStats, value: bytes | None,
                    offset: int, max_bytes: int) -> None:
    txn, _ = validate_record(value, Transaction, max_bytes=max_bytes)
    if txn is None:  # dead-lettered by the fraud lane
        stats.skipped_invalid += 1
        return
    key = txn["card_id"].encode()
    current = _current(table, key)
    state = apply_transaction(current, txn, offset)
    if state is None:
        stats.redelivered += 1
        return
    table[key] = to_bytes(state)
    if current is not None and is_retry(current, txn):
        stats.retried += 1
    else:
        stats.transactions += 1


def _on_label(table: HistoryTable, stats: HistoryStats, message: Any,
              max_bytes: int) -> bytes | None:
    label, rejection = validate_record(message.value, FraudLabel, max_bytes=max_bytes)
    if label is None:
        stats.labels_dead_lettered += 1
        assert rejection is not None  # noqa: S101 - validate_record returns one of the two
        return dead_letter(message.value, error=rejection.error, reason=rejection.reason,
                           topic=message.topic, partition=message.partition,
                           offset=message.offset, lane="history")
    key = label["card_id"].encode()
    state = apply_label(_current(table, key), label, message.offset)
    if state is None:
        stats.redelivered += 1
        return None
    table[key] = to_bytes(state)
    stats.labels += 1
    return None


def _current(table: HistoryTable, key: bytes) -> CardHistory | None:
    raw = table.get(key)
    if raw is None:
        return None
    try:
        return from_bytes(raw)
    except ValueError:
        log.exception("history agent: unreadable state for card %r; starting it afresh", key)
        return None


def register(app: faust.App, settings: Settings) -> HistoryTable | None:
    """Attach the history agent and table to ``app`` when ``INFERLANE_LANES`` includes it."""
    if LANE not in settings.lanes:
        return None
    table, _ = attach_history_agent(app, settings)
    return table
