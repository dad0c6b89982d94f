"""Batch lane: ``batch.jobs`` planned into chunks (:mod:`agents.batch.batchjobs`), ``batch.chunks``
scored S3 -> S3 in worker processes (:mod:`agents.batch.chunkrun`), and ``batch.requests`` records
scored in big windows to S3 (:mod:`agents.batch.batchrecords`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import faust

    from pipeline.kafka.lane import Lane
    from pipeline.kafka.supervisor import LaneSupervisor
    from pipeline.settings import Settings

__all__ = ["LANE", "register"]

LANE = "batch"


def register(app: faust.App, settings: Settings) -> list[LaneSupervisor]:
    """Attach the job planner, the chunk scorer and the record-window writer when
    ``INFERLANE_LANES`` includes batch."""
    # Imported here: the chunk processes import agents.batch.chunkrun, not the whole lane.
    from agents.batch.batchjobs import ChunkScorer, JobPlanner
    from agents.batch.batchrecords import RecordBatchWriter
    from pipeline.kafka.faustapp import attach_lane
    from pipeline.kafka.lane import Lane

    if LANE not in settings.lanes:
        return []
    # Off the latency path: each is restarted in-process after a crash.
    factories: list[tuple[str, Callable[[], Lane]]] = [
        ("batch-plan", lambda: Lane(settings, "batch-plan", JobPlanner(settings))),
        # One chunk at a time per worker: a chunk is seconds of CPU; the other chunks stay on
        # the topic for the other workers of the group.
        (LANE, lambda: Lane(settings, LANE, ChunkScorer(settings), max_in_flight_records=1,
                            max_records_per_fetch=1)),
        # Windows hold up to batch_window_bytes per partition until written.
        ("batch-records", lambda: Lane(
            settings, "batch-records", RecordBatchWriter(settings),
            max_in_flight_records=max(settings.max_in_flight_records, 200_000))),
    ]
    return [attach_lane(app, settings, name, factory, realtime=False)
            for name, factory in factories]
