"""Which offsets may be committed: only those whose every record has been fully handled.

Records are tracked per fetched *chunk* (a contiguous offset range of one partition), in fetch
order. A chunk is done when its results and dead letters are acknowledged by the broker. The
commit position of a partition is the end of the leading run of done chunks: an offset is never
committed past a record still in flight, however the chunks complete (faust #606 is the
counter-example this exists to avoid).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aiokafka import TopicPartition

__all__ = ["Chunk", "OffsetTracker"]


@dataclass(eq=False)
class Chunk:
    """Offsets ``first..last`` (inclusive) of one partition, fetched together."""

    tp: TopicPartition
    first: int
    last: int
    done: bool = False

    @property
    def size(self) -> int:
        return self.last - self.first + 1


class OffsetTracker:
    """Per-partition queues of chunks; yields the offsets safe to commit."""

    def __init__(self) -> None:
        self._chunks: dict[TopicPartition, deque[Chunk]] = {}
        self._position: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._in_flight = 0

    def add(self, tp: TopicPartition, first: int, last: int) -> Chunk:
        """Register a fetched range (must follow the previous one of the partition)."""
        if last < first:
            raise ValueError(f"empty chunk {tp} {first}..{last}")
        chunk = Chunk(tp, first, last)
        self._in_flight += chunk.size
        self._chunks.setdefault(tp, deque()).append(chunk)
        return chunk

    def done(self, chunk: Chunk) -> None:
        """Mark a chunk handled and advance its partition's commit position if it can."""
        if chunk.done:
            return
        chunk.done = True
        self._in_flight -= chunk.size
        queue = self._chunks.get(chunk.tp)
        if queue is None:
            return  # partition revoked meanwhile: its new owner commits
        while queue and queue[0].done:
            self._position[chunk.tp] = queue.popleft().last + 1

    @property
    def total_in_flight(self) -> int:
        """Records fetched but not yet done, over every partition ever added."""
        return self._in_flight

    def in_flight(self, tps: set[TopicPartition]) -> int:
        """Records fetched but not yet done, for the given (still tracked) partitions."""
        return sum(
            c.size for tp, q in self._chunks.items() if tp in tps
            for c in q if not c.done
        )

    def committable(self, tps: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Positions that advanced since the last :meth:`committed` call."""
        return {
            tp: pos for tp, pos in self._position.items()
            if (tps is None or tp in tps) and self._committed.get(tp) != pos
        }

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record that ``offsets`` were committed to the broker."""
        self._committed.update(offsets)

    def position(self, tp: TopicPartition) -> int | None:
        """The partition's finished position (next offset to process), if any was reached."""
        return self._position.get(tp)

    def resume(self, tp: TopicPartition, position: int) -> None:
        """Start tracking ``tp`` at a position finished earlier, to be committed again."""
        self._chunks[tp] = deque()
        self._position[tp] = position
        self._committed.pop(tp, None)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop revoked partitions: late completions for them no longer count."""
        for tp in tps:
            for chunk in self._chunks.pop(tp, ()):
                if not chunk.done:
                    # Count it out of flight now; a late done() for it is then a no-op.
                    chunk.done = True
                    self._in_flight -= chunk.size
            self._position.pop(tp, None)
            self._committed.pop(tp, None)
