"""Security on the real local stack: a worker whose every Kafka client (lanes, readers, admin,
faust) authenticates with SASL/PLAIN against the broker's SASL_PLAINTEXT listener, a wrong
password and an unsupported mechanism refused with clear errors that hold no secret, S3 keys that
never reach a log or an error, and the maximum message size dead-lettering an oversized record.

The session broker (tests/integration/conftest.py) has a SASL_PLAINTEXT listener with one PLAIN
user whose password is drawn per session; TLS, SCRAM users and ACLs are tested on a secure broker
of their own (tests/integration/test_acls.py).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Callable

import orjson
import pytest

from pipeline.dev.loadgen import ResultReader, produce_transactions, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import LocalStack
from pipeline.errors import SinkError, TopicError
from pipeline.kafka.connection import make_consumer, make_producer, start_reader
from pipeline.kafka.topics import ensure_topics
from pipeline.s3.s3store import S3Store, retry
from pipeline.settings import Settings
from pipeline.training.synth import TransactionGenerator
from schemas import DeadLetter
from tests.integration.conftest import SASL_USER, EnvFactory, ready_settings, settings_from
from tests.integration.test_fraud_lane import _read_all, archived_lines

WorkerFactory = Callable[[dict[str, str]], WorkerProcess]
#: aiokafka's warning on every SASL/PLAIN authentication without TLS.
CLEARTEXT_WARNING = "Sending username and password in the clear"


@pytest.fixture
def secrets(local_stack: LocalStack) -> dict[str, str]:
    """The session broker's SASL password and S3 keys drawn for this test."""
    tag = uuid.uuid4().hex[:10]
    return {"kafka_sasl_password": local_stack.sasl_users[SASL_USER],
            "s3_access_key_id": f"AKIAKEY{tag}", "s3_secret_access_key": f"s3-secret-{tag}"}


@pytest.fixture
def sasl_env(test_env: EnvFactory, local_stack: LocalStack,
             secrets: dict[str, str]) -> EnvFactory:
    """test_env pointed at the SASL_PLAINTEXT listener, authenticating as the session user."""

    def make(**overrides: str) -> dict[str, str]:
        return test_env(**{"kafka_bootstrap": local_stack.sasl_bootstrap,
                           "kafka_security_protocol": "SASL_PLAINTEXT",
                           "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": SASL_USER,
                           **secrets, **overrides})
    return make


def _assert_no_secret(text: str, secrets: dict[str, str]) -> None:
    for name, value in secrets.items():
        assert value not in text, f"{name} leaked"


async def test_a_sasl_worker_with_s3_keys_scores_archives_and_logs_no_secret(
    sasl_env: EnvFactory, secrets: dict[str, str], worker_factory: WorkerFactory
) -> None:
    env = sasl_env(lanes="fraud,archive")
    settings = await ready_settings(env)
    assert settings.kafka_security_protocol == "SASL_PLAINTEXT"
    await ensure_topics(settings)  # the admin client over SASL
    worker = worker_factory(env)
    scores_topic = settings.topic("fraud.scores")
    scores = ResultReader(settings, scores_topic,
                          await snapshot_end_offsets(settings, scores_topic))
    async with scores:
        report = await produce_transactions(settings, rate_per_s=500, count=300, seed=3)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=60)
    assert await archived_lines(settings, scores_topic, len(report.valid_ids)) == len(
        report.valid_ids)
    worker.terminate(timeout_s=20)
    log = worker.log_text()
    # aiokafka warns once per SASL/PLAIN connection without TLS: the worker connected with SASL.
    # (How many of them are the lanes' is shown per client by the test below.)
    assert CLEARTEXT_WARNING in log
    _assert_no_secret(log, secrets)


