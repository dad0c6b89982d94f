"""Kafka security for real, on a broker of its own: a TLS listener with a certificate of the
stack's throwaway CA, SCRAM-SHA-512 users created through the Admin API, and the standard
authorizer denying whatever no ACL allows (the stack's admin is the only super user).

Every process runs as its own user with exactly the ACL set ``inferlane acls`` prints for its
role (docs/security.md), applied with Kafka's own ACL tool.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError

from pipeline.clients.laneclients import FraudClient, RecoClient
from pipeline.dev.loadgen import ResultReader, produce_transactions, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import LocalStack, StackEndpoints
from pipeline.dev.tls import make_ca
from pipeline.errors import StackError, TopicError
from pipeline.features.cardhistory import CardHistory, from_bytes
from pipeline.kafka.acls import acl_arguments, role_grants
from pipeline.kafka.connection import (
    KafkaAccessError,
    make_producer,
    start_reader,
    topic_partitions,
)
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings
from pipeline.training.synth import TransactionGenerator
from schemas import FraudScore, RecoResult
from tests.integration.conftest import (
    REPO,
    EnvFactory,
    ServiceFactory,
    ready_settings,
    settings_from,
)
from tests.integration.test_fraud_lane import _read_all, archived_lines

WorkerFactory = Callable[..., WorkerProcess]
WORKER_LANES = ("fraud", "reco", "archive", "batch")
"""The lanes of the worker whose ACL set docs/security.md gives (the history worker is apart)."""


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("secure-stack"), fresh=True, secure=True)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def endpoints(secure_stack: LocalStack) -> StackEndpoints:
    """This module's test_env points at the secure stack (its S3 server too)."""
    return secure_stack.endpoints


@dataclass(frozen=True)
class User:
    name: str
    password: str


@pytest.fixture
def admin_env(test_env: EnvFactory, secure_stack: LocalStack) -> dict[str, str]:
    """The stack's admin (super user) on the node's own listener: creates the topics."""
    assert secure_stack.secured is not None
    return test_env(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                    kafka_sasl_username=secure_stack.secured.admin_user,
                    kafka_sasl_password=secure_stack.secured.admin_password)


def user_env(test_env: EnvFactory, stack: LocalStack, user: User, **overrides: str
             ) -> dict[str, str]:
    """``user`` over SASL_SSL with SCRAM-SHA-512, trusting the stack's CA."""
    return test_env(**{"kafka_bootstrap": stack.tls_bootstrap,
                       "kafka_security_protocol": "SASL_SSL",
                       "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": user.name,
                       "kafka_sasl_password": user.password,
                       "kafka_ssl_cafile": str(stack.ca_file), **overrides})


def new_user(stack: LocalStack, role: str, settings: Settings,
             lanes: tuple[str, ...] | None = None) -> User:
    """A SCRAM user of its own with the ACL set of ``role`` (as `inferlane acls` prints it)."""
    name = f"{role}-{uuid.uuid4().hex[:8]}"
    env = stack.add_user(name, acl_arguments(f"User:{name}", role_grants(role, settings, lanes)))
    return User(name, env["INFERLANE_KAFKA_SASL_PASSWORD"])


def denials(stack: LocalStack, user: User) -> list[str]:
    """The authorizer's log lines of requests of ``user`` it denied (kafka.authorizer.logger
    logs every denial at INFO)."""
    text = "".join(p.log_path.read_text(errors="replace") for p in stack.brokers.values())
    return [line for line in text.splitlines()
            if f"Principal = User:{user.name} is Denied" in line]


def _assert_no_secret(text: str, *passwords: str) -> None:
    for password in passwords:
        assert password not in text, "a password leaked"



async def test_a_worker_with_its_acls_only_scores_and_archives_over_sasl_ssl(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    worker_factory: WorkerFactory
) -> None:
    admin = await ready_settings(admin_env)  # the topics, created by the admin
    worker_user = new_user(secure_stack, "worker", admin, WORKER_LANES)
    producer_user = new_user(secure_stack, "producer", admin)
    worker = worker_factory(user_env(test_env, secure_stack, worker_user,
                                     lanes=",".join(WORKER_LANES)))
    producer = settings_from(user_env(test_env, secure_stack, producer_user))
    scores_topic = admin.topic("fraud.scores")
    scores = ResultReader(admin, scores_topic, await snapshot_end_offsets(admin, scores_topic))
    async with scores:
        report = await produce_transactions(producer, rate_per_s=500, count=300, seed=3)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=60)
    assert await archived_lines(admin, scores_topic, len(report.valid_ids)) == len(
        report.valid_ids)
    worker.terminate(timeout_s=20)
    # The set is enough: not one request of the worker or the producer was denied.
    assert denials(secure_stack, worker_user) == []
    assert denials(secure_stack, producer_user) == []
    _assert_no_secret(worker.log_text(), worker_user.password)


