"""faust's consumer as inferlane builds it: a fetch that faust would discard (it returned while
the flow was stopped by a rebalance) is put back on the real broker and fetched again, so table
recovery after a rebalance cannot wait for changelog records that were dropped
(``test_history_table.py::test_history_survives_a_rebalance`` hit that in about 1 run in 10);
on the local broker its thread gets the idle-fetch backoff.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.kafka.connection import make_producer, start_reader
from pipeline.kafka.faustapp import _ConsumerThread, create_app, put_back
from pipeline.settings import Settings

Fetched = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


async def _fetch(consumer: AIOKafkaConsumer, want: int) -> Fetched:
    """Fetch until ``want`` records have arrived (the broker may hand them over in pieces)."""
    out: Fetched = {}
    for _ in range(100):
        for tp, records in (await consumer.getmany(timeout_ms=200)).items():
            out.setdefault(tp, []).extend(records)
        if sum(len(r) for r in out.values()) >= want:
            break
    return out


def _offsets(fetched: Fetched) -> dict[int, list[int]]:
    return {tp.partition: [r.offset for r in records] for tp, records in fetched.items()}


async def test_records_put_back_are_fetched_again(settings: Settings) -> None:
    topic = settings.topic("fraud.requests")
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(15):
            await producer.send_and_wait(topic, b"%d" % i, partition=0 if i < 10 else 1)
    finally:
        await producer.stop()
    consumer = await start_reader(settings, "it-put-back")
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        first = await _fetch(consumer, 15)
        assert _offsets(first) == {0: list(range(10)), 1: list(range(5))}
        assert [await consumer.position(tp) for tp in tps] == [10, 5]

        assert put_back(consumer, first) == 15
        assert [await consumer.position(tp) for tp in tps] == [0, 0]
        again = await _fetch(consumer, 15)
        assert _offsets(again) == _offsets(first)
        assert [r.value for r in again[tps[0]]] == [r.value for r in first[tps[0]]]

        # A partition no longer assigned is skipped; the others are still put back.
        consumer.assign([tps[0]])
        assert put_back(consumer, again) == 10
        assert await consumer.position(tps[0]) == 0
    finally:
        await consumer.stop()


def test_the_app_consumer_puts_discarded_fetches_back(settings: Settings) -> None:
    app = create_app(settings)
    assert isinstance(app.consumer._thread, _ConsumerThread)
    # Dynamic membership unless asked for: a dead worker is expired after the session timeout.
    assert app.conf.consumer_group_instance_id is None
    static = create_app(settings.model_copy(update={"static_membership": True}))
    assert static.conf.consumer_group_instance_id == f"{settings.worker_id}-faust"
