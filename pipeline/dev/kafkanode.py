"""One Apache Kafka KRaft node of the local stack: its ``server.properties``, JVM flags and heap,
cluster ids, the readiness probe and the warm-up (real Kafka requests).

:class:`~pipeline.dev.stack.LocalStack` plans the nodes, formats their storage and runs them;
everything here is the configuration and the checks, kept apart so the stack module holds the
process lifecycle only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import StackError
from pipeline.kafka.topics import without_leaders

__all__ = ["JIT_MODES", "JVM_FLAGS", "KAFKA_HEAP_MB", "LOG4J2", "LOG4J2_TOOLS", "KafkaNode",
           "QuorumState", "Secured", "heap_from_env", "jit_from_env", "kafka_probe",
           "kafka_uuid", "kafka_warm_up", "partition_leaders", "quorum_state", "run_admin",
           "server_properties", "under_replicated"]

_HOST = "127.0.0.1"
_T = TypeVar("_T")
_READY_TOPIC = "__inferlane_stack_ready"
_WARMUP_TOPIC = "__inferlane_stack_warmup"
KAFKA_HEAP_MB = 512
"""Broker JVM heap: measured ~330 MB resident idle, ~450 MB under the 5k ev/s benchmark."""


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the local cluster (broker and controller in one JVM)."""

    node_id: int
    port: int
    controller_port: int
    home: Path
    sasl_port: int = 0
    """A SASL_PLAINTEXT (PLAIN) listener too when non-zero (the security tests use it)."""
    tls_port: int = 0
    """The SASL_SSL (SCRAM-SHA-512) listener of a secured node (:class:`Secured`), else 0."""

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def properties_path(self) -> Path:
        return self.home / "server.properties"