async def test_every_client_factory_authenticates_with_sasl(
    sasl_env: EnvFactory, secrets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Each kind of client the pipeline builds does a SASL/PLAIN handshake on a real broker."""
    settings = settings_from(sasl_env())
    caplog.set_level(logging.INFO)

    def sasl_handshakes() -> int:
        count = sum(CLEARTEXT_WARNING in r.getMessage() for r in caplog.records)
        caplog.clear()
        return count

    await ensure_topics(settings)
    assert sasl_handshakes() >= 1, "admin client"
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("fraud.requests"), b"{}", key=b"k")
        assert sasl_handshakes() >= 1, "producer"
    finally:
        await producer.stop()
    reader = await start_reader(settings, "it-reader")
    try:
        await reader.topics()
        assert sasl_handshakes() >= 1, "reader"
    finally:
        await reader.stop()
    consumer = make_consumer(settings, "fraud")
    await consumer.start()
    try:
        await consumer.topics()
        assert sasl_handshakes() >= 1, "group consumer"
    finally:
        await consumer.stop()
    _assert_no_secret(caplog.text, secrets)


async def test_a_wrong_password_is_refused_with_a_clear_error_and_no_secret(
    sasl_env: EnvFactory, secrets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:10]}"
    settings = settings_from(sasl_env(kafka_sasl_password=wrong))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TopicError) as info:
        await ensure_topics(settings, timeout_s=5)
    # Kafka's own refusal reaches the user: the user name is in it, no password is.
    assert "Invalid username or password" in caplog.text + str(info.value)
    for text in (caplog.text, "".join(traceback.format_exception(info.value))):
        _assert_no_secret(text, {**secrets, "wrong password": wrong})


async def test_scram_reaches_the_broker_and_its_refusal_holds_no_password(
    sasl_env: EnvFactory, secrets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_from(sasl_env(kafka_sasl_mechanism="SCRAM-SHA-512"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TopicError) as info:
        await ensure_topics(settings, timeout_s=5)
    # The listener enables PLAIN only: Kafka refuses the handshake and says what it enables.
    assert "SaslHandShakeRequest_v1(mechanism='SCRAM-SHA-512')" in caplog.text
    assert "UnsupportedSaslMechanismError" in caplog.text
    assert "enabled_mechanisms=['PLAIN']" in caplog.text
    _assert_no_secret(caplog.text, secrets)
    _assert_no_secret("".join(traceback.format_exception(info.value)), secrets)


async def test_s3_errors_and_retry_logs_hold_no_key(
    test_env: EnvFactory, secrets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_from(test_env(**{k: v for k, v in secrets.items() if k.startswith("s3")}))
    failures: list[SinkError] = []
    async with S3Store(settings) as store:  # the real endpoint: a missing object (404)
        with pytest.raises(SinkError) as missing:
            await store.get(f"no/such/{uuid.uuid4().hex}")
        failures.append(missing.value)
    assert missing.value.retriable is False
    unreachable = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    async with S3Store(unreachable, max_attempts=1) as store:
        with pytest.raises(SinkError) as refused:
            await store.put("k", b"v")
        failures.append(refused.value)
        assert refused.value.retriable is True
        with pytest.raises(TimeoutError):  # retry() logs each failed attempt, then we give up
            await asyncio.wait_for(retry(lambda: store.get("k"), what="get k"), timeout=1.5)
    assert "S3: get k failed (attempt 1)" in caplog.text
    for exc in failures:
        _assert_no_secret("".join(traceback.format_exception(exc)), secrets)
    _assert_no_secret(caplog.text, secrets)


async def test_an_oversized_record_is_dead_lettered_as_too_large(
    test_env: EnvFactory, settings: Settings, worker_factory: WorkerFactory
) -> None:
    limit = 64 * 1024
    worker_factory(test_env(lanes="fraud", max_message_bytes=str(limit)))
    generator = TransactionGenerator(seed=9)
    big, _ = generator.next()
    raw = orjson.dumps({**big, "note": "x" * (100 * 1024)})  # valid JSON, valid shape
    good, _ = generator.next()
    dlq_topic = settings.topic("fraud.requests.dlq")
    scores_topic = settings.topic("fraud.scores")
    dlq = ResultReader(settings, dlq_topic, await snapshot_end_offsets(settings, dlq_topic))
    scores = ResultReader(settings, scores_topic,
                          await snapshot_end_offsets(settings, scores_topic))
    producer = make_producer(settings)
    async with dlq, scores:
        await producer.start()
        try:
            await producer.send_and_wait(settings.topic("fraud.requests"), raw, key=b"big")
            await producer.send_and_wait(settings.topic("fraud.requests"), orjson.dumps(good),
                                         key=b"good")
        finally:
            await producer.stop()
        assert await dlq.wait_for_count(1, timeout_s=30) == 1
        assert not await scores.wait_for({good["event_id"]}, timeout_s=30)
        assert big["event_id"] not in scores.results
        letters = await _read_all(settings, dlq_topic)
    assert [key for key, _ in letters] == [b"big"]
    letter = DeadLetter(**orjson.loads(letters[0][1]))
    assert letter.error == "too_large"
    assert letter.reason == (
        f"value: {len(raw)} bytes, more than the limit of {limit} bytes "
        f"(INFERLANE_MAX_MESSAGE_BYTES) (raw: the first 32768 of {len(raw)} bytes)")
    assert letter.raw_encoding == "utf-8" and letter.raw.encode() == raw[:32768]
    assert letter.lane == "fraud" and letter.topic == settings.topic("fraud.requests")
