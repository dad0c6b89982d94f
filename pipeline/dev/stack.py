"""The embedded local stack: Apache Kafka (KRaft) and an S3 endpoint on loopback.

Used by ``make demo``, the integration tests and the benchmarks; ``inferlane stack up|down|status``
drives it by hand. The processes are started and stopped by this module only:

* broker(s): Apache Kafka :data:`pipeline.dev.kafkadist.KAFKA_VERSION` in KRaft mode, one JVM per
  node with the broker and controller roles combined, from the jars ``make install`` fetched with
  Maven (:mod:`pipeline.dev.kafkadist`); storage formatted by ``kafka.tools.StorageTool``; data
  under ``<root>/kafka/<node>``; ``brokers=3`` starts a three-node cluster (replication factor 3);
* S3: moto's server (``moto[server]``), in memory, with the bucket created at start.

Ports are free ones chosen at start unless given; readiness is a real Kafka request (every node
registered, a topic created with a leader) and a real S3 call; logs go to ``<root>/logs``; state
(pids, ports) to ``<root>/stack.json`` so a later ``stack down`` stops exactly the processes this
module started. Production does not use any of this: point ``INFERLANE_KAFKA_BOOTSTRAP`` and
``INFERLANE_S3_*`` at real services instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import boto3
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.dev.kafkadist import KafkaDist, PrerequisiteError, find_kafka
from pipeline.errors import PortInUseError, PrerequisiteMissingError, StackError
from pipeline.kafka.topics import without_leaders

__all__ = ["DUMMY_S3_KEY", "KafkaNode", "LocalStack", "ManagedProcess", "StackEndpoints",
           "free_port", "server_properties"]

DUMMY_S3_KEY = "inferlane-local"
_HOST = "127.0.0.1"
_STATE_FILE = "stack.json"
_READY_TOPIC = "__inferlane_stack_ready"
KAFKA_HEAP_MB = 512
"""Broker JVM heap: measured ~330 MB resident idle, ~450 MB under the 5k ev/s benchmark."""

_S3_NICE = 10
_PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _claim_port(port: int, what: str) -> int:
    """Return ``port`` (a free one when 0); raise :class:`PortInUseError` if it is taken."""
    if port == 0:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise PortInUseError(f"{what} port {port} on {_HOST} is already in use") from exc
    return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _set_autogroup_nice(pid: int, nice: int) -> None:
    """Give ``pid``'s scheduler autogroup the ``nice`` value too, where Linux has autogroups.

    With ``kernel.sched_autogroup_enabled`` (the default on many distributions) every session
    is one scheduling group and CPU is shared fairly between *groups*; a process's own nice
    only ranks it inside its group. A process started in a session of its own therefore
    competes as an equal with every other session whatever its nice, unless its group's nice
    is set (measured here: the S3 server at nice 10 still took a full core while a chunk was
    read and written, and the worker got none of it for ~100 ms at a time).
    """
    with contextlib.suppress(OSError):  # no autogroups (or not allowed): the nice above stays
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")


@dataclass
class ManagedProcess:
    """One child process in its own session, logging to a file; stopped by SIGTERM, then KILL."""

    name: str
    argv: list[str]
    log_path: Path
    pid: int | None = None
    _popen: subprocess.Popen[bytes] | None = None
    nice: int = 0
    """Lower the process's scheduling priority by this much right after it starts."""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session so that stopping the group ends the process and any children it has.
            self._popen = subprocess.Popen(  # noqa: S603 - argv is built by this module
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self._popen.pid
        if self.nice:
            # Before it serves anything, so the threads it starts later inherit the value.
            os.setpriority(os.PRIO_PROCESS, self.pid, self.nice)
            _set_autogroup_nice(self.pid, self.nice)

    @property
    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL it; idempotent."""
        if self.pid is None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            if not self.alive:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._popen is not None:
            self._popen.wait(timeout=5)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, for failure tests) and reap it."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait(timeout=10)
        else:
            deadline = time.monotonic() + 10
            while _pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class StackEndpoints:
    """Where the running stack listens, and the environment that points inferlane at it."""

    kafka_bootstrap: str
    s3_endpoint_url: str
    s3_bucket: str

    def env(self) -> dict[str, str]:
        return {
            "INFERLANE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "INFERLANE_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "INFERLANE_S3_BUCKET": self.s3_bucket,
            "INFERLANE_S3_ACCESS_KEY_ID": DUMMY_S3_KEY,
            "INFERLANE_S3_SECRET_ACCESS_KEY": DUMMY_S3_KEY,
            "INFERLANE_S3_REGION": "us-east-1",
        }


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the local cluster (broker and controller in one JVM)."""

    node_id: int
    port: int
    controller_port: int
    home: Path
    sasl_port: int = 0
    """A SASL_PLAINTEXT (PLAIN) listener too when non-zero (the security tests use it)."""

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def properties_path(self) -> Path:
        return self.home / "server.properties"


def server_properties(node: KafkaNode, nodes: list[KafkaNode], *,
                      overrides: dict[str, str] | None = None,
                      sasl_users: dict[str, str] | None = None) -> dict[str, str]:
    """The ``server.properties`` of ``node`` in the cluster ``nodes``.

    Choices that differ from Kafka's defaults, and why: topics are never created by a produce or
    a fetch (``auto.create.topics.enable=false``: :mod:`pipeline.kafka.topics` creates each one
    with its partitions and configs, as in production); 8 consumer-offset partitions instead of 50
    (less start-up work on 2 cores, same semantics); no initial rebalance delay (a test's group
    forms at once); fewer network and I/O threads than Kafka's 3/8 (two cores here); internal topics
    replicated as far as the cluster allows (3 on three nodes).
    """
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
    props.update(overrides or {})
    return props


_LOG4J2 = """\
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

# Kafka's own launch script (kafka-run-class.sh) uses these GC flags.
_JVM_FLAGS = ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
              "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true"]


def _heap_from_env() -> int:
    """The local brokers' JVM heap: ``INFERLANE_STACK_KAFKA_HEAP_MB``, else the default."""
    raw = os.environ.get("INFERLANE_STACK_KAFKA_HEAP_MB", "")
    if not raw:
        return KAFKA_HEAP_MB
    if not raw.isdigit() or int(raw) < 128:
        raise StackError(f"INFERLANE_STACK_KAFKA_HEAP_MB={raw!r}: give a heap in MiB, >= 128")
    return int(raw)


def _kafka_uuid() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes it: 16 random bytes, URL-safe base64,
    never starting with ``-`` (Kafka's ``Uuid.randomUuid`` rule too: the storage tool would read
    such an id as an option and fail; 1 in 64 ids)."""
    while True:
        text = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class LocalStack:
    """Start, check and stop the local Kafka node(s) and S3 server under ``root``.

    ``with LocalStack(root) as endpoints: ...`` starts everything and always stops it.
    ``fresh=True`` wipes the brokers' data first (tests and the demo start from nothing);
    ``brokers=3`` runs a three-node KRaft cluster; ``kafka_config`` adds or overrides broker
    properties; ``sasl_users`` (name → password) adds a SASL_PLAINTEXT listener on every node.
    """

    def __init__(
        self,
        root: Path,
        *,
        kafka_port: int = 0,
        s3_port: int = 0,
        bucket: str = "inferlane",
        fresh: bool = False,
        ready_timeout_s: float = 60.0,
        brokers: int = 1,
        kafka_heap_mb: int | None = None,
        kafka_config: dict[str, str] | None = None,
        sasl_users: dict[str, str] | None = None,
    ) -> None:
        if brokers < 1:
            raise ValueError("brokers must be at least 1")
        self.root = root
        self.bucket = bucket
        self.ready_timeout_s = ready_timeout_s
        self.broker_count = brokers
        self.kafka_heap_mb = kafka_heap_mb or _heap_from_env()
        self.kafka_config = dict(kafka_config or {})
        self.sasl_users = dict(sasl_users or {})
        self._fresh = fresh
        self._kafka_port_wanted = kafka_port
        self._s3_port_wanted = s3_port
        self.s3_port = 0
        self.nodes: list[KafkaNode] = []
        self.brokers: dict[int, ManagedProcess] = {}
        self.s3: ManagedProcess | None = None
        self._dist: KafkaDist | None = None

    @property
    def data_dir(self) -> Path:
        """Where every node keeps its logs and metadata."""
        return self.root / "kafka"

    @property
    def kafka_port(self) -> int:
        return self.nodes[0].port if self.nodes else 0

    @property
    def broker(self) -> ManagedProcess | None:
        """The first node's process (the only one of a single-node stack)."""
        return self.brokers.get(self.nodes[0].node_id) if self.nodes else None

    @property
    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            kafka_bootstrap=",".join(n.bootstrap for n in self.nodes),
            s3_endpoint_url=f"http://{_HOST}:{self.s3_port}",
            s3_bucket=self.bucket,
        )

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listeners ("" without ``sasl_users``)."""
        return ",".join(f"{_HOST}:{n.sasl_port}" for n in self.nodes if n.sasl_port)

    def start(self) -> StackEndpoints:
        """Start every service and wait until each answers a real request."""
        try:
            self._dist = find_kafka()
        except PrerequisiteError as exc:
            raise PrerequisiteMissingError(str(exc)) from exc
        if self._fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            shutil.rmtree(self.root / "logs", ignore_errors=True)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                return self._start_on_ports()
            except StackError as exc:
                # A free port chosen here can be taken by another program before the server
                # binds it; only then (ports not given by the caller) try other ones.
                chosen = not self._kafka_port_wanted and not self._s3_port_wanted
                if not chosen or "in use" not in str(exc) or attempt == _PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _plan_nodes(self) -> list[KafkaNode]:
        nodes = []
        for i in range(self.broker_count):
            wanted = self._kafka_port_wanted + i if self._kafka_port_wanted else 0
            nodes.append(KafkaNode(
                node_id=i + 1, port=_claim_port(wanted, "Kafka"),
                controller_port=free_port(), home=self.data_dir / f"node-{i + 1}",
                sasl_port=free_port() if self.sasl_users else 0))
        return nodes

    def _start_on_ports(self) -> StackEndpoints:
        self.nodes = self._plan_nodes()
        self.s3_port = _claim_port(self._s3_port_wanted, "S3")
        try:
            cluster_id = _kafka_uuid()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
            for node in self.nodes:
                self._prepare_node(node, cluster_id)
            for node in self.nodes:
                self._start_node(node)
            self.s3 = ManagedProcess(
                "s3",
                [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(self.s3_port)],
                self.root / "logs" / "s3.log",
                # A stand-in for a remote service: on this machine its CPU (it serves every
                # byte in Python) must not compete with the real-time path, which never uses S3.
                nice=_S3_NICE,
            )
            self.s3.start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._save_state()
        return self.endpoints

    def _java_argv(self, *main: str) -> list[str]:
        assert self._dist is not None  # noqa: S101 - set by start()/attach()
        return [self._dist.java, f"-Xms{min(256, self.kafka_heap_mb)}m",
                f"-Xmx{self.kafka_heap_mb}m", *_JVM_FLAGS,
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                "-cp", self._dist.classpath, *main]

    def _prepare_node(self, node: KafkaNode, cluster_id: str) -> None:
        """Write the node's config and format its storage (skipped when already formatted)."""
        node.home.mkdir(parents=True, exist_ok=True)
        props = server_properties(node, self.nodes, overrides=self.kafka_config,
                                  sasl_users=self.sasl_users)
        node.properties_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        if (node.data_dir / "meta.properties").exists():
            return
        done = subprocess.run(  # noqa: S603 - argv is built here
            self._java_argv("kafka.tools.StorageTool", "format", "-t", cluster_id,
                            "-c", str(node.properties_path), "--ignore-formatted"),
            capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise StackError(f"formatting Kafka node {node.node_id} failed "
                             f"({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")

    def _node(self, node_id: int) -> KafkaNode:
        """The node ``node_id``; a :class:`StackError` naming the nodes when there is none."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise StackError(f"no Kafka node {node_id} (nodes: {[n.node_id for n in self.nodes]})")

    def _start_node(self, node: KafkaNode) -> ManagedProcess:
        proc = ManagedProcess(
            f"kafka-{node.node_id}",
            self._java_argv("kafka.Kafka", str(node.properties_path)),
            self.root / "logs" / f"kafka-{node.node_id}.log")
        proc.start()
        self.brokers[node.node_id] = proc
        return proc

    def stop_broker(self, node_id: int = 1, timeout_s: float = 30.0) -> None:
        """Stop one node gracefully (SIGTERM: controlled shutdown, logs flushed)."""
        proc = self.brokers.get(self._node(node_id).node_id)
        if proc is not None:
            proc.stop(timeout_s=timeout_s)

    def kill_broker(self, node_id: int = 1) -> None:
        """SIGKILL one node (``kill -9``: no shutdown, unflushed page cache survives)."""
        proc = self.brokers.get(self._node(node_id).node_id)
        if proc is not None:
            proc.kill()

    def start_broker(self, node_id: int = 1) -> None:
        """Start a stopped or killed node again on its ports and data, and wait until the whole
        cluster answers."""
        node = self._node(node_id)
        old = self.brokers.get(node_id)
        if old is not None and old.alive:
            raise StackError(f"Kafka node {node_id} is running")
        proc = self._start_node(node)
        self._wait_for(f"kafka node {node_id}", proc, self._kafka_ready)
        self._save_state()

    def stop(self) -> None:
        """Stop what this object started (idempotent) and forget the saved state."""
        procs = [p for p in (*self.brokers.values(), self.s3) if p is not None]
        # In parallel: each Kafka node's controlled shutdown waits for the others' answers.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
            list(pool.map(lambda proc: proc.stop(timeout_s=30.0), procs))
        state = self.root / _STATE_FILE
        if state.exists():
            state.unlink()

    def __enter__(self) -> StackEndpoints:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- readiness ------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        assert self.s3 is not None  # noqa: S101 - set by start()
        for node in self.nodes:
            self._wait_for(f"kafka node {node.node_id}", self.brokers[node.node_id],
                           self._kafka_ready)
        self._wait_for("S3", self.s3, self._s3_ready)

    def _wait_for(self, what: str, proc: ManagedProcess, probe: Callable[[], str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            if not proc.alive:
                raise StackError(
                    f"{what} exited during start-up; log {proc.log_path}:\n{proc.log_tail()}"
                )
            last_error = probe()
            if not last_error:
                return
            time.sleep(0.2)
        raise StackError(
            f"{what} not ready after {self.ready_timeout_s:.0f}s ({last_error}); "
            f"log {proc.log_path}:\n{proc.log_tail()}"
        )

    def _kafka_ready(self) -> str:
        return kafka_probe(self.endpoints.kafka_bootstrap, brokers=len(self.nodes),
                           create_topic=True)

    def _s3_ready(self) -> str:
        return s3_probe(self.endpoints, create_bucket=True)

    # --- state for the CLI ----------------------------------------------------------------
    def _save_state(self) -> None:
        state = {
            "endpoints": asdict(self.endpoints),
            "nodes": [{**asdict(n), "home": str(n.home)} for n in self.nodes],
            "kafka_heap_mb": self.kafka_heap_mb,
            "processes": {
                proc.name: {"pid": proc.pid, "argv": proc.argv, "log": str(proc.log_path)}
                for proc in (*self.brokers.values(), self.s3) if proc is not None
            },
        }
        (self.root / _STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, root: Path) -> LocalStack | None:
        """Rebuild the handle of a stack started earlier by ``stack up``; None if none runs."""
        path = root / _STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        endpoints = StackEndpoints(**state["endpoints"])
        nodes = [KafkaNode(**{**n, "home": Path(n["home"])}) for n in state.get("nodes", [])]
        stack = cls(root, bucket=endpoints.s3_bucket, brokers=max(1, len(nodes)),
                    kafka_heap_mb=int(state.get("kafka_heap_mb", KAFKA_HEAP_MB)))
        stack.nodes = nodes
        stack.s3_port = int(endpoints.s3_endpoint_url.rsplit(":", 1)[1])
        for name, info in state["processes"].items():
            # Only a process whose command line is still ours may be signalled (pids get reused).
            if not _cmdline_matches(info["pid"], info["argv"]):
                continue
            proc = ManagedProcess(name, info["argv"], Path(info["log"]), pid=info["pid"])
            if name == "s3":
                stack.s3 = proc
            elif name.startswith("kafka-"):
                stack.brokers[int(name.removeprefix("kafka-"))] = proc
        return stack

    def status(self) -> dict[str, object]:
        """Liveness and reachability of each service, for ``inferlane stack status``."""
        bootstrap = self.endpoints.kafka_bootstrap
        return {
            "endpoints": asdict(self.endpoints),
            "kafka": {
                "nodes": {str(n.node_id): {
                    "pid": self.brokers[n.node_id].pid if n.node_id in self.brokers else None,
                    "alive": bool(n.node_id in self.brokers and self.brokers[n.node_id].alive),
                    "bootstrap": n.bootstrap} for n in self.nodes},
                "error": kafka_probe(bootstrap, brokers=len(self.nodes)) or None},
            "s3": {"pid": self.s3.pid if self.s3 else None,
                   "alive": bool(self.s3 and self.s3.alive),
                   "error": s3_probe(self.endpoints, create_bucket=False) or None},
        }


def _cmdline_matches(pid: int, argv: list[str]) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return raw.split(b"\0")[: len(argv)] == [a.encode() for a in argv]


def kafka_probe(bootstrap: str, timeout_s: float = 3.0, *, brokers: int = 0,
                create_topic: bool = False) -> str:
    """Do real Kafka requests; return "" when they work, else the error text.

    Metadata always; with ``brokers`` the cluster must list that many; with ``create_topic`` a
    small topic is created (replicated over ``min(brokers, 3)`` nodes) and must have a leader,
    so a broker that answers metadata but cannot yet serve writes is not "ready". A plain TCP
    connect to the first bootstrap address comes first: while the broker is still starting,
    aiokafka would log every refused connection as an error on the user's terminal.
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        return f"kafka: {exc!r}"

    async def probe() -> str:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
        )
        try:
            await asyncio.wait_for(admin.start(), timeout_s)
            if brokers:
                cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
                seen = len(cluster.get("brokers", []))
                if seen < brokers:
                    return f"kafka: {seen} of {brokers} brokers registered"
            else:
                await asyncio.wait_for(admin.list_topics(), timeout_s)
            if create_topic:
                rf = min(max(brokers, 1), 3)
                with contextlib.suppress(TopicAlreadyExistsError):
                    await asyncio.wait_for(admin.create_topics(
                        [NewTopic(_READY_TOPIC, 1, rf)]), timeout_s)
                if await asyncio.wait_for(without_leaders(admin, [_READY_TOPIC]), timeout_s):
                    return "kafka: no partition leader yet"
            return ""
        finally:
            await admin.close()

    # Run in a thread with its own loop: callers may or may not be inside a running loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(asyncio.run, probe()).result(timeout=timeout_s * 5)
        except (KafkaError, OSError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as exc:
            return f"kafka: {exc!r}"


def s3_probe(endpoints: StackEndpoints, *, create_bucket: bool) -> str:
    """Do a real S3 call (create or head the bucket); return "" when it works, else the error."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoints.s3_endpoint_url,
        aws_access_key_id=DUMMY_S3_KEY,
        aws_secret_access_key=DUMMY_S3_KEY,
        region_name="us-east-1",
        config=BotoConfig(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    try:
        if create_bucket:
            try:
                client.create_bucket(Bucket=endpoints.s3_bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        client.head_bucket(Bucket=endpoints.s3_bucket)
    except (BotoCoreError, ClientError) as exc:
        return f"s3: {exc}"
    return ""
