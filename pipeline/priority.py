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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["REALTIME_GATE", "RealtimeGate"]


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

    @contextmanager
    def realtime(self) -> Iterator[None]:
        """Mark real-time work in progress for the duration of the block."""
        with self._lock:
            self._pending += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1
                self._last_active = time.monotonic()
                if self._pending == 0:
                    self._idle.set()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def recently_active(self, window_s: float = 0.1) -> bool:
        """Whether real-time work ran within the last ``window_s`` (traffic is flowing)."""
        return self.busy or time.monotonic() - self._last_active < window_s

    def checkpoint(self) -> None:
        """Called by batch work between slices: wait while real-time work is pending."""
        if not self._idle.is_set():
            self.pauses += 1
            self._idle.wait(self.max_pause_s)


#: The gate shared by every lane of this process.
REALTIME_GATE = RealtimeGate()
