"""Fraud history slow path: ``fraud.requests`` + ``fraud.labels`` -> per-card history table."""

from __future__ import annotations

import faust

from pipeline.historyagent import HistoryTable, attach_history_agent
from pipeline.settings import Settings

LANE = "history"


def register(app: faust.App, settings: Settings) -> HistoryTable | None:
    """Attach the history agent and table to ``app`` when ``INFERLANE_LANES`` includes it."""
    if LANE not in settings.lanes:
        return None
    table, _ = attach_history_agent(app, settings)
    return table
