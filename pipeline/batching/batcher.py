"""The micro-batcher: the one place where rows from many Kafka fetches meet the model.

Callers ``await batcher.submit(rows)`` with a 2-D matrix (feature rows, or e.g. id rows of any
dtype) and get back exactly one output per row, in order (outputs may be any array whose first
axis is the row: scores, or a structured top-k row per request). A single runner task forms
batches with these rules:

* **greedy**: when a model slot is free and anything waits, flush at once (a lone event under low
  load is scored immediately; it never waits for a timer);
* **full**: never more than ``batch_max_rows`` rows in one call; under load batches grow by
  themselves while the previous batch runs (continuous batching);
* **max wait**: with ``max_in_flight_batches > 1`` a second batch starts before the first one
  returns only when it is full or its oldest row has waited ``max_wait_ms``.

The model function runs in an executor thread (onnxruntime releases the GIL), unless the caller
measured it to be cheaper than the hand-off to a thread (``inline=True``: a call of a few tens of
microseconds costs less on the loop than ``run_in_executor``'s queue, wake-up and GIL transfer),
or the batch has at most ``inline_max_rows`` rows (small batches on the loop, big ones in the
thread, for models whose cost grows with the batch).
If it raises, every caller whose rows were in that batch gets the exception; the caller decides
(:func:`submit_isolating` bisects a failed submission to isolate the poison rows).
Rows of one ``submit`` share a width; rows of different submissions are joined by ``combine``
(default :func:`numpy.concatenate`; a caller whose widths vary pads there).
Deadlines use :func:`time.monotonic`. ``stop()`` flushes what is pending before returning.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.metrics import BATCH_QUEUE_WAIT, BATCH_ROWS, INFERENCE_SECONDS

__all__ = ["BatchStats", "CombineFn", "MicroBatcher", "ModelFn", "submit_isolating"]

ModelFn = Callable[[NDArray[Any]], NDArray[Any]]
"""The model: a matrix of n rows in, n outputs (first axis) out."""
CombineFn = Callable[[Sequence[NDArray[Any]]], NDArray[Any]]
"""Joins row slices of several submissions into one model input (default: concatenate)."""


@dataclass
class _Pending:
    rows: NDArray[Any]
    future: asyncio.Future[NDArray[Any]]
    enqueued: float
    parts: dict[int, NDArray[Any]] = field(default_factory=dict)
    """Outputs by start row: slices may come back from batches out of order."""
    taken: int = 0
    delivered: int = 0


@dataclass
class BatchStats:
    """Counters of what the batcher did (read by metrics and the benchmark)."""

    batches: int = 0
    rows: int = 0
    failures: int = 0
    size_histogram: dict[int, int] = field(default_factory=dict)
    """Batches per size bucket: the next power of two at or above the batch size."""

    def record(self, size: int) -> None:
        self.batches += 1
        self.rows += size
        bucket = 1 << max(size - 1, 0).bit_length()
        self.size_histogram[bucket] = self.size_histogram.get(bucket, 0) + 1


class MicroBatcher:
    """Adaptive micro-batching of feature rows in front of a synchronous model function."""

    def __init__(
        self,
        fn: ModelFn,
        *,
        batch_max_rows: int,
        max_wait_ms: float,
        executor: Executor | None = None,
        max_in_flight_batches: int = 1,
        inline: bool = False,
        combine: CombineFn | None = None,
        inline_max_rows: int = 0,
        name: str | None = None,
    ) -> None:
        if batch_max_rows < 1:
            raise ValueError(f"batch_max_rows must be >= 1, got {batch_max_rows}")
        if not 0 <= max_wait_ms <= 100:
            raise ValueError(f"max_wait_ms must be within [0, 100], got {max_wait_ms}")
        if max_in_flight_batches < 1:
            raise ValueError(f"max_in_flight_batches must be >= 1, got {max_in_flight_batches}")
        if inline_max_rows < 0:
            raise ValueError(f"inline_max_rows must be >= 0, got {inline_max_rows}")
        self._fn = fn
        self._combine: CombineFn = combine if combine is not None else np.concatenate
        self.batch_max_rows = batch_max_rows
        self.max_wait_s = max_wait_ms / 1000.0
        self._executor = executor
        self.inline_max_rows = batch_max_rows if inline else min(inline_max_rows, batch_max_rows)
        """Batches of at most this many rows call ``fn`` on the loop itself (no thread hop)."""
        self._max_in_flight = max_in_flight_batches
        self._running = 0
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closing = False
        self.stats = BatchStats()
        self._metrics = (None if name is None else (
            BATCH_QUEUE_WAIT.labels(name), BATCH_ROWS.labels(name), INFERENCE_SECONDS.labels(name)))
        """Queue wait, rows and call time of every batch, when the batcher has a ``name``."""

    async def start(self) -> None:
        if self._runner is None:
            self._closing = False
            self._runner = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Flush everything pending, wait for running batches, then end the runner. Idempotent."""
        if self._runner is None:
            return
        self._closing = True
        self._wakeup.set()
        await self._runner
        self._runner = None

    @property
    def inline(self) -> bool:
        """Whether every batch runs on the loop (a model faster than a thread hand-off)."""
        return self.inline_max_rows >= self.batch_max_rows

    @property
    def running(self) -> bool:
        """Whether :meth:`submit` is accepted (started and not stopping)."""
        return self._runner is not None and not self._closing

    async def __aenter__(self) -> MicroBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def submit(self, rows: NDArray[Any]) -> NDArray[Any]:
        """Score ``rows`` (n x width); return n outputs in the same order."""
        if rows.ndim != 2:
            raise ValueError(f"rows must be a 2-D matrix, got shape {rows.shape}")
        if len(rows) == 0:
            return np.empty(0, dtype=np.float32)
        if not self.running:
            raise RuntimeError("MicroBatcher is not running")
        future: asyncio.Future[NDArray[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future, time.monotonic()))
        self._queued_rows += len(rows)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._running >= self._max_in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._should_flush_now():
                await self._wait_for_flush_condition()
                continue
            self._launch(self._take_batch())
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    def _should_flush_now(self) -> bool:
        if self._running == 0 or self._closing or self._queued_rows >= self.batch_max_rows:
            return True
        return time.monotonic() - self._queue[0].enqueued >= self.max_wait_s

    async def _wait_for_flush_condition(self) -> None:
        remaining = self.max_wait_s - (time.monotonic() - self._queue[0].enqueued)
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            pass

    def _take_batch(self) -> list[tuple[_Pending, int, int]]:
        """Pop up to ``batch_max_rows`` rows from the queue: (pending, start, stop) slices."""
        taken: list[tuple[_Pending, int, int]] = []
        room = self.batch_max_rows
        while self._queue and room > 0:
            pending = self._queue[0]
            start = pending.taken
            stop = min(len(pending.rows), start + room)
            taken.append((pending, start, stop))
            pending.taken = stop
            room -= stop - start
            self._queued_rows -= stop - start
            if stop == len(pending.rows):
                self._queue.popleft()
        return taken

    def _launch(self, taken: list[tuple[_Pending, int, int]]) -> None:
        self._running += 1
        task = asyncio.create_task(self._score(taken))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _score(self, taken: list[tuple[_Pending, int, int]]) -> None:
        try:
            loop = asyncio.get_running_loop()
            try:
                matrix = self._assemble(taken)
                started = time.monotonic()
                if len(matrix) <= self.inline_max_rows:
                    outputs = self._fn(matrix)
                else:
                    outputs = await loop.run_in_executor(self._executor, self._fn, matrix)
                if self._metrics is not None:
                    self._observe(taken, len(matrix), started)
                if len(outputs) != len(matrix):
                    raise RuntimeError(
                        f"model returned {len(outputs)} outputs for {len(matrix)} rows"
                    )
            except Exception as exc:  # noqa: BLE001 - fanned out to every caller of the batch
                self.stats.failures += 1
                for pending, _, _ in taken:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                return
            self.stats.record(len(matrix))
            self._deliver(taken, outputs)
        finally:
            self._running -= 1
            self._wakeup.set()

    def _observe(self, taken: list[tuple[_Pending, int, int]], rows: int,
                 started: float) -> None:
        assert self._metrics is not None  # noqa: S101 - checked by the caller
        wait, sizes, seconds = self._metrics
        wait.observe(started - min(pending.enqueued for pending, _, _ in taken))
        sizes.observe(rows)
        seconds.observe(time.monotonic() - started)

    def _assemble(self, taken: list[tuple[_Pending, int, int]]) -> NDArray[Any]:
        if len(taken) == 1:
            pending, start, stop = taken[0]
            return pending.rows[start:stop]
        return self._combine([pending.rows[start:stop] for pending, start, stop in taken])

    @staticmethod
    def _deliver(taken: list[tuple[_Pending, int, int]], outputs: NDArray[Any]) -> None:
        offset = 0
        for pending, start, stop in taken:
            pending.parts[start] = outputs[offset : offset + stop - start]
            pending.delivered += stop - start
            offset += stop - start
            if pending.delivered == len(pending.rows) and not pending.future.done():
                parts = [pending.parts[key] for key in sorted(pending.parts)]
                pending.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))