@dataclass(frozen=True)
class Secured:
    """How a secured node runs: the applications' listener is SASL_SSL with SCRAM-SHA-512
    users (``tls_port``, certificate ``keystore``); the node's own listener (``port``, also
    inter-broker) and the controller's are SASL_PLAINTEXT with one PLAIN user, ``admin``, the
    only super user; the standard authorizer denies whatever no ACL allows."""

    admin_password: str
    keystore: Path
    """The broker PEM keystore (:func:`pipeline.dev.tls.make_server_cert`)."""
    admin_user: str = "admin"

    def admin_client_kwargs(self) -> dict[str, str]:
        """aiokafka arguments of the admin user on the node's own listener."""
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                "sasl_plain_username": self.admin_user,
                "sasl_plain_password": self.admin_password}

    def admin_properties(self) -> str:
        """The admin user's client properties (Kafka's tools' ``--command-config``)."""
        return ("security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n"
                f"sasl.jaas.config={self._jaas()}\n")

    def _jaas(self, *, server: bool = False) -> str:
        users = f' user_{self.admin_user}="{self.admin_password}"' if server else ""
        return ("org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{self.admin_user}" password="{self.admin_password}"{users};')


def _secured_properties(node: KafkaNode, secured: Secured) -> dict[str, str]:
    """The listeners, SASL and authorizer properties of a secured node (see :class:`Secured`)."""
    jaas = secured._jaas(server=True)
    props = {
        "listeners": f"INTERNAL://{_HOST}:{node.port},CONTROLLER://{_HOST}:{node.controller_port},"
                     f"SECURE://{_HOST}:{node.tls_port}",
        "advertised.listeners": f"INTERNAL://{_HOST}:{node.port},SECURE://{_HOST}:{node.tls_port}",
        "listener.security.protocol.map":
            "INTERNAL:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT,SECURE:SASL_SSL",
        "inter.broker.listener.name": "INTERNAL",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "listener.name.secure.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.secure.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.secure.ssl.keystore.type": "PEM",
        "listener.name.secure.ssl.keystore.location": str(secured.keystore),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{secured.admin_user}",
        "allow.everyone.if.no.acl.found": "false",
    }
    for listener in ("internal", "controller"):
        props[f"listener.name.{listener}.sasl.enabled.mechanisms"] = "PLAIN"
        props[f"listener.name.{listener}.plain.sasl.jaas.config"] = jaas
    return props


@dataclass(frozen=True)
class QuorumState:
    """What one KRaft node last recorded about the controller quorum (its ``quorum-state``)."""

    node_id: int
    leader_id: int
    """The controller leader this node follows (-1: none known, an election is running)."""
    epoch: int


def quorum_state(node: KafkaNode) -> QuorumState | None:
    """The node's ``__cluster_metadata-0/quorum-state`` file, which KRaft rewrites at every
    election and leader change; None before the node first wrote it. (Kafka's own answer is
    the DescribeQuorum API, which aiokafka does not implement; the stack owns the files.)"""
    path = node.data_dir / "__cluster_metadata-0" / "quorum-state"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return QuorumState(node.node_id, int(data.get("leaderId", -1)),
                       int(data.get("leaderEpoch", -1)))


def server_properties(node: KafkaNode, nodes: list[KafkaNode], *,
                      overrides: dict[str, str] | None = None,
                      sasl_users: dict[str, str] | None = None,
                      secured: Secured | None = None) -> dict[str, str]:
    """The ``server.properties`` of ``node`` in the cluster ``nodes``.

    Choices that differ from Kafka's defaults, and why: topics are never created by a produce or
    a fetch (``auto.create.topics.enable=false``: :mod:`pipeline.kafka.topics` creates each one
    with its partitions and configs, as in production); 8 consumer-offset partitions instead of 50
    (less start-up work on 2 cores, same semantics); no initial rebalance delay (a test's group
    forms at once); fewer network and I/O threads than Kafka's 3/8 (two cores here); internal topics
    replicated as far as the cluster allows (3 on three nodes). ``secured`` replaces the
    PLAINTEXT listeners with authenticated ones and turns the authorizer on (:class:`Secured`).
    """
    if secured is not None and sasl_users:
        raise ValueError("a secured node has no SASL_PLAINTEXT users' listener (sasl_users)")
    rf = min(len(nodes), 3)
    listeners = [f"PLAINTEXT://{_HOST}:{node.port}", f"CONTROLLER://{_HOST}:{node.controller_port}"]
    advertised = [f"PLAINTEXT://{_HOST}:{node.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{n.node_id}@{_HOST}:{n.controller_port}" for n in nodes),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(node.data_dir),
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "default.replication.factor": str(rf),
        "offsets.topic.num.partitions": "8",
        "offsets.topic.replication.factor": str(rf),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min(rf, 2)),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min(rf, 2)),
        "group.initial.rebalance.delay.ms": "0",
        # A node restarted after a crash is unfenced once its old session expires: 3 s instead
        # of 9 s (measured: SIGKILL + restart 13.0 s -> 6.1 s on one node).
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.hours": "24",
    }
    if node.sasl_port:
        listeners.append(f"SASL_PLAINTEXT://{_HOST}:{node.sasl_port}")
        advertised.append(f"SASL_PLAINTEXT://{_HOST}:{node.sasl_port}")
        protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
        users = " ".join(f'user_{name}="{password}"'
                         for name, password in sorted((sasl_users or {}).items()))
        props["sasl.enabled.mechanisms"] = "PLAIN"
        props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};")
    props["listeners"] = ",".join(listeners)
    props["advertised.listeners"] = ",".join(advertised)
    props["listener.security.protocol.map"] = ",".join(protocols)
    if secured is not None:
        props.update(_secured_properties(node, secured))
    props.update(overrides or {})
    return props


LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""

LOG4J2_TOOLS = """\
status = warn
appender.out.type = Console
appender.out.name = STDERR
appender.out.target = SYSTEM_ERR
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = STDERR
"""
"""The admin tools' logging: warnings and errors only, on stderr (their answer is stdout)."""

