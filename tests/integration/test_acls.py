"""Kafka security for real, on a broker of its own: a TLS listener with a certificate of the
stack's throwaway CA, SCRAM-SHA-512 users created through the Admin API, and the standard
authorizer denying whatever no ACL allows (the stack's admin is the only super user).

Every process runs as its own user with exactly the ACL set ``inferlane acls`` prints for its
role (docs/security.md), applied with Kafka's own ACL tool.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.dev.loadgen import ResultReader, produce_transactions, snapshot_end_offsets
from pipeline.dev.processes import WorkerProcess
from pipeline.dev.stack import LocalStack, StackEndpoints
from pipeline.kafka.acls import acl_arguments, role_grants
from pipeline.settings import Settings
from tests.integration.conftest import EnvFactory, ready_settings, settings_from
from tests.integration.test_fraud_lane import archived

WorkerFactory = Callable[..., WorkerProcess]


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
    return test_env(kafka_bootstrap=stack.tls_bootstrap, kafka_security_protocol="SASL_SSL",
                    kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=user.name,
                    kafka_sasl_password=user.password, kafka_ssl_cafile=str(stack.ca_file),
                    **overrides)


def new_user(stack: LocalStack, role: str, settings: Settings,
             lanes: tuple[str, ...] | None = None) -> User:
    """A SCRAM user of its own with the ACL set of ``role`` (as `inferlane acls` prints it)."""
    user = User(f"{role}-{uuid.uuid4().hex[:8]}", f"pw-{secrets.token_urlsafe(12)}")
    stack.add_scram_user(user.name, user.password)
    for args in acl_arguments(f"User:{user.name}", role_grants(role, settings, lanes)):
        stack.kafka_acls(*args)
    return user


async def test_a_worker_with_its_acls_only_scores_and_archives_over_sasl_ssl(
    test_env: EnvFactory, admin_env: dict[str, str], secure_stack: LocalStack,
    worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    admin = await ready_settings(admin_env)
    lanes = ("fraud", "archive")
    worker_user = new_user(secure_stack, "worker", admin, lanes)
    producer_user = new_user(secure_stack, "producer", admin)
    env = user_env(test_env, secure_stack, worker_user, lanes=",".join(lanes))
    worker = worker_factory(env)
    producer = settings_from(user_env(test_env, secure_stack, producer_user))
    scores_topic = admin.topic("fraud.scores")
    scores = ResultReader(admin, scores_topic, await snapshot_end_offsets(admin, scores_topic))
    async with scores:
        report = await produce_transactions(producer, rate_per_s=500, count=300, seed=3)
        assert not await scores.wait_for(set(report.valid_ids), timeout_s=60)
    objects: dict[str, list[bytes]] = {}
    for _ in range(60):
        objects = await archived(admin, scores_topic)
        if sum(len(lines) for lines in objects.values()) >= len(report.valid_ids):
            break
        await asyncio.sleep(0.5)
    assert sum(len(lines) for lines in objects.values()) == len(report.valid_ids)
    worker.terminate(timeout_s=20)
