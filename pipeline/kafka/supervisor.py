"""What a lane crash does to its worker.

A lane crashes when its handler raises: not bad input (that is a dead letter) but a failure the
lane cannot get past without losing work, so it stops without committing it (see
:mod:`pipeline.kafka.lane`). Two policies, by where the lane sits (docs/design.md, "When a lane
crashes"):

* a **real-time** lane (fraud, reco) ends the worker: the last log line names the lane and the
  cause, the exit code is :data:`~pipeline.errors.EXIT_LANE_CRASHED`, and the supervisor
  (systemd, Kubernetes, compose ``restart:``) starts a fresh process from the committed offsets.
  Retrying in-process would hide a broken latency path behind a live process.
* a lane **off the latency path** (history, archive, batch) is restarted in the process with a
  bounded exponential backoff (1 s doubling to 30 s; reset once a run lasted a minute), so that
  an S3 bucket that vanished or a slow-path bug never stops the scoring. While it restarts it is
  shown as not ready: ``GET /health`` answers 503 naming it, ``inferlane_lane_up{lane}`` is 0 and
  ``inferlane_lane_restarts_total{lane,error}`` counts the restarts.

A failure while a lane *first* starts (a start check, a model that does not load) is neither: it
propagates and the worker exits before consuming anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mode import Service

from pipeline.kafka.lane import Lane
from pipeline.metrics import LANE_RESTARTS, LANE_UP

__all__ = ["LaneState", "LaneSupervisor", "lane_states"]

log = logging.getLogger(__name__)

_SUPERVISED: dict[str, LaneSupervisor] = {}


@dataclass(frozen=True)
class LaneState:
    """One lane as the health endpoint shows it."""

    lane: str
    up: bool
    realtime: bool
    restarts: int
    last_error: str | None
    next_attempt_in_s: float | None


def lane_states() -> list[LaneState]:
    """Every supervised lane of this process (the worker's ``/health``)."""
    return [sup.lane_state for sup in _SUPERVISED.values()]


class LaneSupervisor(Service):  # type: ignore[misc]
    """Run one lane built by ``factory``; on a crash end the worker (``realtime``) or build a
    new lane and start it again after a backoff."""

    min_backoff_s = 1.0
    max_backoff_s = 30.0
    stable_s = 60.0
    """A lane that ran this long before crashing restarts after ``min_backoff_s`` again."""
    stop_timeout_s = 20.0

    def __init__(self, name: str, factory: Callable[[], Lane], *, realtime: bool,
                 on_fatal: Callable[[str, BaseException], Awaitable[None]]) -> None:
        super().__init__()
        self.name = name
        self.factory = factory
        self.realtime = realtime
        self.on_fatal = on_fatal
        self.lane: Lane | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self._backoff_s = self.min_backoff_s
        self._started_at = 0.0
        self._next_at: float | None = None
        self._restarter: asyncio.Task[None] | None = None
        self._stopping = False
        self._fatal = False

    @property
    def label(self) -> str:
        return f"LaneSupervisor[{self.name}]"

    @property
    def lane_state(self) -> LaneState:
        up = self._restarter is None and self.lane is not None
        next_in = None if self._next_at is None else max(self._next_at - time.monotonic(), 0.0)
        return LaneState(self.name, up, self.realtime, self.restarts, self.last_error,
                         None if next_in is None else round(next_in, 1))

    async def on_start(self) -> None:
        _SUPERVISED[self.name] = self
        await self._start_lane()  # a first-start failure propagates: the worker exits

    async def on_stop(self) -> None:
        self._stopping = True
        if self._restarter is not None:
            self._restarter.cancel()
            await asyncio.gather(self._restarter, return_exceptions=True)
        if self.lane is not None:
            await self.lane.stop()
        _SUPERVISED.pop(self.name, None)

    async def _start_lane(self) -> None:
        lane = self.factory()
        lane.on_crash = self._on_lane_crash
        self.lane = lane
        await lane.start()
        self._started_at = time.monotonic()
        LANE_UP.labels(self.name).set(1)

    def _on_lane_crash(self, lane: Lane, exc: BaseException) -> None:
        if self._stopping or lane is not self.lane or self._restarter is not None:
            return
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        LANE_UP.labels(self.name).set(0)
        if self.realtime:
            if not self._fatal:
                self._fatal = True
                asyncio.ensure_future(self.on_fatal(self.name, exc))
            return
        self._restarter = asyncio.create_task(self._restart(lane, exc), name=self.label)

    async def _restart(self, crashed: Lane, exc: BaseException) -> None:
        if time.monotonic() - self._started_at >= self.stable_s:
            self._backoff_s = self.min_backoff_s
        await self._stop_quietly(crashed)
        self.lane = None
        error = type(exc).__name__
        while not self._stopping:
            self.restarts += 1
            LANE_RESTARTS.labels(self.name, error).inc()
            delay = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
            log.error("%s: lane crashed (%s); it is off the latency path, so the worker goes "
                      "on without it: restart %d in %.0fs (GET /health shows it not ready)",
                      self.label, self.last_error, self.restarts, delay)
            self._next_at = time.monotonic() + delay
            await asyncio.sleep(delay)
            self._next_at = None
            try:
                await self._start_lane()
            except Exception as again:  # noqa: BLE001 - any start failure is retried
                self.last_error = f"{type(again).__name__}: {again}"[:300]
                error = type(again).__name__
                failed, self.lane = self.lane, None
                if failed is not None:
                    await self._stop_quietly(failed)
                continue
            log.info("%s: lane restarted after %d attempt(s)", self.label, self.restarts)
            break
        self._restarter = None

    async def _stop_quietly(self, lane: Lane) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(lane.stop(), self.stop_timeout_s)
