"""The serverless fraud function against the real local broker: the recorded MSK and SQS
events go through ``pipeline.serverless.handler``; the scores and dead letters are read back
from the test's topics. Also: a broker that is not there makes every record a failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from pipeline import serverless
from pipeline.dev.loadgen import snapshot_end_offsets
from pipeline.features.fastfeatures import fast_features
from pipeline.inference.fraudscore import Features, Thresholds, decide
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import model_path_now
from pipeline.kafka.connection import start_reader
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings
from schemas import Transaction, validate_record
from tests.integration.conftest import EnvFactory, settings_from

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "serverless"


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return event


@pytest.fixture
def function_env(test_env: EnvFactory,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, EnvFactory]]:
    """Point the function's settings (read from INFERLANE_*) at this test's topics."""

    def apply(**overrides: str) -> Settings:
        env = test_env(**overrides)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        serverless.reset_runtime()
        return settings_from(env)

    settings = apply()
    asyncio.run(ensure_topics(settings))
    yield settings, apply  # type: ignore[misc]
    serverless.reset_runtime()


async def read_values(settings: Settings, topic: str, start: dict[TopicPartition, int],
                      count: int, timeout_s: float = 15.0) -> list[tuple[bytes | None, bytes]]:
    """Read (key, value) from ``start`` until ``count`` arrived, then 0.5 s more (extras)."""
    consumer = await start_reader(settings, "serverless-test")
    consumer.assign(list(start))
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    out: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout_s
    settle: float | None = None
    try:
        while time.monotonic() < (settle or deadline):
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                out.extend((r.key, r.value or b"") for r in records)
            if len(out) >= count and settle is None:
                settle = time.monotonic() + 0.5
    finally:
        await consumer.stop()
    return out


def decoded(event: dict[str, Any]) -> list[tuple[Any, bytes | None, bytes | None]]:
    """(itemIdentifier, key, raw value or None when not base64) from the event itself."""
    if "records" in event:
        out = []
        for group, records in event["records"].items():
            for r in records:
                try:
                    value: bytes | None = base64.b64decode(r["value"], validate=True)
                except ValueError:
                    value = None
                out.append(({"topic-partition": group, "offset": r["offset"]},
                            base64.b64decode(r["key"]), value))
        return out
    return [(r["messageId"], r["messageId"].encode(), r["body"].encode())
            for r in event["Records"]]


@pytest.mark.parametrize("name", ["msk_event.json", "sqs_event.json"])
def test_recorded_event_scores_and_dead_letters_land_on_kafka(
        function_env: tuple[Settings, Any], name: str) -> None:
    settings, _ = function_env
    scores_topic, dlq_topic = settings.topic("fraud.scores"), settings.topic("fraud.requests.dlq")
    starts = {t: asyncio.run(snapshot_end_offsets(settings, t)) for t in (scores_topic,
                                                                            dlq_topic)}
    event = load_event(name)
    valid: list[dict[str, Any]] = []
    bad: dict[bytes, tuple[str, str]] = {}  # DLQ key -> (error, reason)
    for _, key, value in decoded(event):
        if value is None:
            assert key is not None
            bad[key] = ("invalid_encoding", "value: not valid base64")
            continue
        data, rejection = validate_record(value, Transaction)
        if data is not None:
            valid.append(data)
        else:
            assert rejection is not None and key is not None
            bad[key] = (rejection.error, rejection.reason)
    assert len(valid) >= 5 and len(bad) >= 3

    rt = serverless.runtime()  # the init phase: model load + warm-up
    began = time.monotonic()
    response = serverless.handler(event, None)
    took_ms = (time.monotonic() - began) * 1000
    print(f"\n{name}: init (model load + warm-up) {rt.cold_start_s * 1000:.1f} ms; first "
          f"invocation, {len(valid) + len(bad)} records incl. producer connect: {took_ms:.1f} ms")
    began = time.monotonic()
    again = serverless.handler({**event, "records": {}} if "records" in event else
                               {"Records": []}, None)
    print(f"{name}: empty batch on the warm function in "
          f"{(time.monotonic() - began) * 1000:.1f} ms")
    assert response == again == {"batchItemFailures": []}

    scores = asyncio.run(read_values(settings, scores_topic, starts[scores_topic], len(valid)))
    letters = asyncio.run(read_values(settings, dlq_topic, starts[dlq_topic], len(bad)))
    by_id = {orjson.loads(v)["event_id"]: (k, orjson.loads(v)) for k, v in scores}
    assert len(scores) == len(by_id) == len(valid), "one score per valid record, no extras"

    # What the lane computes for these transactions with no history snapshot.
    scorer = OnnxScorer.load(model_path_now(settings, "fraud"), settings.fraud_model_precision)
    x, degraded = Features(fast_features(valid), None, None).for_model(scorer)
    expected = scorer.predict(x).tolist()
    decisions = decide(scorer.predict(x), Thresholds.for_model(settings, scorer))
    for txn, score, decision, flag in zip(valid, expected, decisions, degraded.tolist(),
                                          strict=True):
        key, got = by_id[txn["event_id"]]
        assert key == txn["card_id"].encode()
        assert got["score"] == score and got["decision"] == decision
        assert got["degraded"] is flag is True
        assert got["model_version"] == scorer.version and got["card_id"] == txn["card_id"]

    assert len(letters) == len(bad), "one dead letter per invalid record, no extras"
    for key, value in letters:
        letter = orjson.loads(value)
        assert key is not None and key in bad
        error, reason = bad.pop(key)
        assert letter["error"] == error and letter["reason"].startswith(reason)
        assert letter["lane"] == "fraud"
    assert not bad


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_unreachable_broker_reports_every_record(function_env: tuple[Settings, Any]) -> None:
    _, apply = function_env
    apply(kafka_bootstrap=f"127.0.0.1:{_closed_port()}", serverless_send_timeout_ms="3000")
    event = load_event("msk_event.json")
    began = time.monotonic()
    response = serverless.handler(event, None)
    took_s = time.monotonic() - began
    expected = [{"itemIdentifier": item} for item, _, _ in decoded(event)]
    assert response["batchItemFailures"] == expected
    assert took_s < 10
    # The model stays loaded; only the producer is retried on the next invocation.
    rt = serverless.runtime()
    assert rt.producer is None and rt.sender is None and rt.invocations == 1
    sqs = load_event("sqs_event.json")
    assert serverless.handler(sqs, None)["batchItemFailures"] == [
        {"itemIdentifier": r["messageId"]} for r in sqs["Records"]]
