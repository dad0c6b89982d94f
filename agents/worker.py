"""The worker's faust app, ``faust -A agents worker -l info``: imported on the first access to
``agents.app`` or ``agents.settings``.

Settings come from the environment (``INFERLANE_*``, see README). The worker serves the lanes
named in ``INFERLANE_LANES`` (default: all); each lane module registers itself, after the start
checks (:mod:`agents.startchecks`).
"""

from __future__ import annotations

from typing import cast

from agents import archive, batch, fraud, history, reco
from agents.startchecks import StartChecks
from pipeline.kafka.faustapp import create_app
from pipeline.kafka.process import tune_process
from pipeline.settings import load_settings

__all__ = ["app", "settings"]

settings = load_settings()
app = create_app(settings)

# First: faust starts services in registration order, so no lane starts when a check fails.
app.service(cast(type[StartChecks], StartChecks(settings)))
fraud.register(app, settings)
reco.register(app, settings)
history.register(app, settings)
archive.register(app, settings)
batch.register(app, settings)
tune_process(settings)
