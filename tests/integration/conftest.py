"""Fixtures of the integration tests: the real local stack (Apache Kafka + S3 server over TCP),
per-test settings with unique topics and groups, and worker processes.

The stack starts once per session; every test gets its own topic prefix and app id, so tests
never see each other's records or consumer groups. Nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.dev.kafkadist import KAFKA_VERSION
from pipeline.dev.processes import SERVICE_READY_MARK, ServiceProcess, WorkerProcess
from pipeline.dev.stack import LocalStack, StackEndpoints, _pid_alive
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SASL_USER = "inferlane-it"
"""The user of the session broker's SASL_PLAINTEXT listener (PLAIN; password per session)."""


_STACK_TIMES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what the session's stack cost: Kafka's JVM starts once per session, not per test."""
    if "start" in _STACK_TIMES:
        terminalreporter.write_line(
            f"session stack (Apache Kafka {KAFKA_VERSION}, one node + S3 server): started in "
            f"{_STACK_TIMES['start']:.1f}s, stopped in {_STACK_TIMES.get('stop', 0.0):.1f}s")


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"), fresh=True,
                       sasl_users={SASL_USER: f"it-{secrets.token_hex(8)}"})
    started = time.monotonic()
    stack.start()
    _STACK_TIMES["start"] = time.monotonic() - started
    pids = [p.pid for p in (*stack.brokers.values(), stack.s3)
            if p is not None and p.pid is not None]
    yield stack
    stopped = time.monotonic()
    stack.stop()
    _STACK_TIMES["stop"] = time.monotonic() - stopped
    leftover = [pid for pid in pids if _pid_alive(pid)]
    assert not leftover, f"stack processes left behind: {leftover}"


@pytest.fixture(scope="session")
def endpoints(local_stack: LocalStack) -> StackEndpoints:
    return local_stack.endpoints


EnvFactory = Callable[..., dict[str, str]]


@pytest.fixture
def test_env(endpoints: StackEndpoints, tmp_path: Path) -> EnvFactory:
    """Environment for this test's processes: unique prefix and app id, fast archive windows."""
    tag = uuid.uuid4().hex[:8]

    def make(**overrides: str) -> dict[str, str]:
        env = {
            **endpoints.env(),
            "INFERLANE_TOPIC_PREFIX": f"t{tag}.",
            "INFERLANE_APP_ID": f"it-{tag}",
            "INFERLANE_WORKER_ID": "w1",
            "INFERLANE_ARCHIVE_MAX_AGE_MS": "1000",
            "INFERLANE_STATE_DIR": str(tmp_path / "state"),
            "INFERLANE_SESSION_TIMEOUT_MS": "6000",
        }
        env.update({f"INFERLANE_{k.upper()}": v for k, v in overrides.items()})
        return env

    return make


def settings_from(env: dict[str, str]) -> Settings:
    return load_settings(**{k[len("INFERLANE_"):].lower(): v for k, v in env.items()
                            if k.startswith("INFERLANE_")})


def peer_env(env: dict[str, str], tmp_path: Path, worker_id: str = "w2") -> dict[str, str]:
    """``env`` for another worker of the same app and groups: its own id and state dir."""
    return {**env, "INFERLANE_WORKER_ID": worker_id,
            "INFERLANE_STATE_DIR": str(tmp_path / worker_id)}


async def ready_settings(env: dict[str, str]) -> Settings:
    """The settings of ``env`` with every topic created: the brokers do not create topics on
    first use, and a test's load generator also writes topics of lanes it does not run
    (``fraud.labels`` is the history lane's)."""
    settings = settings_from(env)
    await ensure_topics(settings)
    return settings


@pytest.fixture
def settings(test_env: EnvFactory) -> Settings:
    return asyncio.run(ready_settings(test_env()))


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    """Start ``faust -A agents worker`` processes; every one is stopped after the test."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], *, name: str = "worker", web: bool = False) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / "logs" / f"{name}.log", cwd=REPO, web=web)
        workers.append(worker)
        worker.start()
        return worker

    yield start  # type: ignore[misc]
    for worker in workers:
        worker.terminate(timeout_s=15)
    assert all(not w.alive for w in workers)


ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start ``inferlane serve <service> [args]`` processes (ready once Kafka is connected);
    every one is stopped after the test."""
    services: list[ServiceProcess] = []

    def start(service: str, env: dict[str, str], *args: str, name: str | None = None,
              ready_mark: str = SERVICE_READY_MARK) -> ServiceProcess:
        process = ServiceProcess(service, env, tmp_path / "logs" / f"{name or service}.log",
                                 *args, ready_mark=ready_mark, cwd=REPO)
        services.append(process)
        process.start()
        return process

    yield start
    for process in services:
        process.terminate(timeout_s=15)
    assert all(not p.alive for p in services)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
