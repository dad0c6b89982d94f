"""The batch lane on the real local stack: S3 objects split into byte-range chunks, scored by
every worker of the group, written once per chunk; a job killed mid-way completes with exactly
its input rows in the output (deterministic keys overwrite, nothing is duplicated).
"""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from pipeline.clients.batchclient import read_job_output, submit_job, wait_for_job
from pipeline.dev.loadgen import snapshot_end_offsets, write_transactions_jsonl
from pipeline.dev.processes import WorkerProcess
from pipeline.kafka.connection import make_producer
from pipeline.kafka.producer import BatchSender
from pipeline.s3.s3lines import iter_line_batches, split_ranges
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from pipeline.training.synth import TransactionGenerator
from schemas import BatchJob
from tests.integration.conftest import EnvFactory, peer_env, ready_settings

WorkerFactory = Callable[..., WorkerProcess]


@pytest.mark.parametrize("chunk_bytes", [13, 100, 4096, 10**9])
async def test_byte_range_chunks_read_every_line_exactly_once(
    settings: Settings, chunk_bytes: int
) -> None:
    rng = random.Random(chunk_bytes)
    lines = [("x" * rng.randint(0, 40) + str(i)).encode() for i in range(150)]
    body = b"\n".join(lines) + b"\n"
    key = f"test/lines-{chunk_bytes}.jsonl"
    async with S3Store(settings) as store:
        await store.put(key, body)
        got: list[bytes] = []
        for start, end in split_ranges(len(body), chunk_bytes):
            async for batch in iter_line_batches(store, settings.s3_bucket, key, start=start,
                                                 end=end, size=len(body), gzip=False,
                                                 batch_lines=17):
                got.extend(batch)
        await store.put(key + ".gz", gzip.compress(body))
        zipped = [line async for batch in iter_line_batches(
            store, settings.s3_bucket, key + ".gz", start=0, end=0, size=0, gzip=True,
            batch_lines=50)
            for line in batch]
    assert got == lines
    assert zipped == lines


@pytest.mark.parametrize("chunk_bytes", [4096, 100_000])
async def test_lines_longer_than_the_read_ahead_are_read_whole(
    settings: Settings, chunk_bytes: int
) -> None:
    lines = [b"short", b"y" * 300_000, b"after-the-long-one", b"z" * 70_000, b"last"]
    body = b"\n".join(lines)  # and no final newline
    key = f"test/long-{chunk_bytes}.jsonl"
    async with S3Store(settings) as store:
        await store.put(key, body)
        got = [line for start, end in split_ranges(len(body), chunk_bytes)
               async for batch in iter_line_batches(store, settings.s3_bucket, key, start=start,
                                                    end=end, size=len(body), gzip=False,
                                                    batch_lines=2)
               for line in batch]
    assert got == lines


async def _upload_job_input(settings: Settings, key: str, rows: int,
                            invalid_every: int) -> tuple[set[str], int]:
    return await write_transactions_jsonl(settings, key, rows, invalid_every=invalid_every)


async def _submit(settings: Settings, job: dict[str, Any]) -> None:
    await submit_job(settings, msgspec.convert(job, BatchJob))


