"""The lane supervision policy: a real-time lane's crash ends the worker, another lane restarts
in-process with a bounded backoff and shows as not up meanwhile; and the partitioner check.

The lanes here are a minimal stand-in with the two things the supervisor uses (start/stop and
the ``on_crash`` hook); the real lanes on the real broker are in
tests/integration/test_start_checks.py.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, cast

import pytest
from aiokafka.partitioner import murmur2

from pipeline.kafka.lane import Lane
from pipeline.kafka.partitioner import PartitionerCheck, partition_for, producer_partitioner
from pipeline.kafka.supervisor import LaneSupervisor, lane_states
from pipeline.metrics import LANE_RESTARTS, LANE_UP


class _Lane:
    """Starts, stops, and can crash the way a Lane does (through ``on_crash``)."""

    fail_starts = 0

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.on_crash: Any = None

    async def start(self) -> None:
        if _Lane.fail_starts:
            _Lane.fail_starts -= 1
            self.log.append("start-failed")
            raise RuntimeError("bucket gone")
        self.log.append("start")

    async def stop(self) -> None:
        self.log.append("stop")

    def crash(self, exc: BaseException) -> None:
        self.on_crash(self, exc)


def _supervisor(name: str, log: list[str], fatal: list[str], *, realtime: bool,
                lanes: list[_Lane]) -> LaneSupervisor:
    def factory() -> Lane:
        lane = _Lane(log)
        lanes.append(lane)
        return cast(Lane, lane)

    async def on_fatal(lane: str, exc: BaseException) -> None:
        fatal.append(f"{lane}: {exc}")

    sup = LaneSupervisor(name, factory, realtime=realtime, on_fatal=on_fatal)
    sup.min_backoff_s = 0.01
    sup.max_backoff_s = 0.04
    return sup


async def test_a_realtime_lane_crash_ends_the_worker_once() -> None:
    log: list[str] = []
    fatal: list[str] = []
    lanes: list[_Lane] = []
    sup = _supervisor("t-fraud", log, fatal, realtime=True, lanes=lanes)
    await sup.start()
    lanes[0].crash(RuntimeError("broker refused"))
    lanes[0].crash(RuntimeError("again"))  # a second failing task: still one exit
    await asyncio.sleep(0.05)
    assert fatal == ["t-fraud: broker refused"]
    assert len(lanes) == 1, "a real-time lane is not restarted in-process"
    assert LANE_UP.labels("t-fraud")._value.get() == 0
    await sup.stop()


async def test_an_offpath_lane_restarts_with_backoff_and_is_not_up_meanwhile() -> None:
    log: list[str] = []
    fatal: list[str] = []
    lanes: list[_Lane] = []
    sup = _supervisor("t-archive", log, fatal, realtime=False, lanes=lanes)
    sup.min_backoff_s = 0.2
    sup.max_backoff_s = 0.2
    await sup.start()
    before = LANE_RESTARTS.labels("t-archive", "RuntimeError")._value.get()
    _Lane.fail_starts = 2  # the first two restarts fail too (the bucket is still gone)
    lanes[0].crash(RuntimeError("NoSuchBucket"))
    await asyncio.sleep(0.05)
    state = {s.lane: s for s in lane_states()}["t-archive"]
    assert not state.up and state.last_error == "RuntimeError: NoSuchBucket", state
    assert LANE_UP.labels("t-archive")._value.get() == 0
    deadline = asyncio.get_running_loop().time() + 5
    while not {s.lane: s for s in lane_states()}["t-archive"].up:
        assert asyncio.get_running_loop().time() < deadline, log
        await asyncio.sleep(0.02)
    assert fatal == []
    assert log == ["start", "stop", "start-failed", "stop", "start-failed", "stop", "start"], log
    assert LANE_RESTARTS.labels("t-archive", "RuntimeError")._value.get() - before == 3
    assert LANE_UP.labels("t-archive")._value.get() == 1
    await sup.stop()
    assert log[-1] == "stop"
    assert "t-archive" not in {s.lane for s in lane_states()}


async def test_a_first_start_failure_propagates() -> None:
    log: list[str] = []
    sup = _supervisor("t-history", log, [], realtime=False, lanes=[])
    _Lane.fail_starts = 1
    with pytest.raises(RuntimeError, match="bucket gone"):
        await sup.start()


@pytest.mark.parametrize("partitions", [1, 4, 8, 12])
def test_partition_for_matches_the_clients(partitions: int) -> None:
    keys = [f"card-{i:06d}".encode() for i in range(500)]
    java = producer_partitioner("murmur2")
    crc = producer_partitioner("crc32")
    every = list(range(partitions))
    for key in keys:
        assert partition_for(key, partitions) == java(key, every, every) == (
            (murmur2(key) & 0x7FFFFFFF) % partitions)
        assert partition_for(key, partitions, "crc32") == crc(key, every, every) == (
            zlib.crc32(key) % partitions)


class _Rec:
    def __init__(self, key: bytes | None, partition: int, topic: str = "fraud.requests") -> None:
        self.key, self.partition, self.topic = key, partition, topic


def test_the_check_flags_records_of_another_partitioner_and_names_it(
        caplog: pytest.LogCaptureFixture) -> None:
    keys = [f"card-{i:04d}".encode() for i in range(200)]
    right = [_Rec(k, partition_for(k, 8)) for k in keys]
    crc = [_Rec(k, partition_for(k, 8, "crc32")) for k in keys]
    check = PartitionerCheck("fraud")
    assert check.misrouted(right, 8) == [False] * len(keys)
    assert check.misrouted([_Rec(None, 3)], 8) == [False]
    flags = check.misrouted(crc, 8)
    differ = sum(partition_for(k, 8) != partition_for(k, 8, "crc32") for k in keys)
    assert sum(flags) == differ == check.misrouted_total and differ > 100
    warning = caplog.text
    assert "librdkafka's default partitioner" in warning and "murmur2_random" in warning
    assert warning.count("are on a partition other than") == 1, "rate-limited"
