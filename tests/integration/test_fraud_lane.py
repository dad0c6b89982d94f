"""The fraud lane end to end on the real local stack: a worker process, real Kafka protocol,
real S3 endpoint. Every valid event gets exactly one score; every invalid kind one dead letter
naming its problem; the archive holds exactly the scores that were produced.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable

import msgspec
import numpy as np
import orjson
from aiokafka import TopicPartition

from pipeline.dev.loadgen import ResultReader, produce_transactions, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.inference.model import load_card
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.connection import make_producer, topic_partitions
from pipeline.s3.s3store import S3Store
from pipeline.settings import Settings
from pipeline.training.synth import (
    INVALID_KINDS,
    TransactionGenerator,
    invalid_reason_field,
    make_invalid,
)
from schemas import DeadLetter, FraudScore
from tests.integration.conftest import EnvFactory, ready_settings

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]


async def _readers(settings: Settings) -> tuple[ResultReader, ResultReader]:
    scores = settings.topic("fraud.scores")
    dlq = settings.topic("fraud.requests.dlq")
    return (ResultReader(settings, scores, await snapshot_end_offsets(settings, scores)),
            ResultReader(settings, dlq, await snapshot_end_offsets(settings, dlq)))


async def test_every_valid_event_gets_one_score(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    worker_factory(test_env(lanes="fraud"))
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        report = await produce_transactions(settings, rate_per_s=2000, count=3000, seed=11)
        missing = await scores.wait_for(set(report.valid_ids), timeout_s=30)
        assert not missing, f"{len(missing)} events without a score"
        assert scores.duplicates == 0
        assert dlq.records == 0
    card = load_card(await fraud_model_path(settings))
    thresholds = card.thresholds
    assert set(scores.results) == set(report.valid_ids)
    for value in scores.results.values():
        score = msgspec.convert(value, FraudScore)
        assert 0.0 <= score.score <= 1.0
        expected = ("decline" if score.score >= thresholds["decline"] else
                    "review" if score.score >= thresholds["review"] else "approve")
        assert score.decision == expected
        assert score.model_version == f"{card.name}-{card.version}-int8"
    decisions = {v["decision"] for v in scores.results.values()}
    # Declines are rare (about 0.3% of this traffic): a 3,000-event run may have none.
    assert {"approve", "review"} <= decisions


async def test_each_invalid_kind_is_dead_lettered_with_its_reason(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    worker_factory(test_env(lanes="fraud"))
    generator = TransactionGenerator(seed=5)
    rng = np.random.default_rng(5)
    sent: dict[bytes, str] = {}
    good_ids = set()
    producer = make_producer(settings)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        await producer.start()
        try:
            for kind in INVALID_KINDS:
                txn, _ = generator.next()
                raw = make_invalid(kind, rng, txn)
                sent[raw] = kind
                await producer.send_and_wait(settings.topic("fraud.requests"), raw,
                                             key=kind.encode())
                good, _ = generator.next()
                good_ids.add(good["event_id"])
                await producer.send_and_wait(settings.topic("fraud.requests"),
                                             orjson.dumps(good), key=b"good")
        finally:
            await producer.stop()
        assert await dlq.wait_for_count(len(INVALID_KINDS), timeout_s=30) == len(INVALID_KINDS)
        assert not await scores.wait_for(good_ids, timeout_s=30)
        letters = await _read_all(settings, settings.topic("fraud.requests.dlq"))
    assert len(letters) == len(INVALID_KINDS)
    seen_kinds = set()
    for key, value in letters:
        letter = msgspec.convert(orjson.loads(value), DeadLetter)
        kind = key.decode()
        seen_kinds.add(kind)
        raw = letter.raw.encode() if letter.raw_encoding == "utf-8" else __import__(
            "base64").b64decode(letter.raw)
        assert sent[raw] == kind, "the dead letter carries the original value"
        assert letter.reason.startswith(invalid_reason_field(kind)), (kind, letter.reason)
        assert letter.topic == settings.topic("fraud.requests")
        assert letter.offset >= 0 and letter.lane == "fraud"
    assert seen_kinds == set(INVALID_KINDS)


async def _read_all(settings: Settings, topic: str) -> list[tuple[bytes, bytes]]:
    """Every record of ``topic`` from the beginning: (key, value)."""
    from aiokafka import AIOKafkaConsumer

    from pipeline.kafka.connection import client_kwargs

    consumer = AIOKafkaConsumer(**client_kwargs(settings, client_id="test-read"),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = sorted(await topic_partitions(consumer, topic))
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, "could not read the topic to its end"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend((r.key or b"", r.value or b"") for r in records)
        return out
    finally:
        await consumer.stop()


async def archived(settings: Settings, topic: str) -> dict[str, list[bytes]]:
    """Every archive object of ``topic``: key -> its JSONL lines."""
    objects: dict[str, list[bytes]] = {}
    async with S3Store(settings) as store:
        async for key in store.list_keys(f"results/{topic}/"):
            objects[key] = gzip.decompress(await store.get(key)).splitlines()
    return objects


async def archived_lines(settings: Settings, topic: str, expected: int) -> int:
    """How many result lines the archive holds for ``topic``: as soon as ``expected``, else
    after about 30 s (the archive closes a window after 1 s in test_env)."""
    lines = 0
    for _ in range(60):
        lines = sum(len(found) for found in (await archived(settings, topic)).values())
        if lines >= expected:
            break
        await asyncio.sleep(0.5)
    return lines


def offsets_by_partition(keys: list[str]) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for key in keys:
        partition, first, last = key.rsplit("/", 1)[1].split(".", 1)[0].split("-")
        ranges.setdefault(int(partition), []).append((int(first), int(last)))
    return {p: sorted(r) for p, r in ranges.items()}


async def test_archive_holds_exactly_the_scores(
    test_env: EnvFactory, worker_factory: WorkerFactory
) -> None:
    env = test_env(archive_max_bytes="20000")
    settings = await ready_settings(env)
    worker = worker_factory(env)
    scores, dlq = await _readers(settings)
    async with scores, dlq:
        report = await produce_transactions(settings, rate_per_s=3000, count=4000, seed=3,
                                            invalid_fraction=0.02)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=30)
    assert worker.terminate() == 0, worker.log_tail()  # graceful: the archive writes its windows
    topic = settings.topic("fraud.scores")
    on_topic = sorted(value for _, value in await _read_all(settings, topic))
    objects = await archived(settings, topic)
    in_s3 = sorted(line for lines in objects.values() for line in lines)
    assert len(objects) > 4, "size-bound windows: several objects per partition"
    assert in_s3 == on_topic, "the archive holds exactly the records of fraud.scores"
    assert len(on_topic) == len(report.valid_ids)
    for partition, ranges in offsets_by_partition(list(objects)).items():
        expected_first = 0
        for first, last in ranges:
            assert first == expected_first, (partition, ranges)
            expected_first = last + 1
    for key, lines in objects.items():
        first, last = offsets_by_partition([key]).popitem()[1][0]
        assert len(lines) == last - first + 1