# Kafka's own launch script (kafka-run-class.sh) uses these GC flags.
JVM_FLAGS = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
              "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true"]


JIT_MODES: dict[str, list[str]] = {
    "quick": ["-XX:TieredStopAtLevel=1"],
    "peak": [],
}
"""How the broker JVM compiles its hot code. ``quick`` (C1 only) is compiled within the first
few thousand requests and costs no background compilation; ``peak`` (the JVM's default tiered
C1 + C2) ends up faster but spends its first ~10 s of traffic compiling on the cores the
pipeline needs. Measured on this 2-core machine (docs/performance.md, "A fresh broker's first
seconds"): ``make demo`` at 500 ev/s, first 2 s p99 295 ms with ``peak`` and 34 ms with
``quick`` after :func:`kafka_warm_up`; `bench run --impl a` at 5,000 ev/s p50 7.0 / p99 30.0 ms
with ``peak`` once compiled, 12.9 / 41.4 ms with ``quick``. Hence ``quick`` for the stack a
person or a test starts and uses at once, ``peak`` for the benchmarks, which measure sustained
rates."""


def jit_from_env(default: str = "quick") -> str:
    """The local brokers' JIT mode: ``INFERLANE_STACK_KAFKA_JIT``, else ``default``."""
    mode = os.environ.get("INFERLANE_STACK_KAFKA_JIT", "") or default
    if mode not in JIT_MODES:
        raise StackError(f"INFERLANE_STACK_KAFKA_JIT={mode!r}: choose one of {sorted(JIT_MODES)}")
    return mode


def heap_from_env() -> int:
    """The local brokers' JVM heap: ``INFERLANE_STACK_KAFKA_HEAP_MB``, else the default."""
    raw = os.environ.get("INFERLANE_STACK_KAFKA_HEAP_MB", "")
    if not raw:
        return KAFKA_HEAP_MB
    if not raw.isdigit() or int(raw) < 128:
        raise StackError(f"INFERLANE_STACK_KAFKA_HEAP_MB={raw!r}: give a heap in MiB, >= 128")
    return int(raw)


