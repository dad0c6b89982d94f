"""Unit tests for pipeline.kafka.offsets.OffsetTracker."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from pipeline.kafka.offsets import Chunk, OffsetTracker

TP0 = TopicPartition("fraud.requests", 0)
TP1 = TopicPartition("fraud.requests", 1)
OTHER = TopicPartition("fraud.scores", 0)


def test_chunk_size_is_inclusive() -> None:
    tracker = OffsetTracker()
    chunk = tracker.add(TP0, 10, 19)
    assert isinstance(chunk, Chunk)
    assert (chunk.tp, chunk.first, chunk.last, chunk.done) == (TP0, 10, 19, False)
    assert chunk.size == 10
    assert tracker.add(TP0, 20, 20).size == 1


@pytest.mark.parametrize(("first", "last"), [(5, 4), (0, -1), (100, 0)])
def test_add_rejects_empty_ranges(first: int, last: int) -> None:
    tracker = OffsetTracker()
    with pytest.raises(ValueError, match="empty chunk"):
        tracker.add(TP0, first, last)
    assert tracker.total_in_flight == 0
    assert tracker.in_flight({TP0}) == 0


def test_nothing_committable_before_any_done() -> None:
    tracker = OffsetTracker()
    tracker.add(TP0, 0, 9)
    assert tracker.committable() == {}


def test_position_advances_over_leading_done_run_only() -> None:
    tracker = OffsetTracker()
    c1 = tracker.add(TP0, 0, 9)
    c2 = tracker.add(TP0, 10, 14)
    c3 = tracker.add(TP0, 15, 29)
    tracker.done(c2)  # out of order: chunk 1 still in flight
    assert tracker.committable() == {}
    tracker.done(c1)
    assert tracker.committable() == {TP0: 15}  # chunk2.last + 1
    tracker.done(c3)
    assert tracker.committable() == {TP0: 30}


def test_position_stops_before_the_first_unfinished_chunk() -> None:
    tracker = OffsetTracker()
    chunks = [tracker.add(TP0, 10 * i, 10 * i + 9) for i in range(5)]
    for i in (0, 1, 3, 4):
        tracker.done(chunks[i])
    assert tracker.committable() == {TP0: 20}
    tracker.done(chunks[2])
    assert tracker.committable() == {TP0: 50}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 4)
    b1 = tracker.add(TP1, 100, 199)
    a2 = tracker.add(TP0, 5, 9)
    o1 = tracker.add(OTHER, 7, 7)
    tracker.done(a2)
    tracker.done(b1)
    assert tracker.committable() == {TP1: 200}
    tracker.done(o1)
    assert tracker.committable() == {TP1: 200, OTHER: 8}
    tracker.done(a1)
    assert tracker.committable() == {TP0: 10, TP1: 200, OTHER: 8}
    assert tracker.committable({TP0}) == {TP0: 10}
    assert tracker.committable({TP1, OTHER}) == {TP1: 200, OTHER: 8}
    assert tracker.committable(set()) == {}


def test_committable_returns_only_positions_changed_since_committed() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)
    b1 = tracker.add(TP1, 0, 4)
    a2 = tracker.add(TP0, 10, 19)
    tracker.done(a1)
    tracker.done(b1)
    offsets = tracker.committable()
    assert offsets == {TP0: 10, TP1: 5}
    assert tracker.committable() == offsets  # not consumed by reading
    tracker.committed(offsets)
    assert tracker.committable() == {}
    tracker.done(a2)
    assert tracker.committable() == {TP0: 20}
    tracker.committed({TP0: 20})
    assert tracker.committable() == {}


def test_committed_with_a_stale_position_keeps_the_new_one_committable() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)
    a2 = tracker.add(TP0, 10, 19)
    tracker.done(a1)
    snapshot = tracker.committable()
    tracker.done(a2)  # advances while the commit of `snapshot` is in flight
    tracker.committed(snapshot)
    assert tracker.committable() == {TP0: 20}


def test_in_flight_counts() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)  # 10
    a2 = tracker.add(TP0, 10, 14)  # 5
    b1 = tracker.add(TP1, 0, 99)  # 100
    assert tracker.total_in_flight == 115
    assert tracker.in_flight({TP0}) == 15
    assert tracker.in_flight({TP1}) == 100
    assert tracker.in_flight({TP0, TP1}) == 115
    assert tracker.in_flight({OTHER}) == 0
    assert tracker.in_flight(set()) == 0
    tracker.done(a2)  # done but not yet at the head of its queue
    assert tracker.total_in_flight == 110
    assert tracker.in_flight({TP0}) == 10
    tracker.done(a1)
    tracker.done(b1)
    assert tracker.total_in_flight == 0
    assert tracker.in_flight({TP0, TP1}) == 0


def test_done_twice_is_a_no_op() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)
    a2 = tracker.add(TP0, 10, 19)
    tracker.done(a2)
    tracker.done(a2)
    assert tracker.total_in_flight == 10
    assert tracker.committable() == {}
    tracker.done(a1)
    tracker.done(a1)
    assert tracker.total_in_flight == 0
    assert tracker.committable() == {TP0: 20}


def test_forget_drops_partition_and_its_in_flight_records() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)
    a2 = tracker.add(TP0, 10, 19)
    a3 = tracker.add(TP0, 20, 29)
    b1 = tracker.add(TP1, 0, 4)
    tracker.done(a1)  # TP0 position 10
    tracker.done(a3)  # done, but behind the unfinished a2
    tracker.done(b1)
    tracker.committed({TP0: 10})
    assert tracker.total_in_flight == 10

    tracker.forget({TP0})
    assert tracker.total_in_flight == 0  # a2's 10 records no longer count
    assert tracker.in_flight({TP0}) == 0
    assert tracker.committable() == {TP1: 5}
    assert tracker.committable({TP0}) == {}

    tracker.done(a2)  # late completion of a forgotten chunk
    assert tracker.total_in_flight == 0
    assert tracker.committable() == {TP1: 5}


def test_forget_unknown_partition_is_harmless() -> None:
    tracker = OffsetTracker()
    b1 = tracker.add(TP1, 0, 4)
    tracker.forget({TP0, OTHER})
    assert tracker.total_in_flight == 5
    tracker.done(b1)
    assert tracker.committable() == {TP1: 5}


def test_partition_reassigned_after_forget_starts_fresh() -> None:
    tracker = OffsetTracker()
    old = tracker.add(TP0, 0, 9)
    done_old = tracker.add(TP0, 10, 19)
    tracker.done(done_old)
    tracker.forget({TP0})
    new = tracker.add(TP0, 50, 59)  # assigned back, resumes from the group's committed offset
    tracker.done(old)  # late completion from the previous assignment
    assert tracker.total_in_flight == 10
    assert tracker.in_flight({TP0}) == 10
    assert tracker.committable() == {}
    tracker.done(new)
    assert tracker.committable() == {TP0: 60}
    assert tracker.total_in_flight == 0


def test_forget_clears_committed_memory() -> None:
    tracker = OffsetTracker()
    a1 = tracker.add(TP0, 0, 9)
    tracker.done(a1)
    tracker.committed({TP0: 10})
    tracker.forget({TP0})
    again = tracker.add(TP0, 0, 9)  # re-read from 0 (e.g. the commit was lost)
    tracker.done(again)
    assert tracker.committable() == {TP0: 10}
