"""The real-time gate: batch checkpoints pass at once when idle, wait while real-time work is
pending (bounded), and wake as soon as it finishes."""

from __future__ import annotations

import threading
import time

from pipeline.batching.priority import RealtimeGate


def test_checkpoint_passes_at_once_when_no_realtime_work() -> None:
    gate = RealtimeGate(max_pause_s=1.0)
    started = time.monotonic()
    gate.checkpoint()
    assert time.monotonic() - started < 0.05
    assert gate.pauses == 0 and not gate.busy


def test_checkpoint_waits_at_most_max_pause_while_busy() -> None:
    gate = RealtimeGate(max_pause_s=0.05)
    with gate.realtime():
        assert gate.busy
        started = time.monotonic()
        gate.checkpoint()
        waited = time.monotonic() - started
    assert 0.04 <= waited < 1.0
    assert gate.pauses == 1
    assert not gate.busy


def test_checkpoint_wakes_when_realtime_work_ends() -> None:
    gate = RealtimeGate(max_pause_s=5.0)
    entered = threading.Event()
    release = threading.Event()

    def realtime() -> None:
        with gate.realtime():
            entered.set()
            release.wait(5)

    worker = threading.Thread(target=realtime)
    worker.start()
    entered.wait(5)
    timer = threading.Timer(0.05, release.set)
    timer.start()
    started = time.monotonic()
    gate.checkpoint()
    assert time.monotonic() - started < 2.0, "woken by the end of real-time work, not max pause"
    worker.join(5)


def test_nested_realtime_blocks_count() -> None:
    gate = RealtimeGate()
    with gate.realtime():
        with gate.realtime():
            assert gate.busy
        assert gate.busy
    assert not gate.busy


def test_a_child_gate_follows_the_parent_through_shared_memory() -> None:
    parent, child = RealtimeGate(), RealtimeGate(max_pause_s=0.05)
    child.attach(parent.share())
    assert not child.busy and not child.recently_active()
    with parent.realtime():
        assert child.busy
        started = time.monotonic()
        child.checkpoint()  # waits its max pause: the parent's work is still pending
        assert time.monotonic() - started >= 0.045 and child.pauses == 1
    assert not child.busy and child.recently_active(window_s=1.0)
    time.sleep(0.02)
    assert not child.recently_active(window_s=0.01)
