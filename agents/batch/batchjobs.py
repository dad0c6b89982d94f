"""Bulk scoring jobs over S3 objects: planned once, shared by every worker, idempotent.

Two lane handlers (see :mod:`agents.batch`):

* :class:`JobPlanner` reads ``batch.jobs``; for each :class:`schemas.BatchJob` it lists the
  input object(s), splits them into byte-range chunks (:func:`pipeline.s3.s3lines.split_ranges`)
  and publishes one :class:`schemas.BatchChunk` per chunk to ``batch.chunks`` (8 partitions:
  every worker of the batch group takes a share), then a ``planned`` event on ``batch.results``.
  A bad job is a dead letter on ``batch.jobs.dlq`` plus a ``failed`` event.
* :class:`ChunkScorer` reads ``batch.chunks``; it streams its byte range from S3, scores the
  lines in large batches, writes ``<output>/part-<chunk>.jsonl.gz`` (and the rejected lines to
  ``<output>/rejected/part-<chunk>.jsonl.gz``), then a marker ``<output>/_chunks/<chunk>.json``
  with its counts, emits ``chunk_done``, and only then is the chunk's offset committed.

Every key is a function of the job and chunk id, so a replay after a crash overwrites the same
objects: output rows are never duplicated. The worker whose marker completes the set writes
``<output>/_manifest.json`` (totals and output keys) and emits the ``completed`` event; if two
workers finish the last chunks at the same moment both may emit it (same content).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import orjson
from aiokafka import TopicPartition

from agents.batch.chunkrun import ChunkProcess, ChunkRunner, score_jsonl
from pipeline.errors import SinkError
from pipeline.inference.fraudscore import Thresholds
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.lane import LaneContext, PartitionRecords, Record
from pipeline.s3.s3lines import split_ranges
from pipeline.s3.s3store import S3Store, retry
from pipeline.settings import Settings
from schemas import BatchChunk, BatchCounts, BatchJob, BatchResult, size_rejection

__all__ = ["ChunkScorer", "JobPlanner", "parse_s3_uri", "result_event", "score_jsonl"]

log = logging.getLogger(__name__)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def result_event(job_id: str, status: str, **fields: Any) -> tuple[bytes, bytes]:
    """A ``batch.results`` record (key, value) for ``job_id``."""
    event = BatchResult(job_id=job_id, status=status, at=time.time(),  # type: ignore[arg-type]
                        **fields)
    return job_id.encode(), orjson.dumps(msgspec.to_builtins(event))


class JobPlanner:
    """Lane handler for ``batch.jobs``: split each job into chunks on ``batch.chunks``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = (settings.topic("batch.jobs"),)
        self.store = S3Store(settings)
        self._ctx: LaneContext | None = None

    async def start(self, ctx: LaneContext) -> None:
        self._ctx = ctx
        await self.store.start()

    async def stop(self) -> None:
        await self.store.stop()

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Nothing buffered."""

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        ctx = self._ctx
        assert ctx is not None  # noqa: S101 - set in start()
        for part in batch:
            for record in part.records:
                await self._plan(ctx, record)
            ctx.done(part.chunk)

    async def _plan(self, ctx: LaneContext, record: Record) -> None:
        too_large = size_rejection(record.value, self.settings.max_message_bytes)
        if too_large is not None:
            await self._reject(ctx, record, too_large.reason, error=too_large.error)
            return
        try:
            job = msgspec.convert(orjson.loads(record.value or b""), BatchJob)
            # An S3 outage delays planning; a missing input (not retriable) rejects the job.
            chunks = await retry(lambda: self._chunks(job), what=f"plan {job.job_id}")
        except (msgspec.ValidationError, orjson.JSONDecodeError, ValueError, SinkError) as exc:
            await self._reject(ctx, record, str(exc).splitlines()[0])
            return
        chunk_topic = self.settings.topic("batch.chunks")
        await ctx.sender.send(chunk_topic, [
            (f"{job.job_id}:{c.chunk_id}".encode(), orjson.dumps(msgspec.to_builtins(c)))
            for c in chunks])
        await ctx.sender.send(self.settings.topic("batch.results"),
                              [result_event(job.job_id, "planned", chunks_total=len(chunks))])
        ctx.stats.produced += len(chunks)
        log.info("batch: job %s planned in %d chunks", job.job_id, len(chunks))

    async def _chunks(self, job: BatchJob) -> list[BatchChunk]:
        bucket, key = parse_s3_uri(job.input_uri)
        if key and not key.endswith("/"):
            objects = [(key, await self.store.size(key, bucket=bucket))]
        else:
            objects = [item async for item in self.store.list_objects(key, bucket=bucket)]
            objects = [(k, n) for k, n in objects if not k.endswith("/")]
        if not objects:
            raise ValueError(f"input_uri: no object at {job.input_uri}")
        out_bucket, out_prefix = parse_s3_uri(
            job.output_uri or f"s3://{self.settings.s3_bucket}/batch/{job.job_id}/")
        ranges = [(k, s, e, size) for k, size in objects for s, e in (
            [(0, size)] if k.endswith(".gz") else split_ranges(size,
                                                               self.settings.batch_chunk_bytes))]
        return [BatchChunk(job_id=job.job_id, model=job.model, chunk_id=i,
                           chunks_total=len(ranges), bucket=bucket, key=k, byte_start=s,
                           byte_end=e, object_size=size, gzip=k.endswith(".gz"),
                           output_bucket=out_bucket, output_prefix=out_prefix.rstrip("/") + "/")
                for i, (k, s, e, size) in enumerate(ranges)]

    async def _reject(self, ctx: LaneContext, record: Record, reason: str, *,
                      error: str = "job") -> None:
        letter = dead_letter(record.value, error=error, reason=reason, topic=record.topic,
                             partition=record.partition, offset=record.offset, lane="batch")
        await ctx.sender.send(self.settings.topic("batch.jobs.dlq"), [(record.key, letter)])
        job_id = _job_id_of(record.value)
        if job_id:
            await ctx.sender.send(self.settings.topic("batch.results"),
                                  [result_event(job_id, "failed", error=reason)])
        ctx.stats.dead_lettered += 1
        log.warning("batch: job rejected (%s)", reason)


def _job_id_of(raw: bytes | None) -> str:
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return ""
    job_id = value.get("job_id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) else ""


class ChunkScorer:
    """Lane handler for ``batch.chunks``: one chunk at a time through a
    :class:`~agents.batch.chunkrun.ChunkRunner`, in the low-priority child process
    (``INFERLANE_BATCH_PROCESS``, default) or in this process."""

    def __init__(self, settings: Settings, scorer: OnnxScorer | None = None) -> None:
        self.settings = settings
        self.topics = (settings.topic("batch.chunks"),)
        self.store = S3Store(settings)
        self._scorer = scorer
        self._ctx: LaneContext | None = None
        self.thresholds: Thresholds | None = None
        self.rows_scored = 0
        self.chunks_done = 0
        self._runner: ChunkRunner | ChunkProcess | None = None

    async def start(self, ctx: LaneContext) -> None:
        self._ctx = ctx
        model_dir = await fraud_model_path(self.settings)
        if self._scorer is None:
            self._scorer = await asyncio.to_thread(
                OnnxScorer.load, model_dir,
                self.settings.fraud_model_precision, self.settings.inference_threads)
        await asyncio.to_thread(self._scorer.warm_up)
        self.thresholds = Thresholds.for_model(self.settings, self._scorer)
        await self.store.start()
        if self.settings.batch_process:
            process = ChunkProcess(self.settings, model_dir, self.thresholds)
            await process.start()
            self._runner = process
        else:
            self._runner = ChunkRunner(self.settings, self.store, self._scorer, self.thresholds)

    async def stop(self) -> None:
        if isinstance(self._runner, ChunkProcess):
            await self._runner.stop()
        self._runner = None
        await self.store.stop()

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """A chunk in progress finishes (bounded by the lane's revoke timeout) or is redone."""

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        ctx = self._ctx
        assert ctx is not None  # noqa: S101 - set in start()
        for part in batch:
            for record in part.records:
                chunk = msgspec.convert(orjson.loads(record.value or b""), BatchChunk)
                try:
                    # Idempotent: a chunk interrupted by an S3 outage is redone from the start.
                    await retry(lambda c=chunk: self._run(ctx, c),  # type: ignore[misc]
                                what=f"job {chunk.job_id} chunk {chunk.chunk_id}")
                except SinkError as exc:  # not retriable, e.g. the input object is gone
                    await self._fail(ctx, chunk, exc)
            ctx.done(part.chunk)

    async def _fail(self, ctx: LaneContext, chunk: BatchChunk, exc: SinkError) -> None:
        log.error("batch: job %s chunk %d failed: %s", chunk.job_id, chunk.chunk_id, exc)
        await ctx.sender.send(self.settings.topic("batch.results"), [result_event(
            chunk.job_id, "failed", chunks_total=chunk.chunks_total, chunk_id=chunk.chunk_id,
            error=str(exc))])

    async def _run(self, ctx: LaneContext, chunk: BatchChunk) -> None:
        assert self._runner is not None  # noqa: S101 - set in start()
        started = time.monotonic()
        keys, counts = await self._runner.run(chunk)
        ctx.stats.produced += counts.scored
        ctx.stats.dead_lettered += counts.dead_lettered
        self.rows_scored += counts.scored
        self.chunks_done += 1
        await ctx.sender.send(self.settings.topic("batch.results"), [result_event(
            chunk.job_id, "chunk_done", chunks_total=chunk.chunks_total, chunk_id=chunk.chunk_id,
            counts=counts, output_keys=keys)])
        log.info("batch: job %s chunk %d/%d: %s in %.2fs", chunk.job_id, chunk.chunk_id + 1,
                 chunk.chunks_total, counts, time.monotonic() - started)
        await self._maybe_complete(ctx, chunk)

    async def _maybe_complete(self, ctx: LaneContext, chunk: BatchChunk) -> None:
        markers = [k async for k in self.store.list_objects(
            f"{chunk.output_prefix}_chunks/", bucket=chunk.output_bucket)]
        if len(markers) < chunk.chunks_total:
            return
        totals, keys = BatchCounts(), []
        for key, _size in markers:
            marker = orjson.loads(await self.store.get(key, bucket=chunk.output_bucket))
            c = marker["counts"]
            totals = BatchCounts(read=totals.read + c["read"], scored=totals.scored + c["scored"],
                                 dead_lettered=totals.dead_lettered + c["dead_lettered"])
            keys.extend(marker["output_keys"])
        manifest = {"job_id": chunk.job_id, "chunks_total": chunk.chunks_total,
                    "counts": msgspec.to_builtins(totals), "output_keys": keys}
        await self.store.put(f"{chunk.output_prefix}_manifest.json", orjson.dumps(manifest),
                             content_type="application/json", bucket=chunk.output_bucket)
        await ctx.sender.send(self.settings.topic("batch.results"), [result_event(
            chunk.job_id, "completed", chunks_total=chunk.chunks_total, counts=totals,
            output_keys=keys)])
        log.info("batch: job %s completed: %s", chunk.job_id, totals)
