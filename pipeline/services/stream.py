"""A service's view of a result topic: a :class:`~pipeline.kafka.lane.Lane` in the service's own
consumer group feeding each result to a callback, and a bounded store for what it keeps.

The lane gives the services what it gives the workers: static membership, idle-fetch backoff on
the local broker, commits only of finished records, no commit during a rebalance. Results are
applied in partition order; what the store keeps lives in memory, so a restarted service starts
empty and fills up from its group's committed offsets on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import orjson
from aiokafka import TopicPartition

from pipeline.kafka.lane import Lane, LaneContext, PartitionRecords
from pipeline.settings import Settings

__all__ = ["BoundedStore", "ResultFollower", "follow_results"]

log = logging.getLogger(__name__)

V = TypeVar("V")


class BoundedStore(Generic[V]):
    """A dict with at most ``max_entries`` keys; putting a key makes it the newest, and the
    least recently put key is evicted when full. Reads do not reorder (the store answers "the
    latest per key", not a cache of what was read)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[str, V] = OrderedDict()
        self.evicted = 0

    def put(self, key: str, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evicted += 1

    def get(self, key: str) -> V | None:
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data


class ResultFollower:
    """Lane handler: parse every record of ``topic`` as a JSON object and pass it to
    ``on_result``; records that are not JSON objects are counted and skipped (a result topic
    only carries what the pipeline wrote, so this is a bug elsewhere, not input to dead-letter).
    """

    def __init__(self, topic: str, on_result: Callable[[dict[str, Any]], None]) -> None:
        self._topic = topic
        self._on_result = on_result
        self._ctx: LaneContext | None = None
        self.unreadable = 0

    @property
    def topics(self) -> Sequence[str]:
        return (self._topic,)

    async def start(self, ctx: LaneContext) -> None:
        self._ctx = ctx

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        assert self._ctx is not None  # noqa: S101 - set in start()
        for part in batch:
            for record in part.records:
                try:
                    value = orjson.loads(record.value or b"null")
                except orjson.JSONDecodeError:
                    value = None
                if isinstance(value, dict):
                    self._on_result(value)
                else:
                    self.unreadable += 1
            self._ctx.done(part.chunk)

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        return None

    async def stop(self) -> None:
        return None


def follow_results(settings: Settings, name: str, topic: str,
                   on_result: Callable[[dict[str, Any]], None]) -> Lane:
    """A lane named ``name`` (group ``<app_id>-<name>``, member ``<worker_id>-<name>``) that
    feeds the results of logical ``topic`` to ``on_result``; start it with ``await .start()``.
    The caller ensures the topic exists (a service does, with its other topics, in one go)."""
    return Lane(settings, name, ResultFollower(settings.topic(topic), on_result), topics=())
