"""The serverless fraud function on the recorded MSK and SQS events, without a broker.

Results go to an in-memory sender; a failing sender stands in for a broker that does not ack.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import serverless
from pipeline.features.fastfeatures import fast_features
from pipeline.inference.fraudscore import Features, Thresholds, decide
from pipeline.inference.model import OnnxScorer
from schemas import Transaction, validate_record

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "serverless"
MODEL_DIR = REPO / "models" / "fraud-v2"


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return event


class MemorySender:
    def __init__(self, fail_topics: Sequence[str] = ()) -> None:
        self.sent: dict[str, list[tuple[bytes | None, bytes]]] = {}
        self.fail_topics = set(fail_topics)

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        if topic in self.fail_topics:
            raise ConnectionError(f"broker did not ack {topic}")
        self.sent.setdefault(topic, []).extend(records)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[serverless.FunctionRuntime]:
    monkeypatch.setenv("INFERLANE_FRAUD_MODEL_DIR", str(MODEL_DIR))
    monkeypatch.setenv("INFERLANE_TOPIC_PREFIX", "u.")
    serverless.reset_runtime()
    rt = serverless.runtime()
    rt.sender = MemorySender()
    yield rt
    serverless.reset_runtime()


def expected_records(event: dict[str, Any]) -> list[tuple[Any, bytes | None]]:
    """(itemIdentifier, raw value) straight from the event, decoded independently."""
    if "records" in event:
        out = []
        for group, records in event["records"].items():
            for r in records:
                try:
                    value = base64.b64decode(r["value"], validate=True)
                except ValueError:
                    value = None
                out.append(({"topic-partition": group, "offset": r["offset"]}, value))
        return out
    return [(r["messageId"], r["body"].encode()) for r in event["Records"]]


@pytest.mark.parametrize("name,source,n", [("msk_event.json", "aws:kafka", 16),
                                           ("sqs_event.json", "aws:sqs", 8)])
def test_parse_event_decodes_values_and_identifiers(name: str, source: str, n: int) -> None:
    event = load_event(name)
    got_source, records = serverless.parse_event(event)
    assert got_source == source
    assert len(records) == n
    for record, (item_id, value) in zip(records, expected_records(event), strict=True):
        assert record.item_id == item_id
        if value is None:
            assert record.problem is not None and record.problem.error == "invalid_encoding"
        else:
            assert record.value == value
            assert record.problem is None


def test_msk_keys_partitions_offsets() -> None:
    event = load_event("msk_event.json")
    _, records = serverless.parse_event(event)
    raw = [r for rs in event["records"].values() for r in rs]
    for record, original in zip(records, raw, strict=True):
        assert record.key == base64.b64decode(original["key"])
        assert (record.topic, record.partition, record.offset) == (
            original["topic"], original["partition"], original["offset"])
        assert record.key.startswith(b"card-")


def test_unknown_event_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="not an MSK/Kafka or SQS"):
        serverless.parse_event({"Records": None, "detail-type": "x"})
    with pytest.raises(ValueError, match="unsupported record source"):
        serverless.parse_event({"Records": [{"eventSource": "aws:kinesis", "messageId": "1"}]})


@pytest.mark.parametrize("name", ["msk_event.json", "sqs_event.json"])
def test_valid_records_scored_bad_ones_dead_lettered_none_failed(
        runtime: serverless.FunctionRuntime, name: str) -> None:
    event = load_event(name)
    response = serverless.handler(event, None)
    assert response == {"batchItemFailures": []}
    sender = runtime.sender
    assert isinstance(sender, MemorySender)
    valid, bad, undecodable = [], [], 0
    for _, value in expected_records(event):
        if value is None:
            undecodable += 1
            continue
        data, rejection = validate_record(value, Transaction)
        if data is not None:
            valid.append(data)
        else:
            bad.append(rejection)
    assert valid and bad
    scores = [orjson.loads(v) for _, v in sender.sent["u.fraud.scores"]]
    assert [s["event_id"] for s in scores] == [t["event_id"] for t in valid]
    assert [k for k, _ in sender.sent["u.fraud.scores"]] == [t["card_id"].encode()
                                                             for t in valid]
    # The lane's own no-history path, computed here from its pieces.
    scorer = OnnxScorer.load(MODEL_DIR, "int8")
    x, degraded = Features(fast_features(valid), None, None).for_model(scorer)
    expected = scorer.predict(x)
    decisions = decide(expected, Thresholds.for_model(runtime.settings, scorer))
    assert [s["score"] for s in scores] == expected.tolist()
    assert [s["decision"] for s in scores] == decisions
    assert all(s["degraded"] is True for s in scores) and degraded.all()
    assert {s["model_version"] for s in scores} == {"fraud-v2-int8"}
    letters = [orjson.loads(v) for _, v in sender.sent["u.fraud.requests.dlq"]]
    assert undecodable == (1 if name == "msk_event.json" else 0)
    assert len(letters) == len(bad) + undecodable
    for letter, rejection in zip([x for x in letters if x["error"] != "invalid_encoding"], bad,
                                 strict=True):
        assert rejection is not None
        assert (letter["error"], letter["reason"]) == (rejection.error, rejection.reason)
        assert letter["lane"] == "fraud"


def test_sqs_dead_letters_keyed_by_message_id(runtime: serverless.FunctionRuntime) -> None:
    event = load_event("sqs_event.json")
    serverless.handler(event, None)
    sender = runtime.sender
    assert isinstance(sender, MemorySender)
    keys = [k for k, _ in sender.sent["u.fraud.requests.dlq"]]
    bad_ids = [r["messageId"].encode() for r in event["Records"]
               if validate_record(r["body"].encode(), Transaction)[0] is None]
    assert keys == bad_ids and len(keys) == 3
    letter = orjson.loads(sender.sent["u.fraud.requests.dlq"][0][1])
    assert (letter["topic"], letter["partition"], letter["offset"]) == (
        event["Records"][0]["eventSourceARN"], -1, -1)


def test_bad_base64_value_is_a_dead_letter_with_its_text(
        runtime: serverless.FunctionRuntime) -> None:
    serverless.handler(load_event("msk_event.json"), None)
    sender = runtime.sender
    assert isinstance(sender, MemorySender)
    letters = [orjson.loads(v) for _, v in sender.sent["u.fraud.requests.dlq"]]
    [letter] = [x for x in letters if x["error"] == "invalid_encoding"]
    assert letter["raw"] == "eyJub3QiOiJiYXNlNjQ*!"
    assert letter["reason"].startswith("value: not valid base64")
    assert (letter["partition"], letter["offset"]) == (1, 23902)


def test_model_loaded_once_and_cold_start_measured(
        runtime: serverless.FunctionRuntime, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    loads = 0
    real_load = OnnxScorer.load

    def counting_load(*args: Any, **kwargs: Any) -> OnnxScorer:
        nonlocal loads
        loads += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(OnnxScorer, "load", counting_load)
    assert runtime.cold_start_s > 0
    scorer = runtime.scorer
    caplog.set_level("INFO", logger="pipeline.serverless")
    for _ in range(3):
        serverless.handler(load_event("sqs_event.json"), None)
    assert serverless.runtime() is runtime and runtime.scorer is scorer
    assert loads == 0 and runtime.invocations == 3
    lines = [json.loads(r.getMessage().split("serverless: ", 1)[1]) for r in caplog.records
             if '"source"' in r.getMessage()]
    assert [line["cold_start"] for line in lines] == [True, False, False]
    assert {line["cold_start_s"] for line in lines} == {runtime.cold_start_s}
    serverless.reset_runtime()  # a new process: loads again
    fresh = serverless.runtime()
    assert loads == 1 and fresh is not runtime and fresh.cold_start_s > 0


@pytest.mark.parametrize("name", ["msk_event.json", "sqs_event.json"])
def test_unacked_scores_are_batch_item_failures(runtime: serverless.FunctionRuntime,
                                                name: str) -> None:
    runtime.sender = MemorySender(fail_topics=["u.fraud.scores"])
    event = load_event(name)
    response = serverless.handler(event, None)
    valid_ids = [item for item, value in expected_records(event)
                 if value is not None and validate_record(value, Transaction)[0] is not None]
    assert response == {"batchItemFailures": [{"itemIdentifier": i} for i in valid_ids]}
    assert len(valid_ids) in (10, 5)
    # The producer is dropped after a failure, so the next invocation reconnects.
    assert runtime.sender is None


def test_unacked_dead_letters_are_failures_too(runtime: serverless.FunctionRuntime) -> None:
    runtime.sender = MemorySender(fail_topics=["u.fraud.requests.dlq"])
    event = load_event("sqs_event.json")
    response = serverless.handler(event, None)
    bad_ids = [r["messageId"] for r in event["Records"]
               if validate_record(r["body"].encode(), Transaction)[0] is None]
    assert response == {"batchItemFailures": [{"itemIdentifier": i} for i in bad_ids]}


def test_send_timeout_capped_by_remaining_time(runtime: serverless.FunctionRuntime) -> None:
    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 2_000

    assert runtime._budget_s(Context()) == pytest.approx(1.5)
    assert runtime._budget_s(None) == runtime.settings.serverless_send_timeout_ms / 1000.0


def test_a_send_that_hangs_past_the_budget_fails_its_records(
        runtime: serverless.FunctionRuntime) -> None:
    class Hanging(MemorySender):
        async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
            if topic.endswith("scores"):
                await asyncio.sleep(60)
            await super().send(topic, records)

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 700  # 0.2 s budget after the margin

    runtime.sender = Hanging()
    event = load_event("msk_event.json")
    response = serverless.handler(event, Context())
    failures = [f["itemIdentifier"] for f in response["batchItemFailures"]]
    assert len(failures) == 10
    assert all(isinstance(f, dict) and set(f) == {"topic-partition", "offset"} for f in failures)
    assert np.all([f["topic-partition"].startswith("fraud.requests-") for f in failures])
