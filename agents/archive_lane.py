"""Archive lane: result topics -> S3 (windowed gzip JSONL), in its own consumer group."""

from __future__ import annotations

from typing import cast

import faust

from pipeline.archive import ArchiveHandler
from pipeline.lane import Lane
from pipeline.settings import Settings

LANE = "archive"


def register(app: faust.App, settings: Settings) -> Lane | None:
    """Attach the archive lane to ``app`` when ``INFERLANE_LANES`` includes it."""
    if LANE not in settings.lanes:
        return None
    # Windows hold up to archive_max_bytes per partition until written: let that much be read.
    lane = Lane(settings, LANE, ArchiveHandler(settings),
                max_in_flight_records=max(settings.max_in_flight_records, 500_000))
    app.service(cast(type[Lane], lane))  # faust also accepts a Service instance
    return lane