def kafka_uuid() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes it: 16 random bytes, URL-safe base64,
    never starting with ``-`` (Kafka's ``Uuid.randomUuid`` rule too: the storage tool would read
    such an id as an option and fail; 1 in 64 ids)."""
    while True:
        text = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def kafka_probe(bootstrap: str, timeout_s: float = 3.0, *, brokers: int = 0,
                create_topic: bool = False, security: Mapping[str, str] | None = None) -> str:
    """Do real Kafka requests; return "" when they work, else the error text.

    Metadata always; with ``brokers`` the cluster must list that many; with ``create_topic`` a
    small topic is created (replicated over ``min(brokers, 3)`` nodes) and must have a leader,
    so a broker that answers metadata but cannot yet serve writes is not "ready". A plain TCP
    connect to the first bootstrap address comes first: while the broker is still starting,
    aiokafka would log every refused connection as an error on the user's terminal.
    ``security``: aiokafka's security arguments (a secured node's admin, :class:`Secured`).
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        return f"kafka: {exc!r}"

    async def probe(admin: AIOKafkaAdminClient) -> str:
        if brokers:
            seen = len((await admin.describe_cluster()).get("brokers", []))
            if seen < brokers:
                return f"kafka: {seen} of {brokers} brokers registered"
        else:
            await admin.list_topics()
        if create_topic:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(_READY_TOPIC, 1, min(max(brokers, 1), 3))])
            if await without_leaders(admin, [_READY_TOPIC]):
                return "kafka: no partition leader yet"
        return ""

    try:
        return run_admin(bootstrap, probe, timeout_s=timeout_s, security=security)
    except (KafkaError, OSError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as exc:
        return f"kafka: {exc!r}"


async def _warm_up(bootstrap: str, round_trips: int, deadline: float,
                   security: Mapping[str, str]) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(_WARMUP_TOPIC, 4, 1)])
    finally:
        await admin.close()
    # What the lanes do, a request at a time: idempotent acks=all produce, long-poll fetches in
    # a consumer group, offset commits.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **security, acks="all",
                                enable_idempotence=True, linger_ms=0)
    consumer = AIOKafkaConsumer(_WARMUP_TOPIC, bootstrap_servers=bootstrap, **security,
                                group_id="__inferlane_stack_warmup", auto_offset_reset="earliest",
                                fetch_max_wait_ms=100, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    sent = 0

    async def send(worker: int) -> None:
        nonlocal sent
        while sent < round_trips and time.monotonic() < deadline:
            sent += 1
            await producer.send_and_wait(_WARMUP_TOPIC, b"x" * 200, key=b"%d-%d" % (worker, sent))

    async def consume() -> None:
        fetched = 0
        while fetched < round_trips and time.monotonic() < deadline:
            if batches := await consumer.getmany(timeout_ms=100):
                fetched += sum(len(records) for records in batches.values())
                await consumer.commit()

    try:
        await asyncio.gather(consume(), *(send(w) for w in range(4)))
    finally:
        await consumer.stop()
        await producer.stop()
    return sent


def kafka_warm_up(bootstrap: str, round_trips: int = 1500, timeout_s: float = 20.0, *,
                  security: Mapping[str, str] | None = None) -> str:
    """Send ``round_trips`` produce requests (4 at a time, each awaited) while a consumer group
    fetches and commits them (all of them, or what ``timeout_s`` allows), so the broker JVM
    has compiled its request paths before the pipeline's first event; return "" when done,
    else the error text. A fresh broker answers
    its first thousand requests an order of magnitude slower than a warm one (measured with
    ``make demo``: first 2 s p99 120 ms cold, 34 ms after this, broker in ``quick`` JIT mode)."""
    deadline = time.monotonic() + timeout_s
    # A new group's coordinator is loading at first: aiokafka logs each retry as an error,
    # which is expected here and would only alarm the user's terminal.
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, _warm_up(bootstrap, round_trips, deadline,
                                              security or {})).result(
                timeout=timeout_s + 10)
    except (KafkaError, OSError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as exc:
        return f"kafka warm-up: {exc!r}"
    finally:
        kafka_log.setLevel(level)
    return ""


async def partition_leaders(admin: AIOKafkaAdminClient,
                            topics: list[str]) -> dict[str, dict[int, int]]:
    """topic -> partition -> leader node id (-1 while none) for ``topics``."""
    out: dict[str, dict[int, int]] = {}
    for topic in await admin.describe_topics(topics):
        out[topic["topic"]] = {p["partition"]: p.get("leader", -1)
                               for p in topic.get("partitions") or []}
    return out


async def under_replicated(admin: AIOKafkaAdminClient) -> list[str]:
    """``topic/partition`` of every partition whose in-sync replicas are fewer than its
    replicas (or that has no leader), over all topics of the cluster."""
    names = sorted(await admin.list_topics())
    found = []
    for topic in await admin.describe_topics(names) if names else []:
        for part in topic.get("partitions") or []:
            if part.get("leader", -1) < 0 or len(part.get("isr") or []) < len(
                    part.get("replicas") or []):
                found.append(f"{topic['topic']}/{part['partition']}")
    return sorted(found)


def run_admin(bootstrap: str, call: Callable[[AIOKafkaAdminClient], Awaitable[_T]], *,
              timeout_s: float = 10.0, security: Mapping[str, str] | None = None) -> _T:
    """``await call(admin)`` with an admin client of ``bootstrap``, from synchronous code (in a
    thread with its own event loop: the caller may or may not be inside a running loop)."""
    async def run() -> _T:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                    request_timeout_ms=int(timeout_s * 1000), **(security or {}))
        await asyncio.wait_for(admin.start(), timeout_s)
        try:
            return await asyncio.wait_for(call(admin), timeout_s)
        finally:
            await admin.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=timeout_s * 3)
