"""``batch.requests``: single records scored without hurry, in big windows, written to S3.

Each record is a :class:`schemas.BatchRecord` ``{job_id, model, payload}``. The handler is the
archive's window machinery (:class:`agents.archive.ArchiveHandler`: size/time-bound windows
per partition, offsets committed only after the window is written, a replay rewrites the same
keys) with a different write step: the window's records are validated, scored in one model
call, grouped by job and written as

    batch/<job_id>/requests/<partition>-<first offset>-<last offset>.jsonl.gz
    batch/<job_id>/requests/rejected/<partition>-<first>-<last>.jsonl.gz   (if any)

then a window marker ``batch/_windows/<topic>/dt=/hour=/<partition>-<first>-<last>`` (what a
replay looks for), then one ``records_written`` event per job on ``batch.results``.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
from collections import defaultdict
from typing import Any

import msgspec
import orjson
from aiokafka import TopicPartition

from agents.archive import ArchiveHandler, archive_prefix
from agents.batch.batchjobs import result_event, score_jsonl
from pipeline.batching.priority import REALTIME_GATE
from pipeline.inference.fraudscore import Thresholds
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.lane import LaneContext
from pipeline.settings import Settings
from schemas import BatchCounts, BatchRecord, size_rejection

__all__ = ["RecordBatchWriter"]

_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # as in BatchRecord: safe as a key folder

log = logging.getLogger(__name__)


class _JobWindow:
    def __init__(self) -> None:
        self.valid: list[dict[str, Any]] = []
        self.rejected: list[bytes] = []


class RecordBatchWriter(ArchiveHandler):
    """Lane handler for ``batch.requests`` (own consumer group, own commits)."""

    def __init__(self, settings: Settings, scorer: OnnxScorer | None = None) -> None:
        super().__init__(settings, (settings.topic("batch.requests"),),
                         max_bytes=settings.batch_window_bytes,
                         max_age_ms=settings.batch_window_ms)
        self._scorer = scorer
        self.thresholds: Thresholds | None = None

    async def start(self, ctx: LaneContext) -> None:
        if self._scorer is None:
            self._scorer = await asyncio.to_thread(
                OnnxScorer.load, await fraud_model_path(self.settings),
                self.settings.fraud_model_precision, self.settings.inference_threads)
        self.thresholds = Thresholds.for_model(self.settings, self._scorer)
        await super().start(ctx)

    def window_prefix(self, tp: TopicPartition, first: int, timestamp_ms: int) -> str:
        return archive_prefix(tp.topic, tp.partition, first, timestamp_ms, root="batch/_windows")

    async def write_window(self, tp: TopicPartition, first: int, last: int, timestamp_ms: int,
                           lines: list[bytes]) -> None:
        jobs = await asyncio.to_thread(self._score, lines)
        name = f"{tp.partition:04d}-{first:020d}-{last:020d}.jsonl.gz"
        events = []
        for job_id, (scored, rejected, counts) in sorted(jobs.items()):
            keys = [f"batch/{job_id}/requests/{name}"]
            await self._put(keys[0], scored)
            if rejected:
                keys.append(f"batch/{job_id}/requests/rejected/{name}")
                await self._put(keys[1], rejected)
            events.append(result_event(job_id, "records_written", counts=counts,
                                       output_keys=keys))
        # The marker goes last: only a window whose outputs all exist counts as written.
        await self.store.put(f"{self.window_prefix(tp, first, timestamp_ms)}{last:020d}", b"")
        assert self._ctx is not None  # noqa: S101 - set in start()
        await self._ctx.sender.send(self.settings.topic("batch.results"), events)
        log.info("batch.requests: window %s-%d %d..%d: %d records for %d job(s)", tp.topic,
                 tp.partition, first, last, len(lines), len(jobs))

    async def _put(self, key: str, body: bytes) -> None:
        data = await asyncio.to_thread(gzip.compress, body, 3, mtime=0)
        await self.store.put(key, data, content_type="application/x-ndjson",
                             content_encoding="gzip")

    def _score(self, lines: list[bytes]) -> dict[str, tuple[bytes, bytes, BatchCounts]]:
        assert self._scorer is not None and self.thresholds is not None  # noqa: S101
        REALTIME_GATE.checkpoint()
        by_job: dict[str, _JobWindow] = defaultdict(_JobWindow)
        max_bytes = self.settings.max_message_bytes
        for line in lines:
            job_id, payload, reason = _parse(line, max_bytes)
            if payload is not None:
                by_job[job_id].valid.append(payload)
            else:
                by_job[job_id].rejected.append(orjson.dumps(
                    {"reason": reason, "raw": line.decode("utf-8", "replace")}) + b"\n")
        out = {}
        for job_id, window in by_job.items():
            scored = score_jsonl(self._scorer, self.thresholds, window.valid)
            counts = BatchCounts(read=len(window.valid) + len(window.rejected),
                                 scored=len(window.valid), dead_lettered=len(window.rejected))
            out[job_id] = (scored, b"".join(window.rejected), counts)
        return out


def _parse(line: bytes, max_bytes: int) -> tuple[str, dict[str, Any] | None, str]:
    """(job_id, payload or None, reason); records without a usable job id go to ``_invalid``
    (so does one longer than ``max_bytes``: it is not parsed to find its job)."""
    too_large = size_rejection(line, max_bytes)
    if too_large is not None:
        return "_invalid", None, too_large.reason
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return "_invalid", None, f"value: not valid JSON ({exc})"
    job_id = value.get("job_id") if isinstance(value, dict) else None
    if not isinstance(job_id, str) or not job_id:
        return "_invalid", None, "job_id: missing"
    try:
        msgspec.convert(value, BatchRecord)
    except msgspec.ValidationError as exc:
        folder = job_id if _JOB_ID.match(job_id) else "_invalid"
        return folder, None, str(exc)
    return job_id, value["payload"], ""
