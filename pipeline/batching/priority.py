"""Real-time work first: when one worker runs both a real-time lane and the batch lane, batch
scoring yields to pending real-time work.

Real-time handlers bracket their work with :meth:`RealtimeGate.realtime` (on the event loop).
The batch lane scores in a worker thread and calls :meth:`RealtimeGate.checkpoint` between
slices of rows: while real-time work is pending it waits (releasing the GIL, so the loop runs
unhindered) up to ``max_pause_s`` per checkpoint, then continues with one more slice, so a
steady real-time load slows the batch lane down but never starves it. On two cores the batch
lane's CPU (its scoring process, and the S3 server it reads) also competes with the real-time
path at the OS level, so while real-time traffic flows (:meth:`recently_active`) the batch lane
also rests ``INFERLANE_BATCH_YIELD_RATIO`` times as long as each slice took.

When the batch lane scores in a child process (:mod:`agents.batch.chunkrun`), the worker's gate
publishes its state in shared memory (:meth:`RealtimeGate.share`) and the child's gate reads it
(:meth:`RealtimeGate.attach`): the same checkpoints and rests apply across the process boundary.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeAlias

__all__ = ["REALTIME_GATE", "RealtimeGate", "SharedGateState"]

SharedGateState: TypeAlias = "ctypes.Array[ctypes.c_double]"
"""Shared memory of a gate: ``[pending real-time work, monotonic time it last ended]``."""
_POLL_S = 0.001


class RealtimeGate:
    """Counts real-time work in progress; batch threads wait at checkpoints while it is > 0."""

    def __init__(self, max_pause_s: float = 0.02) -> None:
        self.max_pause_s = max_pause_s
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.pauses = 0
        """How many checkpoints had to wait (for metrics and the benchmark)."""
        self._last_active = float("-inf")
        self._shared: SharedGateState | None = None
        self._remote = False
        """True in a child process whose gate mirrors the worker's (reads shared memory)."""

    def share(self) -> SharedGateState:
        """Publish this gate's state in shared memory, for a child process to :meth:`attach`."""
        if self._shared is None:
            shared = multiprocessing.get_context("spawn").RawArray(ctypes.c_double, 2)
            shared[0], shared[1] = float(self._pending), -1e18
            self._shared = shared
        return self._shared

    def attach(self, shared: SharedGateState) -> None:
        """In a child process: follow the parent gate whose :meth:`share` gave ``shared``."""
        self._shared, self._remote = shared, True

    @contextmanager
    def realtime(self) -> Iterator[None]:
        """Mark real-time work in progress for the duration of the block."""
        with self._lock:
            self._pending += 1
            self._idle.clear()
            self._publish()
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1
                self._last_active = time.monotonic()
                if self._pending == 0:
                    self._idle.set()
                self._publish()

    def _publish(self) -> None:
        # CLOCK_MONOTONIC is system-wide on Linux, so the child can compare it with its own.
        if self._shared is not None and not self._remote:
            self._shared[0], self._shared[1] = float(self._pending), self._last_active

    @property
    def busy(self) -> bool:
        if self._remote and self._shared is not None:
            return self._shared[0] > 0
        return not self._idle.is_set()

    def recently_active(self, window_s: float = 0.1) -> bool:
        """Whether real-time work ran within the last ``window_s`` (traffic is flowing)."""
        last = self._shared[1] if self._remote and self._shared is not None else self._last_active
        return self.busy or time.monotonic() - last < window_s

    def checkpoint(self) -> None:
        """Called by batch work between slices: wait while real-time work is pending."""
        if not self.busy:
            return
        self.pauses += 1
        if not self._remote:
            self._idle.wait(self.max_pause_s)
            return
        deadline = time.monotonic() + self.max_pause_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(_POLL_S)


#: The gate shared by every lane of this process.
REALTIME_GATE = RealtimeGate()
