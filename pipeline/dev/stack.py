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

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.dev.kafkadist import KafkaDist, PrerequisiteError, find_kafka
from pipeline.dev.kafkanode import (
    JIT_MODES,
    JVM_FLAGS,
    KAFKA_HEAP_MB,
    LOG4J2,
    LOG4J2_TOOLS,
    KafkaNode,
    Secured,
    heap_from_env,
    jit_from_env,
    kafka_probe,
    kafka_uuid,
    kafka_warm_up,
    quorum_state,
    run_admin,
    server_properties,
    under_replicated,
)
from pipeline.dev.kafkatools import ADMIN_PROPERTIES, KafkaTools, make_secured
from pipeline.errors import PortInUseError, PrerequisiteMissingError, StackError

__all__ = ["DUMMY_S3_KEY", "LocalStack", "ManagedProcess", "StackEndpoints", "bench_stack",
           "free_port", "s3_probe"]

DUMMY_S3_KEY = "inferlane-local"
_HOST = "127.0.0.1"
_STATE_FILE = "stack.json"

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


class LocalStack:
    """Start, check and stop the local Kafka node(s) and S3 server under ``root``.

    ``with LocalStack(root) as endpoints: ...`` starts everything and always stops it.
    ``fresh=True`` wipes the brokers' data first (tests and the demo start from nothing);
    ``brokers=3`` runs a three-node KRaft cluster; ``kafka_config`` adds or overrides broker
    properties; ``sasl_users`` (name → password) adds a SASL_PLAINTEXT listener on every node;
    ``secure`` runs every node as :class:`~pipeline.dev.kafkanode.Secured` (a TLS listener with
    a certificate of a CA made for the stack, SCRAM users, the authorizer with ACLs: see
    :attr:`tools`);
    ``jit`` is the brokers' JIT mode (:data:`~pipeline.dev.kafkanode.JIT_MODES`; default
    ``INFERLANE_STACK_KAFKA_JIT`` or ``quick``: the benchmarks pass ``peak``); ``warm_up`` sends
    a burst of real requests before :meth:`start` returns, so the first events do not meet a
    cold broker.
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
        secure: bool = False,
        jit: str | None = None,
        warm_up: bool = True,
    ) -> None:
        if brokers < 1:
            raise ValueError("brokers must be at least 1")
        self.root = root
        self.bucket = bucket
        self.ready_timeout_s = ready_timeout_s
        self.broker_count = brokers
        self.kafka_heap_mb = kafka_heap_mb or heap_from_env()
        if jit is not None and jit not in JIT_MODES:
            raise ValueError(f"jit must be one of {sorted(JIT_MODES)}, not {jit!r}")
        self.jit = jit or jit_from_env()
        self.warm_up = warm_up
        self.warm_up_s: float | None = None
        """How long the warm-up took (None before :meth:`start` or without one)."""
        self.kafka_config = dict(kafka_config or {})
        self.sasl_users = dict(sasl_users or {})
        if secure and self.sasl_users:
            raise ValueError("a secure stack has no SASL_PLAINTEXT listener: drop sasl_users")
        self.secure = secure
        self.secured: Secured | None = None
        """The admin password and broker keystore of a secure stack (set by :meth:`start`)."""
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

    @property
    def tls_bootstrap(self) -> str:
        """A secure stack's SASL_SSL (SCRAM-SHA-512) listeners, for applications ("" else)."""
        return ",".join(f"{_HOST}:{n.tls_port}" for n in self.nodes if n.tls_port)

    @property
    def tls_dir(self) -> Path:
        """Where a secure stack keeps its CA, broker keystore and admin client properties."""
        return self.root / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA that signed a secure stack's broker certificates (what clients trust)."""
        return self.tls_dir / "ca.pem"

    @property
    def admin_security(self) -> dict[str, str]:
        """aiokafka security arguments of the stack's own clients (probe, warm-up, admin):
        the admin user on a secure stack, none on a plaintext one."""
        return self.secured.admin_client_kwargs() if self.secured is not None else {}

    @property
    def tools(self) -> KafkaTools:
        """Kafka's admin tools (SCRAM users, ACLs) as a started secure stack's admin."""
        if self.secured is None or not self.nodes:
            raise StackError("Kafka's admin tools run on a started secure stack "
                             "(`inferlane stack up --secure`)")
        return KafkaTools(self._kafka_dist(), self.nodes[0].bootstrap,
                          self.tls_dir / ADMIN_PROPERTIES,
                          self.data_dir / "log4j2-tools.properties")

    def operator_env(self) -> dict[str, str]:
        """:meth:`StackEndpoints.env`, and on a secure stack the admin's settings on the node's
        own listener (SASL_PLAINTEXT/PLAIN): what ``inferlane topics create`` runs with."""
        env = self.endpoints.env()
        if self.secured is not None:
            env.update({"INFERLANE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                        "INFERLANE_KAFKA_SASL_MECHANISM": "PLAIN",
                        "INFERLANE_KAFKA_SASL_USERNAME": self.secured.admin_user,
                        "INFERLANE_KAFKA_SASL_PASSWORD": self.secured.admin_password})
        return env

    def add_user(self, name: str, acls: Iterable[Sequence[str]]) -> dict[str, str]:
        """Create (or reset) SCRAM user ``name`` with a new password, add ``acls`` (each the
        arguments of one ``kafka-acls.sh --add``) and return :meth:`user_env` of it."""
        password = secrets.token_urlsafe(18)
        tools = self.tools
        tools.add_scram_user(name, password)
        for args in acls:
            tools.acls(*args)
        return self.user_env(name, password)

    def user_env(self, name: str, password: str) -> dict[str, str]:
        """:meth:`StackEndpoints.env` for SCRAM user ``name`` of a secure stack, on its TLS
        listener, trusting the stack's CA."""
        if self.secured is None:
            raise StackError("users live on a secure stack (`inferlane stack up --secure`)")
        return {**self.endpoints.env(), "INFERLANE_KAFKA_BOOTSTRAP": self.tls_bootstrap,
                "INFERLANE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "INFERLANE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "INFERLANE_KAFKA_SASL_USERNAME": name, "INFERLANE_KAFKA_SASL_PASSWORD": password,
                "INFERLANE_KAFKA_SSL_CAFILE": str(self.ca_file)}

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
                sasl_port=free_port() if self.sasl_users else 0,
                tls_port=free_port() if self.secure else 0))
        return nodes

    def _start_on_ports(self) -> StackEndpoints:
        self.nodes = self._plan_nodes()
        if self.secure and self.secured is None:
            self.secured = make_secured(self.tls_dir)
        self.s3_port = _claim_port(self._s3_port_wanted, "S3")
        try:
            cluster_id = kafka_uuid()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "log4j2.properties").write_text(LOG4J2)
            (self.data_dir / "log4j2-tools.properties").write_text(LOG4J2_TOOLS)
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
                f"-Xmx{self.kafka_heap_mb}m", *JVM_FLAGS, *JIT_MODES[self.jit],
                f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                "-cp", self._dist.classpath, *main]

    def _prepare_node(self, node: KafkaNode, cluster_id: str) -> None:
        """Write the node's config and format its storage (skipped when already formatted)."""
        node.home.mkdir(parents=True, exist_ok=True)
        props = server_properties(node, self.nodes, overrides=self.kafka_config,
                                  sasl_users=self.sasl_users, secured=self.secured)
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

    def _kafka_dist(self) -> KafkaDist:
        """The broker's jars and java (found again for a stack attached from its state file)."""
        if self._dist is None:
            try:
                self._dist = find_kafka()
            except PrerequisiteError as exc:
                raise PrerequisiteMissingError(str(exc)) from exc
        return self._dist

    def _start_node(self, node: KafkaNode) -> ManagedProcess:
        self._kafka_dist()
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

    def node_alive(self, node_id: int) -> bool:
        proc = self.brokers.get(self._node(node_id).node_id)
        return proc is not None and proc.alive

    def controller_leader(self) -> int | None:
        """The KRaft controller leader as the running nodes last recorded it (the newest
        epoch among them); None while they know of no live leader (an election is running)."""
        states = [st for n in self.nodes if self.node_alive(n.node_id)
                  and (st := quorum_state(n)) is not None]
        if not states:
            return None
        newest = max(states, key=lambda st: st.epoch)
        alive = newest.leader_id >= 0 and any(
            n.node_id == newest.leader_id and self.node_alive(n.node_id) for n in self.nodes)
        return newest.leader_id if alive else None

    def under_replicated(self) -> list[str]:
        """``topic/partition`` of every partition with fewer in-sync replicas than replicas."""
        return run_admin(self.endpoints.kafka_bootstrap, under_replicated,
                         security=self.admin_security)

    def wait_in_sync(self, timeout_s: float = 120.0) -> float:
        """Wait until no partition is under-replicated; return the seconds it took. Raises
        :class:`StackError` naming the partitions still behind after ``timeout_s``."""
        started = time.monotonic()
        behind: list[str] = []
        while time.monotonic() - started < timeout_s:
            try:
                behind = self.under_replicated()
            except Exception as exc:  # noqa: BLE001 - a node still starting: ask again
                behind = [f"({exc!r})"]
            if not behind:
                return time.monotonic() - started
            time.sleep(0.25)
        raise StackError(f"partitions still under-replicated after {timeout_s:.0f}s: "
                         f"{behind[:10]}")

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
        if self.warm_up:
            started = time.monotonic()
            if error := kafka_warm_up(self.endpoints.kafka_bootstrap,
                                      security=self.admin_security):
                raise StackError(f"{error}; logs under {self.root / 'logs'}")
            self.warm_up_s = time.monotonic() - started

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
                           create_topic=True, security=self.admin_security)

    def _s3_ready(self) -> str:
        return s3_probe(self.endpoints, create_bucket=True)

    # --- state for the CLI ----------------------------------------------------------------
    def _save_state(self) -> None:
        state = {
            "endpoints": asdict(self.endpoints),
            "nodes": [{**asdict(n), "home": str(n.home)} for n in self.nodes],
            "kafka_heap_mb": self.kafka_heap_mb,
            "jit": self.jit,
            "secured": ({**asdict(self.secured), "keystore": str(self.secured.keystore)}
                        if self.secured is not None else None),
            "processes": {
                proc.name: {"pid": proc.pid, "argv": proc.argv, "log": str(proc.log_path)}
                for proc in (*self.brokers.values(), self.s3) if proc is not None
            },
        }
        path = self.root / _STATE_FILE
        path.touch(mode=0o600)  # a secure stack's admin password is in it
        path.write_text(json.dumps(state, indent=2))

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
                    kafka_heap_mb=int(state.get("kafka_heap_mb", KAFKA_HEAP_MB)),
                    jit=str(state.get("jit", "quick")), secure=bool(state.get("secured")))
        if secured := state.get("secured"):
            stack.secured = Secured(**{**secured, "keystore": Path(secured["keystore"])})
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
        """Liveness and reachability of each service, the controller leader and the
        under-replicated partitions, for ``inferlane stack status``."""
        bootstrap = ",".join(n.bootstrap for n in self.nodes if self.node_alive(n.node_id))
        error = kafka_probe(bootstrap or self.endpoints.kafka_bootstrap,
                            brokers=len(self.nodes), security=self.admin_security) or None
        behind: list[str] | None = None
        behind_error = None
        if bootstrap:
            try:
                behind = run_admin(bootstrap, under_replicated, timeout_s=10.0,
                                   security=self.admin_security)
            except Exception as exc:  # noqa: BLE001 - reported in the status, not raised
                behind_error = repr(exc)
        return {
            "endpoints": asdict(self.endpoints),
            "kafka": {
                "secure": {"tls_bootstrap": self.tls_bootstrap, "ca_file": str(self.ca_file)}
                if self.secured is not None else None,
                "nodes": {str(n.node_id): {
                    "pid": self.brokers[n.node_id].pid if n.node_id in self.brokers else None,
                    "alive": self.node_alive(n.node_id),
                    "bootstrap": n.bootstrap} for n in self.nodes},
                "controller_leader": self.controller_leader(),
                "under_replicated": behind,
                "error": error or behind_error},
            "s3": {"pid": self.s3.pid if self.s3 else None,
                   "alive": bool(self.s3 and self.s3.alive),
                   "error": s3_probe(self.endpoints, create_bucket=False) or None},
        }


def bench_stack(root: Path, *, brokers: int = 1, secure: bool = False) -> LocalStack:
    """A fresh stack for a benchmark: its brokers in ``peak`` JIT mode (a benchmark measures
    sustained rates after its warm-up) unless ``INFERLANE_STACK_KAFKA_JIT`` says otherwise."""
    return LocalStack(root, fresh=True, brokers=brokers, jit=jit_from_env(default="peak"),
                      secure=secure)


def _cmdline_matches(pid: int, argv: list[str]) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return raw.split(b"\0")[: len(argv)] == [a.encode() for a in argv]


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
