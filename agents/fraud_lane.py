"""Fraud real-time lane: ``fraud.requests`` -> INT8 model -> ``fraud.scores`` (+ DLQ)."""

from __future__ import annotations

from typing import cast

import faust

from pipeline.fraud import FraudHandler
from pipeline.lane import Lane
from pipeline.settings import Settings

LANE = "fraud"


def register(app: faust.App, settings: Settings) -> Lane | None:
    """Attach the fraud lane to ``app`` when ``INFERLANE_LANES`` includes it."""
    if LANE not in settings.lanes:
        return None
    lane = Lane(settings, LANE, FraudHandler(settings))
    app.service(cast(type[Lane], lane))  # faust also accepts a Service instance
    return lane
