"""Client side of the batch lane: submit jobs, follow their progress, read
their outputs. Used by ``inferlane batch``, the batch benchmark and the tests.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson
from aiokafka import TopicPartition

from pipeline.kafka.connection import make_producer, start_reader
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from schemas import BatchJob

__all__ = ["read_job_output", "submit_job", "wait_for_job"]


async def submit_job(settings: Settings, job: BatchJob) -> None:
    """Produce ``job`` to ``batch.jobs`` and wait for the broker's ack."""
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("batch.jobs"),
                                     orjson.dumps(msgspec.to_builtins(job)),
                                     key=job.job_id.encode())
    finally:
        await producer.stop()


async def wait_for_job(
    settings: Settings, job_id: str, start: dict[TopicPartition, int], *, timeout_s: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Follow ``batch.results`` from ``start`` until ``job_id`` completes or fails.

    Returns the final event; raises :class:`TimeoutError` after ``timeout_s``.
    """
    consumer = await start_reader(settings, "inferlane-batch-client")
    consumer.assign(list(start))
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event = orjson.loads(record.value or b"{}")
                    if event.get("job_id") != job_id:
                        continue
                    if on_event is not None:
                        on_event(event)
                    if event.get("status") in ("completed", "failed"):
                        return dict(event)
        raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")
    finally:
        await consumer.stop()


async def read_job_output(settings: Settings, prefix: str) -> list[bytes]:
    """Every scored line of the ``.jsonl.gz`` outputs under ``prefix`` (``rejected/`` excluded)."""
    lines: list[bytes] = []
    async with S3Store(settings) as store:
        async for key in store.list_keys(prefix):
            if key.endswith(".jsonl.gz") and "/rejected/" not in key:
                lines.extend(gzip.decompress(await store.get(key)).splitlines())
    return lines
