"""Process-level tuning of a worker, applied once when the faust app module is imported.

* event loop: uvloop (libuv) instead of the default asyncio loop, unless
  ``INFERLANE_EVENT_LOOP=asyncio``; it cuts the per-callback cost of the consume/produce loop;
* GIL switch interval: 1 ms instead of 5 ms when a real-time lane shares the process with the
  batch lane, whose scoring thread would otherwise hold the GIL for up to 5 ms at a time;
* garbage collector: everything imported at start-up (faust, onnxruntime, numpy: ~10^5
  objects) is moved to the permanent generation with :func:`gc.freeze`, and generation 0 is
  collected less often, so full collections do not walk the framework's heap on the hot path.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from pipeline.settings import Settings

__all__ = ["tune_process"]

log = logging.getLogger(__name__)


def tune_process(settings: Settings) -> None:
    """Install the event-loop policy and GC settings chosen by ``settings``."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
            log.warning("uvloop not installed; using the default asyncio loop")
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if "batch" in settings.lanes and len(settings.lanes) > 1:
        sys.setswitchinterval(0.001)
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(50_000, gen1, gen2)
