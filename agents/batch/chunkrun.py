"""One batch chunk's data path: stream its byte range from S3, score, write the part and marker.

:class:`ChunkRunner` does it all with its own S3 client and scorer, so it runs the same way in
two places (``INFERLANE_BATCH_PROCESS``):

* **in a child process** (default): the worker hands the child a :class:`schemas.BatchChunk`
  and gets back the output keys and counts. Reading, splitting, validating, scoring, gzip and
  S3 writes then cost the worker's event loop and GIL nothing, and the child runs at
  ``INFERLANE_BATCH_PROCESS_NICE`` (19), so under CPU contention the OS scheduler gives the
  real-time lanes the cores. The worker's :data:`~pipeline.batching.priority.REALTIME_GATE` is
  shared with the child (:meth:`~pipeline.batching.priority.RealtimeGate.attach`): the child still
  waits at slice boundaries while real-time work is pending and rests while real-time traffic flows;
* **in the worker** (a thread per slice): for tests and one-process setups.
"""

from __future__ import annotations

import asyncio
import atexit
import gzip
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson

from pipeline.batching.priority import REALTIME_GATE, SharedGateState
from pipeline.inference.fraudscore import Thresholds, score_default_history
from pipeline.inference.model import OnnxScorer
from pipeline.s3.s3lines import iter_line_batches
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from schemas import BatchChunk, BatchCounts, Transaction, validate_record

__all__ = ["ChunkRunner", "ChunkProcess", "score_jsonl", "score_lines"]

_ENCODER = msgspec.json.Encoder()
_SLICE_ROWS = 1024  # ~5 ms of work: the longest a real-time event waits for batch scoring


def score_jsonl(scorer: OnnxScorer, thresholds: Thresholds,
                valid: list[dict[str, Any]]) -> bytes:
    """Score validated transactions in one model call; their FraudScores as JSONL."""
    if not valid:
        return b""
    # Backfills have no slow-path snapshot: a history model scores them on default history.
    return _ENCODER.encode_lines(score_default_history(scorer, thresholds, valid, time.time()))


def score_lines(scorer: OnnxScorer, thresholds: Thresholds, lines: list[bytes],
                chunk_id: int) -> tuple[bytes, bytes, BatchCounts]:
    """Validate and score raw JSONL lines: (scored JSONL, rejected JSONL, counts)."""
    valid: list[dict[str, Any]] = []
    rejected: list[bytes] = []
    for line in lines:
        data, rejection = validate_record(line, Transaction)
        if data is not None:
            valid.append(data)
        elif rejection is not None:
            rejected.append(orjson.dumps({
                "error": rejection.error, "reason": rejection.reason,
                "raw": line.decode("utf-8", "replace"), "chunk_id": chunk_id}) + b"\n")
    counts = BatchCounts(read=len(lines), scored=len(valid), dead_lettered=len(rejected))
    return score_jsonl(scorer, thresholds, valid), b"".join(rejected), counts


@dataclass
class _ChunkOutput:
    counts: BatchCounts = field(default_factory=BatchCounts)
    scored: list[bytes] = field(default_factory=list)
    """JSONL blocks (each already newline-terminated)."""
    rejected: list[bytes] = field(default_factory=list)