async def _wait_completed(settings: Settings, job_id: str, start: dict[Any, int],
                          timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    final = await wait_for_job(settings, job_id, start, timeout_s=timeout_s,
                               on_event=events.append)
    assert final["status"] == "completed", final
    return final, events


async def _output_ids(settings: Settings, prefix: str) -> list[str]:
    return [orjson.loads(line)["event_id"] for line in await read_job_output(settings, prefix)]


async def test_job_is_shared_by_two_workers_and_scores_every_row(
    test_env: EnvFactory, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    env = test_env(lanes="batch", batch_chunk_bytes="150000", batch_rows_per_call="2000")
    settings = await ready_settings(env)
    first = worker_factory(env, name="first")
    second = worker_factory(peer_env(env, tmp_path), name="second")
    ids, invalid = await _upload_job_input(settings, "in/job1.jsonl", 20_000, invalid_every=50)
    start = await snapshot_end_offsets(settings, settings.topic("batch.results"))
    await _submit(settings, {"job_id": "job1", "model": "fraud",
                             "input_uri": f"s3://{settings.s3_bucket}/in/job1.jsonl"})
    completed, events = await _wait_completed(settings, "job1", start, timeout_s=90)
    assert completed["counts"] == {"read": 20_000, "scored": len(ids), "dead_lettered": invalid}
    planned = [e for e in events if e["status"] == "planned"]
    assert len(planned) == 1 and planned[0]["chunks_total"] > 8
    out = await _output_ids(settings, "batch/job1/")
    assert len(out) == len(ids) and set(out) == ids, "every valid row scored exactly once"
    for worker in (first, second):
        assert "batch: job job1 chunk" in worker.log_text(), "both workers took chunks"


async def test_job_survives_a_killed_worker_without_duplicate_rows(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    env = test_env(lanes="batch", batch_chunk_bytes="100000", batch_rows_per_call="1000")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    ids, _ = await _upload_job_input(settings, "in/job2.jsonl", 30_000, invalid_every=10**9)
    start = await snapshot_end_offsets(settings, settings.topic("batch.results"))
    await _submit(settings, {"job_id": "job2", "model": "fraud",
                             "input_uri": f"s3://{settings.s3_bucket}/in/job2.jsonl"})
    deadline = time.monotonic() + 60
    while worker.log_text().count("batch: job job2 chunk") < 3:
        assert time.monotonic() < deadline, "no chunk done within 60 s"
        await asyncio.sleep(0.02)
    worker.kill()
    await asyncio.to_thread(worker.start)
    completed, _ = await _wait_completed(settings, "job2", start, timeout_s=120)
    assert completed["counts"]["scored"] == len(ids)
    out = await _output_ids(settings, "batch/job2/")
    assert len(out) == len(ids), f"{len(out) - len(ids)} duplicate or missing output rows"
    assert set(out) == ids


async def test_batch_requests_are_scored_in_windows_per_job(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    env = test_env(lanes="batch", batch_window_bytes="100000", batch_window_ms="500")
    settings = await ready_settings(env)
    worker_factory(env)
    generator = TransactionGenerator(seed=41)
    expected: dict[str, set[str]] = {"jobA": set(), "jobB": set()}
    records: list[tuple[bytes | None, bytes]] = []
    for i in range(3000):
        txn, _ = generator.next()
        job = "jobA" if i % 3 else "jobB"
        if i % 100 == 99:
            txn["channel"] = "fax"
        else:
            expected[job].add(txn["event_id"])
        records.append((job.encode(), orjson.dumps(
            {"job_id": job, "model": "fraud", "payload": txn})))
    records.append((b"x", b"not json"))
    start = await snapshot_end_offsets(settings, settings.topic("batch.results"))
    producer = make_producer(settings)
    await producer.start()
    try:
        await BatchSender(producer).send(settings.topic("batch.requests"), records)
    finally:
        await producer.stop()
    totals: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + 60
    while any(totals.get(j, {}).get("read", 0) < 1000 * (2 if j == "jobA" else 1)
              for j in expected):
        assert time.monotonic() < deadline, totals
        events = await _results_since(settings, start)
        totals = {}
        for event in events:
            if event["status"] == "records_written":
                t = totals.setdefault(event["job_id"], {"read": 0, "scored": 0,
                                                        "dead_lettered": 0})
                for name, value in event["counts"].items():
                    t[name] += value
    for job, ids in expected.items():
        assert totals[job]["scored"] == len(ids)
        out = [orjson.loads(line)["event_id"]
               for line in await read_job_output(settings, f"batch/{job}/requests/")]
        assert len(out) == len(ids) and set(out) == ids, job
    assert totals["jobA"]["dead_lettered"] + totals["jobB"]["dead_lettered"] == 30


async def _results_since(settings: Settings, start: dict[Any, int]) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    from pipeline.kafka.connection import client_kwargs

    consumer = AIOKafkaConsumer(**client_kwargs(settings, client_id="test-results"),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        ends = await consumer.end_offsets(list(start))
        events: list[dict[str, Any]] = []
        while [tp for tp in start if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                events.extend(orjson.loads(r.value or b"{}") for r in batch)
        return events
    finally:
        await consumer.stop()
