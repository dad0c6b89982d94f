"""Deployment mistakes fail loudly on the real broker (issue 19): a keyed topic with the wrong
partition count and a missing bucket stop the worker at start with one clear line; an S3 bucket
that vanishes after start crashes the archive lane, which restarts in-process while the fraud
lane goes on scoring, and the worker shows it not ready; cards produced by a librdkafka client
(CRC32 partitioner) are counted, warned about and flagged ``misrouted`` in their scores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioboto3
import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import Producer as RdKafkaProducer

from pipeline.dev.loadgen import (
    HistoryTransactionSource,
    produce_transactions,
    snapshot_end_offsets,
)
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import free_port
from pipeline.errors import EXIT_CONFIG
from pipeline.kafka.connection import client_kwargs, make_producer, start_reader
from pipeline.kafka.partitioner import partition_for
from pipeline.kafka.producer import BatchSender
from pipeline.settings import Settings
from tests.integration.conftest import REPO, EnvFactory, ready_settings, settings_from
from tests.integration.test_fraud_lane import _readers
from tests.integration.test_metrics import _sum
from tests.integration.test_models import _metrics

WorkerFactory = Callable[..., WorkerProcess]


def _run_to_exit(env: dict[str, str], log: Path, timeout_s: float = 60.0) -> tuple[int, str]:
    worker = WorkerProcess(env, log, cwd=REPO)
    worker.spawn()
    assert worker._popen is not None  # noqa: S101
    try:
        code = worker._popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        worker.terminate()
        raise AssertionError(f"worker still up after {timeout_s}s:\n{worker.log_tail()}") from exc
    return code, worker.log_text()


def _last_critical(log: str) -> str:
    lines = [line for line in log.splitlines() if "[CRITICAL]" in line and "worker exits" in line]
    assert lines, f"no exit line in the log:\n{log[-3000:]}"
    return lines[-1]


async def test_a_keyed_topic_with_the_wrong_partition_count_stops_the_worker(
        test_env: EnvFactory, tmp_path: Path) -> None:
    env = test_env(lanes="fraud,history")
    settings = settings_from(env)
    # What a producer started before `inferlane topics create` leaves on a broker with
    # auto.create.topics.enable=true and num.partitions=8.
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic("fraud.requests"), 8, 1)])
    finally:
        await admin.close()
    started = time.monotonic()
    code, log = _run_to_exit(env, tmp_path / "worker.log")
    took = time.monotonic() - started
    line = _last_critical(log)
    assert code == EXIT_CONFIG, f"exit code {code}; {line}"
    assert f"topic {settings.topic('fraud.requests')} has 8 partitions, the pipeline expects 4" \
        in line and "inferlane topics create" in line and "INFERLANE_REALTIME_PARTITIONS=8" in line
    assert "Lane[fraud]: started" not in log and "Lane[history]: started" not in log
    print(f"wrong partition count: exit {code} after {took:.1f}s: {line.split('] ', 3)[-1]}")


async def test_a_missing_bucket_stops_the_worker(test_env: EnvFactory, tmp_path: Path) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    env = test_env(lanes="fraud,archive", s3_bucket=bucket)
    await ready_settings(env)
    started = time.monotonic()
    code, log = _run_to_exit(env, tmp_path / "worker.log")
    line = _last_critical(log)
    assert code == EXIT_CONFIG, f"exit code {code}; {line}"
    settings = settings_from(env)
    assert f"S3 bucket '{bucket}' at {settings.s3_endpoint_url} does not exist" in line, line
    assert "Lane[fraud]: started" not in log and "Lane[archive]: started" not in log
    print(f"missing bucket: exit {code} after {time.monotonic() - started:.1f}s")


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _s3(settings: Settings, call: str, **kwargs: Any) -> Any:
    session = aioboto3.Session()
    async with session.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            aws_access_key_id="x", aws_secret_access_key="x") as s3:  # noqa: S106 - moto
        if call == "empty_and_delete":
            listed = await s3.list_objects_v2(Bucket=settings.s3_bucket)
            for obj in listed.get("Contents", []):
                await s3.delete_object(Bucket=settings.s3_bucket, Key=obj["Key"])
            return await s3.delete_bucket(Bucket=settings.s3_bucket)
        return await getattr(s3, call)(Bucket=settings.s3_bucket, **kwargs)


async def test_a_vanished_bucket_restarts_the_archive_lane_while_fraud_scores(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    port = free_port()
    env = test_env(lanes="fraud,archive", web_port=str(port), archive_max_age_ms="300",
                   s3_bucket=f"vanish-{uuid.uuid4().hex[:8]}")
    settings = await ready_settings(env)
    await _s3(settings, "create_bucket")
    worker_factory(env, web=True)
    status, body = await asyncio.to_thread(_health, port)
    assert status == 200 and body["ready"], body
    await _s3(settings, "empty_and_delete")
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        report = await produce_transactions(settings, rate_per_s=200, duration_s=10, seed=5)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=30), \
            "fraud stopped with the archive lane"
        latencies = sorted((v["scored_at"] - v["sent_at"]) * 1000 for v in scores.results.values())
    p99 = latencies[int(len(latencies) * 0.99)]
    status, body = await asyncio.to_thread(_health, port)
    archive = body["lanes"]["archive"]
    assert status == 503 and not body["ready"] and not archive["up"], body
    assert "NoSuchBucket" in (archive["last_error"] or ""), archive
    assert body["lanes"]["fraud"]["up"], body
    text = await asyncio.to_thread(_metrics, port)
    assert _sum(text, "inferlane_lane_up", lane="archive") == 0
    restarts = _sum(text, "inferlane_lane_restarts_total", lane="archive")
    assert restarts >= 1
    # The bucket back: the lane's next restart succeeds, the worker is ready again.
    await _s3(settings, "create_bucket")
    deadline = time.monotonic() + 45
    while (await asyncio.to_thread(_health, port))[0] != 200:
        assert time.monotonic() < deadline, "archive lane did not come back"
        await asyncio.sleep(0.5)
    print(f"bucket deleted after start: {len(report.valid_ids)} events all scored, fraud p99 "
          f"{p99:.1f} ms at 200 ev/s (scored_at - sent_at), archive restarts {restarts:.0f}, "
          f"archive error {archive['last_error'][:80]!r}")


async def test_cards_from_a_librdkafka_producer_are_flagged_misrouted(
        test_env: EnvFactory, worker_factory: WorkerFactory) -> None:
    port = free_port()
    env = test_env(lanes="fraud,history", web_port=str(port), drift_sample="0")
    settings = await ready_settings(env)
    worker = worker_factory(env, web=True)
    topic = settings.topic("fraud.requests")
    source = HistoryTransactionSource(seed=9, start_ts=time.time() - 86_400.0)
    seen: set[str] = set()
    first: list[dict[str, Any]] = []
    while len(first) < 200:  # one transaction for each of 200 cards
        for txn in source.take(400):
            if txn["card_id"] not in seen and len(first) < 200:
                seen.add(txn["card_id"])
                first.append(txn)
    later = source.take(200)
    for txn, card in zip(later, first, strict=True):
        txn["card_id"] = card["card_id"]  # the same cards again, from aiokafka
    partitions = settings.realtime_partitions
    moved = {t["card_id"] for t in first
             if partition_for(t["card_id"].encode(), partitions, "crc32")
             != partition_for(t["card_id"].encode(), partitions)}
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        # librdkafka with its default partitioner (consistent_random: CRC32 of the key).
        rdkafka = RdKafkaProducer({"bootstrap.servers": settings.kafka_bootstrap})
        for txn in first:
            txn["sent_at"] = time.time()
            rdkafka.produce(topic, key=txn["card_id"].encode(), value=orjson.dumps(txn))
        assert rdkafka.flush(30) == 0
        assert not await scores.wait_for({t["event_id"] for t in first}, timeout_s=30)
        producer = make_producer(settings)
        await producer.start()
        try:
            for txn in later:
                txn["sent_at"] = time.time()
            await BatchSender(producer).send(topic, [(t["card_id"].encode(), orjson.dumps(t))
                                                     for t in later])
        finally:
            await producer.stop()
        assert not await scores.wait_for({t["event_id"] for t in later}, timeout_s=30)
    results = scores.results
    flagged = {results[t["event_id"]]["card_id"] for t in first
               if results[t["event_id"]]["degraded_reason"] == "misrouted"}
    assert flagged == moved, (len(flagged), len(moved))
    assert all(results[t["event_id"]]["degraded"] for t in first)
    assert not [t for t in later if results[t["event_id"]]["degraded_reason"] == "misrouted"]
    text = await asyncio.to_thread(_metrics, port)
    assert _sum(text, "inferlane_misrouted_records_total", lane="fraud", topic=topic,
                likely="crc32") == len(moved)
    assert _sum(text, "inferlane_degraded_by_reason_total", lane="fraud",
                reason="misrouted") == len(moved)
    log = worker.log_text()
    assert "looks like librdkafka's default partitioner" in log and "murmur2_random" in log
    print(f"librdkafka then aiokafka for 200 cards: {len(moved)} misrouted (CRC32 != murmur2 for "
          f"{len(moved)} of 200 keys over {partitions} partitions), all flagged and counted")


async def test_the_pipelines_producers_follow_the_partitioner_setting(
        test_env: EnvFactory) -> None:
    """INFERLANE_PARTITIONER=crc32: the lanes' and load generator's sender places keys as
    librdkafka does (BatchSender partitions records itself: it must use the setting too)."""
    settings = await ready_settings(test_env(partitioner="crc32"))
    topic = settings.topic("fraud.requests")
    keys = [f"card-{i:04d}".encode() for i in range(64)]
    start = await snapshot_end_offsets(settings, topic)
    producer = make_producer(settings)
    await producer.start()
    try:
        await BatchSender(producer).send(topic, [(key, b"{}") for key in keys])
    finally:
        await producer.stop()
    consumer = await start_reader(settings, "partitioner-check")
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        placed: dict[bytes, int] = {}
        deadline = time.monotonic() + 20
        while len(placed) < len(keys) and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                placed.update({r.key: tp.partition for r in records if r.key is not None})
    finally:
        await consumer.stop()
    n = settings.realtime_partitions
    assert placed == {key: partition_for(key, n, "crc32") for key in keys}
    assert any(partition_for(key, n, "crc32") != partition_for(key, n) for key in keys)
