"""Unit tests of :mod:`pipeline.dev.processes`'s process handling (tiny shell children, no
broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dev.processes import WorkerProcess, wait_all_ready
from pipeline.errors import StackError


def _child(tmp_path: Path, name: str, script: str) -> WorkerProcess:
    return WorkerProcess({}, tmp_path / f"{name}.log", argv=["sh", "-c", script],
                         ready_mark="READY", label=name)


def test_processes_spawned_side_by_side_are_each_timed_when_ready(tmp_path: Path) -> None:
    # The slow one is listed first: waiting in order would stamp the fast one late.
    slow = _child(tmp_path, "slow", "sleep 1.0; echo READY; sleep 30")
    fast = _child(tmp_path, "fast", "sleep 0.1; echo READY; sleep 30")
    try:
        for process in (slow, fast):
            process.spawn()
        wait_all_ready([slow, fast], timeout_s=10)
        assert slow.ready_at is not None and fast.ready_at is not None
        assert slow.ready_at - fast.ready_at > 0.5
    finally:
        for process in (slow, fast):
            process.terminate(timeout_s=2)


def test_a_child_that_exits_before_ready_is_an_error(tmp_path: Path) -> None:
    quits = _child(tmp_path, "quits", "echo bye")
    waits = _child(tmp_path, "waits", "sleep 30")
    try:
        for process in (quits, waits):
            process.spawn()
        with pytest.raises(StackError, match="quits exited during start-up"):
            wait_all_ready([waits, quits], timeout_s=10)
    finally:
        for process in (quits, waits):
            process.terminate(timeout_s=2)
