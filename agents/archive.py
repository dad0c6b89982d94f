"""The archive lane's handler: result topics to S3 as windowed, gzip-compressed JSONL objects.

Each partition fills one window at a time; a window is written when its uncompressed size
reaches ``archive_max_bytes`` or its first record has waited ``archive_max_age_ms``, and on
stop. The key is deterministic from what it holds::

    results/<topic>/dt=YYYY-MM-DD/hour=HH/<partition>-<first offset>-<last offset>.jsonl.gz

(date and hour of the first record's Kafka timestamp, offsets zero-padded to 20 digits). Offsets
are committed only after the object is written. After a crash the lane re-reads from the last
commit; a window that was written but not committed is found by listing its key prefix (same
partition, same first offset) and the new window is closed at the same last offset, so the
replay overwrites the object with identical content instead of adding an overlapping one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import faust
from aiokafka import TopicPartition

from pipeline.errors import SinkError
from pipeline.kafka.faustapp import attach_lane
from pipeline.kafka.lane import Lane, LaneContext, PartitionRecords
from pipeline.kafka.offsets import Chunk
from pipeline.kafka.supervisor import LaneSupervisor
from pipeline.kafka.topics import archived_topics
from pipeline.s3.s3store import S3Store, retry
from pipeline.settings import Settings

__all__ = ["ArchiveHandler", "archive_key", "archive_prefix"]

LANE = "archive"

log = logging.getLogger(__name__)


def archive_prefix(topic: str, partition: int, first: int, timestamp_ms: int, *,
                   root: str = "results") -> str:
    """Key prefix shared by every archive object of ``partition`` starting at ``first``."""
    when = dt.datetime.fromtimestamp(timestamp_ms / 1000.0, tz=dt.timezone.utc)
    return (f"{root}/{topic}/dt={when:%Y-%m-%d}/hour={when:%H}/"
            f"{partition:04d}-{first:020d}-")


def archive_key(topic: str, partition: int, first: int, last: int, timestamp_ms: int) -> str:
    """The object key of the window ``first..last`` (inclusive) of ``partition``."""
    return f"{archive_prefix(topic, partition, first, timestamp_ms)}{last:020d}.jsonl.gz"


@dataclass
class _Window:
    first: int
    timestamp_ms: int
    opened: float
    end_at: int | None = None
    """Forced last offset: a previous run already wrote this window up to here."""
    last: int = -1
    size: int = 0
    lines: list[bytes] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)


class ArchiveHandler:
    """Lane handler that archives result topics to S3 (own consumer group, own commits).

    By default it reads every real-time result topic (:func:`pipeline.kafka.topics.archived_topics`:
    ``fraud.scores``, ``reco.results``).
    """

    def __init__(self, settings: Settings, topics: Sequence[str] | None = None, *,
                 max_bytes: int | None = None, max_age_ms: int | None = None) -> None:
        self.settings = settings
        self.topics = tuple(topics or (settings.topic(name) for name in archived_topics()))
        self.store = S3Store(settings)
        self.max_bytes = max_bytes or settings.archive_max_bytes
        self.max_age_s = (max_age_ms or settings.archive_max_age_ms) / 1000.0
        self._windows: dict[TopicPartition, _Window] = {}
        self._check_existing: set[TopicPartition] = set()
        self._seen: set[TopicPartition] = set()
        # One lock for all appends and writes: handle() calls run concurrently, and taking it
        # first thing (FIFO) keeps every partition's records in fetch order.
        self._lock = asyncio.Lock()
        self._ctx: LaneContext | None = None
        self._timer: asyncio.Task[None] | None = None
        self.objects_written = 0
        self.records_written = 0

    async def start(self, ctx: LaneContext) -> None:
        self._ctx = ctx
        await self.store.start()
        self._timer = asyncio.create_task(self._age_loop(), name="archive-age")

    async def stop(self) -> None:
        """Write every open window (one attempt each), then close the S3 client."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        for tp in list(self._windows):
            try:
                await self._flush(tp, retrying=False)
            except SinkError as exc:
                # Not committed, so not lost: the next run archives these records.
                log.warning("archive: window of %s not written at stop (%s)", tp, exc)
        await self.store.stop()

    async def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Write the open windows of revoked partitions so their offsets can be committed.

        If S3 fails meanwhile the windows are dropped uncommitted: the next owner re-reads them
        and (same first offset, same key prefix) writes the same objects.
        """
        for tp in tps:
            try:
                async with self._lock:
                    await self._flush(tp, retrying=False)
            except SinkError as exc:
                log.warning("archive: could not write %s on revoke (%s); next owner will", tp, exc)
            self._windows.pop(tp, None)
            self._seen.discard(tp)

    async def handle(self, batch: Sequence[PartitionRecords]) -> None:
        async with self._lock:
            for part in batch:
                await self._append(part)

    async def _append(self, part: PartitionRecords) -> None:
        tp = part.tp
        if tp not in self._seen:
            # First data since assignment: earlier runs may have written windows from here.
            self._seen.add(tp)
            self._check_existing.add(tp)
        for record in part.records:
            window = self._windows.get(tp)
            if window is None:
                window = await self._open(tp, record.offset, record.timestamp)
            window.lines.append(record.value or b"")
            window.size += len(record.value or b"") + 1
            window.last = record.offset
            if window.end_at is not None and record.offset >= window.end_at:
                await self._flush(tp)
        window = self._windows.get(tp)
        if window is not None:
            window.chunks.append(part.chunk)
            if window.size >= self.max_bytes:
                await self._flush(tp)
        else:
            self._chunk_done(part.chunk)

    async def _open(self, tp: TopicPartition, first: int, timestamp_ms: int) -> _Window:
        window = _Window(first=first, timestamp_ms=timestamp_ms, opened=time.monotonic())
        if tp in self._check_existing:
            window.end_at = await self._existing_last(tp, first, timestamp_ms)
            if window.end_at is None:
                self._check_existing.discard(tp)
        self._windows[tp] = window
        return window

    def window_prefix(self, tp: TopicPartition, first: int, timestamp_ms: int) -> str:
        """Key prefix that identifies a written window (listing it finds earlier runs' work)."""
        return archive_prefix(tp.topic, tp.partition, first, timestamp_ms)

    async def write_window(self, tp: TopicPartition, first: int, last: int, timestamp_ms: int,
                           lines: list[bytes]) -> None:
        """Write one window. Subclasses transform the records; this one archives them as is.
        The object that makes the window count as written must be put last."""
        key = archive_key(tp.topic, tp.partition, first, last, timestamp_ms)
        body = await asyncio.to_thread(_gzip_lines, lines)
        await self.store.put(key, body, content_type="application/x-ndjson",
                             content_encoding="gzip")
        log.info("archive: wrote s3://%s/%s (%d records, %d bytes)", self.store.bucket, key,
                 len(lines), len(body))

    async def _existing_last(self, tp: TopicPartition, first: int, ts_ms: int) -> int | None:
        prefix = self.window_prefix(tp, first, ts_ms)

        async def list_lasts() -> list[int]:
            return [int(key[len(prefix):].split(".", 1)[0])
                    async for key in self.store.list_keys(prefix)]

        lasts = await retry(list_lasts, what=f"archive list {prefix}")
        if lasts:
            log.info("archive: %s-%d from %d already written up to %d; replaying onto it",
                     tp.topic, tp.partition, first, max(lasts))
        return max(lasts) if lasts else None

    async def _flush(self, tp: TopicPartition, *, retrying: bool = True) -> None:
        """Write the partition's window. While S3 is down this retries with backoff and the
        lane stops fetching once its in-flight bound is reached: backpressure, not loss."""
        window = self._windows.get(tp)
        if window is None or not window.lines:
            self._windows.pop(tp, None)
            return

        async def write() -> None:
            await self.write_window(tp, window.first, window.last, window.timestamp_ms,
                                    window.lines)

        what = f"{tp.topic}-{tp.partition} window {window.first}-{window.last}"
        await (retry(write, what=what) if retrying else write())
        self._windows.pop(tp, None)
        self.objects_written += 1
        self.records_written += len(window.lines)
        # Chunks join the window holding their last record, so all of them are written now.
        for chunk in window.chunks:
            self._chunk_done(chunk)

    def _chunk_done(self, chunk: Chunk) -> None:
        assert self._ctx is not None  # noqa: S101 - set in start()
        self._ctx.done(chunk)

    async def _age_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(min(self.max_age_s / 4, 1.0))
                now = time.monotonic()
                for tp, window in list(self._windows.items()):
                    if now - window.opened >= self.max_age_s:
                        async with self._lock:
                            if self._windows.get(tp) is window:
                                await self._flush(tp)
        except Exception as exc:
            # e.g. the bucket deleted (not retriable): crash the lane, never stall unseen.
            if self._ctx is not None and self._ctx.fail is not None:
                self._ctx.fail(exc)
            raise


def _gzip_lines(lines: list[bytes]) -> bytes:
    # mtime=0 keeps the bytes identical when a replay rewrites the same window.
    return gzip.compress(b"\n".join(lines) + b"\n", compresslevel=6, mtime=0)


def register(app: faust.App, settings: Settings) -> LaneSupervisor | None:
    """Attach the archive lane to ``app`` when ``INFERLANE_LANES`` includes it (off the latency
    path: restarted in-process after a crash)."""
    if LANE not in settings.lanes:
        return None
    # Windows hold up to archive_max_bytes per partition until written: let that much be read.
    return attach_lane(app, settings, LANE, lambda: Lane(
        settings, LANE, ArchiveHandler(settings),
        max_in_flight_records=max(settings.max_in_flight_records, 500_000)), realtime=False)