@dataclass
class ChunkRunner:
    """Read, score and write chunks with one S3 client and one scorer (see the module doc)."""

    settings: Settings
    store: S3Store
    scorer: OnnxScorer
    thresholds: Thresholds

    async def run(self, chunk: BatchChunk) -> tuple[list[str], BatchCounts]:
        """Score ``chunk`` and write its part(s) and marker; return the keys and counts.
        Idempotent: a rerun overwrites the same keys."""
        output = _ChunkOutput()
        # Read ahead while a batch is scored: S3 I/O and CPU overlap; two batches at most.
        batches: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(self._read(chunk, batches))
        try:
            while (lines := await batches.get()) is not None:
                await self._score(chunk, lines, output)
            await reader  # re-raises a read error
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        return await self._write(chunk, output), output.counts

    async def _read(self, chunk: BatchChunk, batches: asyncio.Queue[list[bytes] | None]) -> None:
        try:
            async for lines in iter_line_batches(
                    self.store, chunk.bucket, chunk.key, start=chunk.byte_start,
                    end=chunk.byte_end, size=chunk.object_size, gzip=chunk.gzip,
                    batch_lines=self.settings.batch_rows_per_call):
                await batches.put(lines)
        except Exception:
            # Wake the scorer; the error itself surfaces where it awaits this task.
            await batches.put(None)
            raise
        await batches.put(None)

    async def _score(self, chunk: BatchChunk, lines: list[bytes], out: _ChunkOutput) -> None:
        """Score in slices; before each, pending real-time work goes first."""
        for start in range(0, len(lines), _SLICE_ROWS):
            if REALTIME_GATE.busy:
                await asyncio.to_thread(REALTIME_GATE.checkpoint)
            began = time.monotonic()
            scored, rejected, counts = await asyncio.to_thread(
                score_lines, self.scorer, self.thresholds, lines[start:start + _SLICE_ROWS],
                chunk.chunk_id)
            if REALTIME_GATE.recently_active() and self.settings.batch_yield_ratio:
                # Real-time traffic flows: leave it the CPU for a while (duty cycle).
                await asyncio.sleep((time.monotonic() - began) * self.settings.batch_yield_ratio)
            out.scored.append(scored)
            if rejected:
                out.rejected.append(rejected)
            c = out.counts
            out.counts = BatchCounts(read=c.read + counts.read, scored=c.scored + counts.scored,
                                     dead_lettered=c.dead_lettered + counts.dead_lettered)

    async def _write(self, chunk: BatchChunk, output: _ChunkOutput) -> list[str]:
        prefix, name = chunk.output_prefix, f"part-{chunk.chunk_id:05d}.jsonl.gz"
        keys = [f"{prefix}{name}"]
        await self._put_lines(chunk.output_bucket, keys[0], output.scored)
        if output.rejected:
            keys.append(f"{prefix}rejected/{name}")
            await self._put_lines(chunk.output_bucket, keys[1], output.rejected)
        marker = {"chunk_id": chunk.chunk_id, "counts": msgspec.to_builtins(output.counts),
                  "output_keys": keys}
        await self.store.put(f"{prefix}_chunks/{chunk.chunk_id:05d}.json", orjson.dumps(marker),
                             content_type="application/json", bucket=chunk.output_bucket)
        return keys

    async def _put_lines(self, bucket: str, key: str, lines: list[bytes]) -> None:
        # Level 3: half the CPU of the default 6 for ~10 % more bytes on this data.
        body = await asyncio.to_thread(lambda: gzip.compress(b"".join(lines), 3, mtime=0))
        await self.store.put(key, body, content_type="application/x-ndjson",
                             content_encoding="gzip", bucket=bucket)


# --- the child process ---------------------------------------------------------------------------
_CHILD: tuple[asyncio.AbstractEventLoop, ChunkRunner] | None = None


def _init_child(settings: Settings, model_dir: str, thresholds: Thresholds,
                gate: SharedGateState) -> None:
    global _CHILD  # noqa: PLW0603 - one runner per child process, built once
    if settings.batch_process_nice:
        # Real time first, also for the OS scheduler: under CPU contention this process gets
        # a small share (nice 19: weight 15 vs 1024); when cores are idle, all of them.
        os.nice(settings.batch_process_nice)
    REALTIME_GATE.attach(gate)
    scorer = OnnxScorer.load(Path(model_dir), settings.fraud_model_precision,
                             settings.inference_threads)
    scorer.warm_up()
    loop = asyncio.new_event_loop()
    store = S3Store(settings)
    loop.run_until_complete(store.start())
    _CHILD = (loop, ChunkRunner(settings, store, scorer, thresholds))
    atexit.register(lambda: loop.run_until_complete(store.stop()))


def _child_run(chunk: BatchChunk) -> tuple[list[str], BatchCounts]:
    if _CHILD is None:
        raise RuntimeError("batch chunk process not initialised")
    loop, runner = _CHILD
    return loop.run_until_complete(runner.run(chunk))


def _child_ready() -> bool:
    return _CHILD is not None


class ChunkProcess:
    """The low-priority child process that runs chunks (one at a time)."""

    def __init__(self, settings: Settings, model_dir: Path, thresholds: Thresholds) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_child,
            initargs=(settings, str(model_dir), thresholds, REALTIME_GATE.share()))

    async def start(self) -> None:
        """Wait until the child has loaded and warmed its model and connected to S3."""
        await self._call(_child_ready)

    async def run(self, chunk: BatchChunk) -> tuple[list[str], BatchCounts]:
        result: tuple[list[str], BatchCounts] = await self._call(_child_run, chunk)
        return result

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def stop(self) -> None:
        """Let a chunk in progress finish (its result is then not used: it will be redone)."""
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
