"""A three-node Apache Kafka cluster of the local stack (KRaft, each node broker and controller),
and the pipeline on it while brokers fail.

The stack reports each node, the controller leader and the under-replicated partitions, and
stops and starts one node by id from the command line; the project's topics come out with three
replicas and ``min.insync.replicas=2``. Under 2,000 fraud transactions/s with the history worker
running, SIGKILLing the node that leads partitions of ``fraud.requests`` and ``fraud.scores``,
restarting every node in turn, and SIGKILLing the controller leader lose no acknowledged event
and no history update (:mod:`pipeline.bench.failover`, the code of ``inferlane bench
failover``, with shorter phases; the figures of the full runs are in docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from rich.console import Console

from pipeline.bench.failover import SCENARIOS, FailoverConfig, render, run_failover
from pipeline.dev.stack import LocalStack
from pipeline.kafka.topics import ensure_topics
from pipeline.settings import load_settings

CLI = [sys.executable, "-m", "pipeline.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180,
                          check=False)


async def _replication(bootstrap: str, topic: str) -> tuple[set[int], str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        replicas = {len(p["replicas"]) for p in described["partitions"]}
        [configs] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})])
        entries = {entry[0]: entry[1] for entry in configs.resources[0][4]}
        return replicas, entries["min.insync.replicas"]
    finally:
        await admin.close()


def test_three_nodes_replicate_topics_and_stop_and_start_by_id(tmp_path: Path) -> None:
    root = tmp_path / "stack"
    stack = LocalStack(root, fresh=True, brokers=3)
    endpoints = stack.start()
    try:
        settings = load_settings(kafka_bootstrap=endpoints.kafka_bootstrap, topic_prefix="c.")
        asyncio.run(ensure_topics(settings))
        assert asyncio.run(_replication(endpoints.kafka_bootstrap, "c.fraud.requests")) == (
            {3}, "2")

        status = _cli("stack", "status", "--dir", str(root))
        report = json.loads(status.stdout)["kafka"]
        assert status.returncode == 0, status.stdout
        assert sorted(report["nodes"]) == ["1", "2", "3"]
        assert report["controller_leader"] in (1, 2, 3) and report["under_replicated"] == []

        victim = next(n for n in (1, 2, 3) if n != report["controller_leader"])
        killed = _cli("stack", "node", "kill", str(victim), "--dir", str(root))
        assert killed.returncode == 0, killed.stdout + killed.stderr
        # The controller drops the dead node from the in-sync replicas once its broker
        # session expires (3 s in the stack's config).
        deadline = time.monotonic() + 30
        while True:
            status = _cli("stack", "status", "--dir", str(root))
            report = json.loads(status.stdout)["kafka"]
            if report["under_replicated"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status.returncode == 1 and not report["nodes"][str(victim)]["alive"]
        assert report["under_replicated"], f"a dead replica leaves partitions behind: {report}"

        started = _cli("stack", "node", "start", str(victim), "--dir", str(root))
        assert started.returncode == 0, started.stdout + started.stderr
        attached = LocalStack.attach(root)
        assert attached is not None
        attached.wait_in_sync(timeout_s=60)
        status = _cli("stack", "status", "--dir", str(root))
        assert status.returncode == 0, status.stdout
        wrong = _cli("stack", "node", "reboot", "1", "--dir", str(root))
        assert wrong.returncode == 2 and "choose one of stop, kill, start" in wrong.stderr
    finally:
        (LocalStack.attach(root) or stack).stop()


def test_brokers_fail_under_load_and_nothing_is_lost(tmp_path: Path) -> None:
    results = run_failover(tmp_path, scenarios=SCENARIOS, console=Console(width=160),
                           config=FailoverConfig(rate=2000, before_s=6, down_s=3, after_s=5))
    Console(width=200).print(render(results))
    assert [r.scenario for r in results] == list(SCENARIOS)
    for result in results:
        detail = (f"{result.scenario}: {result.acked:,} acknowledged, {result.missing} without "
                  f"a score, {result.duplicates} read twice, {result.history_lost} of "
                  f"{result.cards:,} cards' history behind, send error {result.send_error}; "
                  + "; ".join(f"{d.label} ({d.detail}): results again after {d.recovery_s} s"
                              for d in result.disruptions))
        print(detail)
        assert result.acked > 10_000 and result.cards > 1_000, detail
        assert result.send_error is None and result.missing == 0, detail
        assert result.history_lost == 0, detail
        assert all(d.recovery_s is not None for d in result.disruptions), detail
    rolling = next(r for r in results if r.scenario == "rolling")
    assert [d.label for d in rolling.disruptions] == [f"restart node {n}" for n in (1, 2, 3)]
