"""Batch lane: ``batch.jobs`` planned into chunks, ``batch.chunks`` scored S3 -> S3, and
``batch.requests`` records scored in big windows to S3."""

from __future__ import annotations

from typing import cast

import faust

from pipeline.batchjobs import ChunkScorer, JobPlanner
from pipeline.batchrecords import RecordBatchWriter
from pipeline.lane import Lane
from pipeline.settings import Settings

LANE = "batch"


def register(app: faust.App, settings: Settings) -> list[Lane]:
    """Attach the job planner and the chunk scorer when ``INFERLANE_LANES`` includes batch."""
    if LANE not in settings.lanes:
        return []
    lanes = [
        Lane(settings, "batch-plan", JobPlanner(settings)),
        # One chunk at a time per worker: a chunk is seconds of CPU; the other chunks stay on
        # the topic for the other workers of the group.
        Lane(settings, LANE, ChunkScorer(settings), max_in_flight_records=1,
             max_records_per_fetch=1),
        # Windows hold up to batch_window_bytes per partition until written.
        Lane(settings, "batch-records", RecordBatchWriter(settings),
             max_in_flight_records=max(settings.max_in_flight_records, 200_000)),
    ]
    for lane in lanes:
        app.service(cast(type[Lane], lane))  # faust also accepts a Service instance
    return lanes