async def test_an_exactly_once_worker_with_its_acls_only_commits_its_transactions(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    worker_factory: WorkerFactory
) -> None:
    admin = await ready_settings({**admin_env, "INFERLANE_DELIVERY": "exactly_once"})
    grants = role_grants("worker", admin, WORKER_LANES)
    assert [g.name for g in grants if g.resource == "transactional-id"] == [
        f"{admin.app_id}-fraud-", f"{admin.app_id}-reco-"]
    worker_user = new_user(secure_stack, "worker", admin, WORKER_LANES)
    producer_user = new_user(secure_stack, "producer", admin)
    worker = worker_factory(user_env(test_env, secure_stack, worker_user,
                                     lanes=",".join(WORKER_LANES), delivery="exactly_once"))
    producer = settings_from(user_env(test_env, secure_stack, producer_user))
    scores_topic = admin.topic("fraud.scores")
    scores = ResultReader(admin, scores_topic, await snapshot_end_offsets(admin, scores_topic))
    async with scores:  # read_committed: what the worker's transactions committed
        report = await produce_transactions(producer, rate_per_s=500, count=300, seed=4)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=60)
    worker.terminate(timeout_s=20)
    log = worker.log_text()
    assert "exactly-once, transactions of" in log  # the lane ran transactional
    assert f"for transactional id {admin.app_id}-fraud-{admin.topic('fraud.requests')}-" in log
    assert denials(secure_stack, worker_user) == []


async def test_a_history_worker_with_its_acls_only_keeps_the_history(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    worker_factory: WorkerFactory
) -> None:
    admin = await ready_settings(admin_env)
    history_user = new_user(secure_stack, "worker", admin, ("history",))
    producer_user = new_user(secure_stack, "producer", admin)
    worker = worker_factory(user_env(test_env, secure_stack, history_user, lanes="history"))
    producer = settings_from(user_env(test_env, secure_stack, producer_user))
    report = await produce_transactions(producer, rate_per_s=500, count=300, seed=5)
    changelog = admin.topic("fraud.history.changelog")

    async def latest() -> dict[bytes, CardHistory]:
        return {key: from_bytes(value) for key, value in await _read_all(admin, changelog)
                if value}

    async def wait(check: Callable[[dict[bytes, CardHistory]], bool]) -> dict[bytes, CardHistory]:
        for _ in range(60):
            if check(states := await latest()):
                return states
            await asyncio.sleep(0.5)
        raise AssertionError("the history never got there")

    states = await wait(lambda st: report.valid_ids[-1] in {h.last_event_id for h in st.values()})
    assert {h.last_event_id for h in states.values()} <= set(report.valid_ids)
    # A chargeback (fraud.labels) is counted; an invalid label is dead-lettered.
    card = sorted(states)[0]
    labels = make_producer(producer)
    await labels.start()
    try:
        await labels.send_and_wait(admin.topic("fraud.labels"), orjson.dumps(
            {"event_id": states[card].last_event_id, "card_id": card.decode(),
             "label": "chargeback", "ts": states[card].last_ts + 60}), key=card)
        await labels.send_and_wait(admin.topic("fraud.labels"), b"{not json", key=card)
    finally:
        await labels.stop()
    await wait(lambda st: st[card].chargebacks == 1)
    for _ in range(60):
        if letters := await _read_all(admin, admin.topic("fraud.labels.dlq")):
            break
        await asyncio.sleep(0.5)
    assert [key for key, _ in letters] == [card]
    worker.terminate(timeout_s=20)
    assert denials(secure_stack, history_user) == []


async def test_services_and_clients_with_their_acls_only_over_sasl_ssl(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    worker_factory: WorkerFactory, service_factory: ServiceFactory
) -> None:
    admin = await ready_settings(admin_env)
    worker_user = new_user(secure_stack, "worker", admin, WORKER_LANES)
    services_user = new_user(secure_stack, "services", admin)
    worker_factory(user_env(test_env, secure_stack, worker_user, lanes=",".join(WORKER_LANES)))
    services_env = user_env(test_env, secure_stack, services_user)
    fraud_check = service_factory("fraud-check", services_env, "--budget-ms", "5000")
    recommendations = service_factory("recommendations", services_env, "--deadline-ms", "5000")
    txn = TransactionGenerator(seed=81).next()[0]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fraud_check.url}/v1/check", json=txn) as response:
            assert response.status == 200
            body = await response.json()
        assert body["event_id"] == txn["event_id"] and body["fallback"] is False
        async with session.post(f"{recommendations.url}/v1/recommend",
                                json={"user_id": "user-000042", "k": 5}) as response:
            assert response.status == 200, await response.text()
            fresh = await response.json()
        assert (fresh["source"], len(fresh["items"])) == ("pipeline", 5), fresh
    # The clients the services are built on, in this process, as the same user.
    services = settings_from(services_env)
    async with FraudClient(services) as fraud, RecoClient(services) as reco:
        score = await fraud.score(TransactionGenerator(seed=82).next()[0], timeout_ms=10_000)
        assert isinstance(score, FraudScore)
        result = await reco.recommend("user-000042", k=3, timeout_ms=10_000)
        assert isinstance(result, RecoResult) and len(result.items) == 3
    fraud_check.terminate(timeout_s=15)
    recommendations.terminate(timeout_s=15)
    assert denials(secure_stack, services_user) == []
    assert denials(secure_stack, worker_user) == []


