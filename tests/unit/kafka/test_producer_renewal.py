"""BatchSender with a ProducerHandle: a producer whose broker state was lost (the local broker
forgets idempotent producer ids on restart) is replaced once, and the records are sent again
with the new one; other failures of a producer still in use are the caller's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from pipeline.kafka.connection import ProducerHandle, ProducerRetired
from pipeline.kafka.producer import BatchSender


class _Batch:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: int) -> object:
        self.records.append(value)
        return object()

    def close(self) -> None:
        return None


class _Producer:
    """Stands in for AIOKafkaProducer in this unit test of BatchSender's own logic."""

    def __init__(self, fail_with: BaseException | None) -> None:
        self.fail_with = fail_with
        self.sent: list[bytes] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> Any:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_with is not None:
            ack.set_exception(self.fail_with)
        else:
            self.sent.extend(batch.records)
            ack.set_result(None)
        return ack


async def test_lost_producer_state_renews_once_and_resends() -> None:
    made = [_Producer(OutOfOrderSequenceNumber()), _Producer(None)]
    handle = ProducerHandle(lambda: made.pop(0))  # type: ignore[arg-type,return-value]
    first = handle.producer
    await handle.start()
    sender = BatchSender(handle)
    await sender.send("t", [(b"k", b"v1"), (b"k", b"v2")])
    assert handle.renewals == 1 and first.stopped  # type: ignore[attr-defined]
    assert handle.producer.sent == [b"v1", b"v2"]  # type: ignore[attr-defined]
    assert handle.producer.started  # type: ignore[attr-defined]


async def test_other_failures_of_the_current_producer_are_raised() -> None:
    handle = ProducerHandle(lambda: _Producer(KafkaTimeoutError()))  # type: ignore[arg-type,return-value]
    await handle.start()
    with pytest.raises(KafkaTimeoutError):
        await BatchSender(handle).send("t", [(None, b"v")])
    assert handle.renewals == 0


class _HangingProducer(_Producer):
    """Fails the first batch with lost producer state and never settles the others, like a
    producer stopped while its batches were in flight."""

    def __init__(self) -> None:
        super().__init__(None)
        self.calls = 0

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> Any:
        self.calls += 1
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.calls == 1:
            ack.set_exception(OutOfOrderSequenceNumber())
        return ack


async def test_sends_pending_on_a_replaced_producer_are_sent_again() -> None:
    made: list[Any] = [_HangingProducer(), _Producer(None)]
    handle = ProducerHandle(lambda: made.pop(0))
    await handle.start()
    sender = BatchSender(handle)
    # Both sends are handed to the first producer; the first fails and renews it, the second
    # would wait forever on the replaced producer without the retired signal.
    await asyncio.wait_for(asyncio.gather(sender.send("t", [(b"k", b"a")]),
                                          sender.send("t", [(b"k", b"b")])), timeout=5)
    assert handle.renewals == 1
    assert sorted(handle.producer.sent) == [b"a", b"b"]


async def test_acked_gives_up_once_the_producer_is_replaced() -> None:
    handle = ProducerHandle(lambda: _Producer(None))  # type: ignore[arg-type,return-value]
    producer, retired = handle.current()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(ProducerHandle.acked(retired, never))
    await asyncio.sleep(0)
    await handle.renew(producer, OutOfOrderSequenceNumber())
    with pytest.raises(ProducerRetired):
        await asyncio.wait_for(waiting, timeout=5)
    assert handle.current()[1] is not retired and not handle.current()[1].is_set()
