"""The embedded local stack as users drive it: ``inferlane stack up|status|down|user`` in a
subprocess (``--secure`` too), clear errors for a taken port, and no process left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAuthorizationFailedError

from pipeline.dev.kafkanode import kafka_probe
from pipeline.dev.stack import LocalStack, _pid_alive
from pipeline.errors import PortInUseError, PrerequisiteMissingError
from pipeline.kafka.connection import make_producer
from pipeline.settings import load_settings

CLI = [sys.executable, "-m", "pipeline.cli"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          check=check)


def test_stack_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    up = _cli("stack", "up", "--dir", str(root))
    assert "export INFERLANE_KAFKA_BOOTSTRAP=127.0.0.1:" in up.stdout
    state = json.loads((root / "stack.json").read_text())
    pids = [p["pid"] for p in state["processes"].values()]
    try:
        assert all(_pid_alive(pid) for pid in pids)
        # The default JIT mode of a stack a person starts, and its warm-up: every round trip
        # was produced and fetched and committed by the warm-up's consumer group.
        assert "-XX:TieredStopAtLevel=1" in state["processes"]["kafka-1"]["argv"]
        assert state["jit"] == "quick"
        assert _warm_up_committed(state["endpoints"]["kafka_bootstrap"]) == 1500
        status = _cli("stack", "status", "--dir", str(root))
        report = json.loads(status.stdout)
        assert report["kafka"]["nodes"]["1"]["alive"] and report["kafka"]["error"] is None
        assert report["s3"]["alive"] and report["s3"]["error"] is None
        again = _cli("stack", "up", "--dir", str(root), check=False)
        assert again.returncode == 2 and "already runs" in again.stdout
    finally:
        down = _cli("stack", "down", "--dir", str(root))
    assert "stack down" in down.stdout
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _pid_alive(pid)], "stack down left processes running"
    assert _cli("stack", "status", "--dir", str(root), check=False).returncode == 1


def _exports(stdout: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in stdout.splitlines()
                if line.startswith("export "))


def test_a_secure_stack_by_hand_topics_a_user_and_its_rights(tmp_path: Path) -> None:
    """`stack up --secure` prints the admin's exports; `stack user` makes a SCRAM user with a
    role's ACLs and prints its exports; that user can do what its role may, and only that."""
    root = tmp_path / "secure"
    admin = _exports(_cli("stack", "up", "--secure", "--dir", str(root)).stdout)
    try:
        assert admin["INFERLANE_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        assert (root / "stack.json").stat().st_mode & 0o077 == 0  # the admin password is in it
        env = {**os.environ, **admin, "INFERLANE_TOPIC_PREFIX": "by-hand."}
        created = subprocess.run([*CLI, "topics", "create"], env=env, capture_output=True,
                                 text=True, timeout=120, check=True)
        assert "by-hand.fraud.requests" in created.stdout
        user = _exports(subprocess.run(
            [*CLI, "stack", "user", "team-a", "--role", "producer", "--dir", str(root)],
            env=env, capture_output=True, text=True, timeout=120, check=True).stdout)
        assert user["INFERLANE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert user["INFERLANE_KAFKA_SASL_USERNAME"] == "team-a"
        assert Path(user["INFERLANE_KAFKA_SSL_CAFILE"]) == root / "tls" / "ca.pem"
        report = json.loads(_cli("stack", "status", "--dir", str(root)).stdout)
        assert report["kafka"]["error"] is None
        assert report["kafka"]["secure"]["tls_bootstrap"] == user["INFERLANE_KAFKA_BOOTSTRAP"]
        settings = load_settings(**{k[len("INFERLANE_"):].lower(): v for k, v in user.items()},
                                 topic_prefix="by-hand.")

        async def produce() -> None:
            producer = make_producer(settings)
            await producer.start()
            try:
                await producer.send_and_wait("by-hand.fraud.requests", b"{}", key=b"k")
                with pytest.raises(TopicAuthorizationFailedError):  # not a producer's topic
                    await producer.send_and_wait("by-hand.fraud.scores", b"{}", key=b"k")
            finally:
                await producer.stop()
        asyncio.run(produce())
        refused = subprocess.run([*CLI, "stack", "user", "x", "--role", "admin", "--dir",
                                  str(root)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "unknown role 'admin'" in refused.stdout
    finally:
        _cli("stack", "down", "--dir", str(root))
    plain = _cli("stack", "user", "x", "--role", "producer", "--dir", str(tmp_path / "none"),
                 check=False)
    assert plain.returncode != 0 and "no secure stack runs" in plain.stdout


def _warm_up_committed(bootstrap: str) -> int:
    async def committed() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets("__inferlane_stack_warmup")
        finally:
            await admin.close()
        return sum(meta.offset for meta in offsets.values())
    return asyncio.run(committed())


def test_unknown_jit_mode_is_a_clear_error(tmp_path: Path) -> None:
    done = _cli("stack", "up", "--dir", str(tmp_path), "--jit", "fast", check=False)
    assert done.returncode == 2 and "choose one of peak, quick" in done.stderr
    assert not (tmp_path / "stack.json").exists()


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"Kafka port {port}"):
            LocalStack(tmp_path, kafka_port=port).start()
        result = _cli("stack", "up", "--dir", str(tmp_path / "s"), "--kafka-port", str(port),
                      check=False)
    assert result.returncode == 2
    assert f"Kafka port {port} on 127.0.0.1 is already in use" in result.stdout


def test_unfetched_broker_is_a_clear_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(PrerequisiteMissingError, match="make install"):
        LocalStack(tmp_path / "a").start()
    (tmp_path / "libs").mkdir()
    monkeypatch.setenv("INFERLANE_KAFKA_LIBS", str(tmp_path / "libs"))
    with pytest.raises(PrerequisiteMissingError, match="holds no kafka_2.13"):
        LocalStack(tmp_path / "b").start()
    result = subprocess.run([*CLI, "stack", "up", "--dir", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "INFERLANE_KAFKA_LIBS": str(tmp_path / "libs")})
    assert result.returncode == 2
    assert "holds no kafka_2.13" in result.stdout + result.stderr


def test_broker_restart_keeps_data_and_port(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, fresh=True)
    endpoints = stack.start()
    try:
        assert kafka_probe(endpoints.kafka_bootstrap, brokers=1, create_topic=True) == ""
        meta = (stack.nodes[0].data_dir / "meta.properties").read_text()
        for stop in (stack.stop_broker, stack.kill_broker):
            stop(1)
            assert kafka_probe(endpoints.kafka_bootstrap, timeout_s=1) != ""
            stack.start_broker(1)
            assert kafka_probe(endpoints.kafka_bootstrap, brokers=1) == ""
            # Same storage (not formatted again: the cluster id is kept) and same port.
            assert (stack.nodes[0].data_dir / "meta.properties").read_text() == meta
            assert stack.endpoints.kafka_bootstrap == endpoints.kafka_bootstrap
    finally:
        stack.stop()
    assert stack.broker is not None and not stack.broker.alive


def test_demo_process_stops_its_stack_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "demo", "--duration", "60", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    state = tmp_path / "stack" / "stack.json"
    deadline = time.monotonic() + 60
    while not state.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "demo did not start its stack"
        time.sleep(0.1)
    pids = [p["pid"] for p in json.loads(state.read_text())["processes"].values()]
    marker = f"INFERLANE_STATE_DIR={tmp_path / 'state'}"
    while not _processes_with_env(marker):
        assert time.monotonic() < deadline and proc.poll() is None, "demo started no worker"
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _pid_alive(pid)], "demo left stack processes running"
    assert not _processes_with_env(marker), "demo left its worker running"


def _processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker`` (e.g. the demo worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in environ and _pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found
