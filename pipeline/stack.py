"""The embedded local stack: a Kafka-protocol broker and an S3 endpoint on loopback.

Used by ``make demo``, the integration tests and the benchmarks; ``inferlane stack up|down|status``
drives it by hand. Two processes, both started and stopped by this module only:

* broker: the Kafka listener of the ``noida-db`` binary (PyPI wheel), persisted to a data dir;
* S3: moto's server (``moto[server]``), in memory, with the bucket created at start.

Ports are free ones chosen at start unless given; readiness is a real Kafka metadata call and a
real S3 call; logs go to ``<root>/logs``; state (pids, ports) to ``<root>/stack.json`` so a later
``stack down`` stops exactly the processes this module started. Production does not use any of
this: point ``INFERLANE_KAFKA_BOOTSTRAP`` and ``INFERLANE_S3_*`` at real services instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import boto3
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import BinaryNotFoundError, PortInUseError, StackError

__all__ = ["DUMMY_S3_KEY", "LocalStack", "ManagedProcess", "StackEndpoints", "free_port",
           "noida_binary"]

DUMMY_S3_KEY = "inferlane-local"
_HOST = "127.0.0.1"
_STATE_FILE = "stack.json"


def noida_binary() -> Path:
    """Path of the noida-db executable shipped in its wheel; raise if it is not installed."""
    spec = importlib.util.find_spec("noida_db")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "noida-db"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("noida-db")
    if found is None:
        raise BinaryNotFoundError(
            "the noida-db broker binary is not installed: run `pip install noida-db` "
            "(or `make install`), or point INFERLANE_KAFKA_BOOTSTRAP at a running Kafka"
        )
    return Path(found)


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
            "INFERLANE_BROKER_FLAVOR": "local",
            "INFERLANE_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "INFERLANE_S3_BUCKET": self.s3_bucket,
            "INFERLANE_S3_ACCESS_KEY_ID": DUMMY_S3_KEY,
            "INFERLANE_S3_SECRET_ACCESS_KEY": DUMMY_S3_KEY,
            "INFERLANE_S3_REGION": "us-east-1",
        }


class LocalStack:
    """Start, check and stop the local broker and S3 server under ``root``.

    ``with LocalStack(root) as endpoints: ...`` starts both and always stops them. ``fresh=True``
    wipes the broker's data dir first (tests and the demo start from nothing).
    """

    def __init__(
        self,
        root: Path,
        *,
        kafka_port: int = 0,
        s3_port: int = 0,
        bucket: str = "inferlane",
        fresh: bool = False,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.root = root
        self.bucket = bucket
        self.ready_timeout_s = ready_timeout_s
        self._fresh = fresh
        self._kafka_port_wanted = kafka_port
        self._s3_port_wanted = s3_port
        self.kafka_port = 0
        self.s3_port = 0
        self.broker: ManagedProcess | None = None
        self.s3: ManagedProcess | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "broker-data"

    @property
    def endpoints(self) -> StackEndpoints:
        return StackEndpoints(
            kafka_bootstrap=f"{_HOST}:{self.kafka_port}",
            s3_endpoint_url=f"http://{_HOST}:{self.s3_port}",
            s3_bucket=self.bucket,
        )

    def start(self) -> StackEndpoints:
        """Start both services and wait until each answers a real request."""
        binary = noida_binary()
        if self._fresh and self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                return self._start_on_ports(binary)
            except StackError as exc:
                # A free port chosen here can be taken by another program before the server
                # binds it; only then (ports not given by the caller) try other ones.
                chosen = not self._kafka_port_wanted and not self._s3_port_wanted
                if not chosen or "in use" not in str(exc) or attempt == _PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_on_ports(self, binary: Path) -> StackEndpoints:
        self.kafka_port = _claim_port(self._kafka_port_wanted, "Kafka")
        self.s3_port = _claim_port(self._s3_port_wanted, "S3")
        try:
            self.broker = self._broker_process(binary)
            self.broker.start()
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

    def _broker_process(self, binary: Path) -> ManagedProcess:
        argv = [str(binary), "start", "--data-dir", str(self.data_dir), "--only", "kafka",
                "--kafka-port", str(self.kafka_port), "--host", _HOST]
        return ManagedProcess("broker", argv, self.root / "logs" / "broker.log")

    def stop_broker(self) -> None:
        """Stop the broker's Kafka service gracefully (``noida-db stop kafka``: its data is
        saved, the process stays up): for restart tests. Stopping the whole process instead
        (SIGTERM) can lose the last acknowledged records (docs/design.md)."""
        self._broker_command("stop")

    def start_broker(self) -> None:
        """Start the Kafka service again on the same port and data dir (a new broker process
        when the old one is gone), and wait until it answers."""
        if self.broker is None or not self.broker.alive:
            self.broker = self._broker_process(noida_binary())
            self.broker.start()
        else:
            self._broker_command("start")
        assert self.broker is not None  # noqa: S101 - set above
        self._wait_for("broker", self.broker, self._kafka_ready)

    def _broker_command(self, verb: str) -> None:
        result = subprocess.run(  # noqa: S603 - argv is built here
            [str(noida_binary()), verb, "kafka", "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise StackError(f"noida-db {verb} kafka failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-500:]}")

    def stop(self) -> None:
        """Stop what this object started (idempotent) and forget the saved state."""
        for proc in (self.broker, self.s3):
            if proc is not None:
                proc.stop()
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
        assert self.broker is not None and self.s3 is not None  # noqa: S101 - set by start()
        self._wait_for("broker", self.broker, self._kafka_ready)
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
            time.sleep(0.1)
        raise StackError(
            f"{what} not ready after {self.ready_timeout_s:.0f}s ({last_error}); "
            f"log {proc.log_path}:\n{proc.log_tail()}"
        )

    def _kafka_ready(self) -> str:
        return kafka_probe(self.endpoints.kafka_bootstrap)

    def _s3_ready(self) -> str:
        return s3_probe(self.endpoints, create_bucket=True)

    # --- state for the CLI ----------------------------------------------------------------
    def _save_state(self) -> None:
        assert self.broker is not None and self.s3 is not None  # noqa: S101 - set by start()
        state = {
            "endpoints": asdict(self.endpoints),
            "processes": {
                proc.name: {"pid": proc.pid, "argv": proc.argv, "log": str(proc.log_path)}
                for proc in (self.broker, self.s3)
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
        stack = cls(root, bucket=endpoints.s3_bucket)
        stack.kafka_port = int(endpoints.kafka_bootstrap.rsplit(":", 1)[1])
        stack.s3_port = int(endpoints.s3_endpoint_url.rsplit(":", 1)[1])
        procs = {}
        for name, info in state["processes"].items():
            proc = ManagedProcess(name, info["argv"], Path(info["log"]), pid=info["pid"])
            # Only a process whose command line is still ours may be signalled (pids get reused).
            procs[name] = proc if _cmdline_matches(info["pid"], info["argv"]) else None
        stack.broker, stack.s3 = procs.get("broker"), procs.get("s3")
        return stack

    def status(self) -> dict[str, object]:
        """Liveness and reachability of each service, for ``inferlane stack status``."""
        return {
            "endpoints": asdict(self.endpoints),
            "broker": {"pid": self.broker.pid if self.broker else None,
                       "alive": bool(self.broker and self.broker.alive),
                       "error": kafka_probe(self.endpoints.kafka_bootstrap) or None},
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


def kafka_probe(bootstrap: str, timeout_s: float = 3.0) -> str:
    """Do a real metadata request; return "" when it works, else the error text.

    A plain TCP connect to the first bootstrap address comes first: while the broker is still
    starting, aiokafka would log every refused connection as an error on the user's terminal.
    """
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        return f"kafka: {exc!r}"

    async def probe() -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
        )
        try:
            await asyncio.wait_for(admin.start(), timeout_s)
            await asyncio.wait_for(admin.list_topics(), timeout_s)
        finally:
            await admin.close()

    # Run in a thread with its own loop: callers may or may not be inside a running loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(asyncio.run, probe()).result(timeout=timeout_s * 3)
        except (KafkaError, OSError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as exc:
            return f"kafka: {exc!r}"
    return ""


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