async def submit_isolating(
    batcher: MicroBatcher, rows: NDArray[Any]
) -> tuple[list[tuple[int, NDArray[Any]]], list[tuple[int, str]]]:
    """Score ``rows``; if the model raises, bisect until the failing rows are isolated.

    Returns ``(pieces, failed)``: ``(first row, outputs)`` pieces covering every scored row, in
    row order, and ``(row, reason)`` for each row the model failed on (poison isolation: one bad
    record must not take its batch, or the lane, down with it).
    """
    pieces: list[tuple[int, NDArray[Any]]] = []
    failed: list[tuple[int, str]] = []
    await _bisect(batcher, rows, 0, len(rows), pieces, failed)
    return pieces, failed


async def _bisect(batcher: MicroBatcher, rows: NDArray[Any], lo: int, hi: int,
                  pieces: list[tuple[int, NDArray[Any]]], failed: list[tuple[int, str]]) -> None:
    if hi <= lo:
        return
    try:
        pieces.append((lo, await batcher.submit(rows[lo:hi])))
    except Exception as exc:  # noqa: BLE001 - poison isolation: any model error
        if not batcher.running:
            raise  # stopping: not the rows' fault
        if hi - lo == 1:
            failed.append((lo, f"model failed on this record: {exc!r}"))
            return
        mid = (lo + hi) // 2
        await _bisect(batcher, rows, lo, mid, pieces, failed)
        await _bisect(batcher, rows, mid, hi, pieces, failed)
