"""Reco real-time lane: ``reco.requests`` -> INT8 top-k graph -> ``reco.results`` (+ DLQ)."""

from __future__ import annotations

from typing import cast

import faust

from pipeline.lane import Lane
from pipeline.recolane import RecoHandler
from pipeline.settings import Settings

LANE = "reco"


def register(app: faust.App, settings: Settings) -> Lane | None:
    """Attach the reco lane to ``app`` when ``INFERLANE_LANES`` includes it."""
    if LANE not in settings.lanes:
        return None
    lane = Lane(settings, LANE, RecoHandler(settings))
    app.service(cast(type[Lane], lane))  # faust also accepts a Service instance
    return lane