async def test_a_wrong_password_is_refused_with_an_error_naming_the_setting(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    admin = await ready_settings(admin_env)
    user = new_user(secure_stack, "producer", admin)
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    env = user_env(test_env, secure_stack, User(user.name, wrong))
    settings = settings_from(env)
    caplog.set_level(logging.DEBUG)
    producer = make_producer(settings)
    with pytest.raises(KafkaAccessError) as refused:
        await producer.start()
    await producer.stop()
    message = str(refused.value)
    assert f"refused the SASL/SCRAM-SHA-512 login of user '{user.name}'" in message
    assert "INFERLANE_KAFKA_SASL_USERNAME and INFERLANE_KAFKA_SASL_PASSWORD" in message
    assert "invalid credentials" in message  # the broker's own words
    with pytest.raises(TopicError, match="INFERLANE_KAFKA_SASL_PASSWORD"):
        await ensure_topics(settings, timeout_s=15)
    # A worker exits at start with the same words in its log.
    worker = WorkerProcess(env, tmp_path / "worker.log", cwd=REPO)
    with pytest.raises(StackError, match="exited during start-up"):
        worker.start(ready_timeout_s=60)
    worker.terminate(timeout_s=10)
    worker_log = worker.log_text()
    assert "INFERLANE_KAFKA_SASL_PASSWORD" in worker_log
    # The command line says the same in one line, and exits non-zero.
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "topics", "create"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0
    assert "INFERLANE_KAFKA_SASL_PASSWORD" in done.stdout + done.stderr
    for text in (caplog.text, "".join(traceback.format_exception(refused.value)),
                 done.stdout, done.stderr, worker_log):
        _assert_no_secret(text, wrong, user.password)


async def test_without_its_acl_a_user_cannot_read_scores_or_write_requests(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack
) -> None:
    admin = await ready_settings(admin_env)
    # A producer of fraud requests has no Read on fraud.scores...
    producer_user = new_user(secure_stack, "producer", admin)
    producer = settings_from(user_env(test_env, secure_stack, producer_user))
    scores = TopicPartition(admin.topic("fraud.scores"), 0)
    writer = make_producer(admin)  # scores there to read, written by the admin
    await writer.start()
    try:
        for i in range(3):
            await writer.send_and_wait(scores.topic, b"{}", key=b"%d" % i, partition=0)
    finally:
        await writer.stop()
    reader = await start_reader(producer, "it-no-read")
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=(
                f"topic {scores.topic}: user '{producer_user.name}' may not read or "
                f"describe it")):
            await topic_partitions(reader, scores.topic)
        reader.assign([scores])
        reader.seek(scores, 0)
        # aiokafka logs "Topic ... is not authorized for this client" and fetches nothing.
        assert await reader.getmany(timeout_ms=3000) == {}
    finally:
        await reader.stop()
    with pytest.raises(TopicAuthorizationFailedError):  # the pipeline's client says so
        async with FraudClient(producer):
            pass
    # No Read means no Describe either: the broker hides the topic's metadata from the user.
    assert any("operation = DESCRIBE" in line and scores.topic in line
               for line in denials(secure_stack, producer_user))
    # ...and the batch client (Write on batch.jobs only) no Write on fraud.requests.
    batch_user = new_user(secure_stack, "batch-client", admin)
    batch = settings_from(user_env(test_env, secure_stack, batch_user))
    sender = make_producer(batch)
    await sender.start()
    try:
        await sender.send_and_wait(batch.topic("batch.jobs"), b"{}", key=b"ok")  # its right
        with pytest.raises(TopicAuthorizationFailedError):
            await sender.send_and_wait(batch.topic("fraud.requests"),
                                       orjson.dumps({"event_id": "x"}), key=b"card")
    finally:
        await sender.stop()
    requests = batch.topic("fraud.requests")
    assert any("operation = DESCRIBE" in line and requests in line  # its metadata, first
               for line in denials(secure_stack, batch_user))


async def test_a_client_trusting_another_ca_is_refused(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack, tmp_path: Path
) -> None:
    admin = await ready_settings(admin_env)
    user = new_user(secure_stack, "producer", admin)
    other = make_ca(tmp_path / "other-ca", common_name="another CA")
    settings = settings_from(user_env(test_env, secure_stack, user,
                                      kafka_ssl_cafile=str(other.cert_path)))
    producer = make_producer(settings)
    with pytest.raises(KafkaAccessError) as refused:
        await producer.start()
    await producer.stop()
    message = str(refused.value)
    assert "the TLS certificate of Kafka at" in message
    assert "is not trusted (unable to get local issuer certificate)" in message
    assert f"INFERLANE_KAFKA_SSL_CAFILE ({other.cert_path})" in message
    # The same user trusting the stack's CA gets in (the refusal was the CA's, nothing else).
    good = make_producer(settings_from(user_env(test_env, secure_stack, user)))
    await good.start()
    await good.stop()
