"""YARDSTICK (c), not a feature: the fraud model behind a bare aiokafka loop, to show what the
hardware, broker and model allow without any framework. Run: ``python -m pipeline.bench.bare_loop``
with the same ``INFERLANE_*`` environment as the lane.

One consumer (group ``<app_id>-bare``, static member id, manual commits, the lane's fetch
settings from :func:`pipeline.kafka.connection.make_consumer`), one loop: ``getmany`` -> validate ->
:func:`pipeline.features.fastfeatures.fast_features` -> one ``predict`` over the whole fetch (on
the loop) -> :meth:`pipeline.kafka.producer.BatchSender.send` of the results (and dead letters) ->
commit. No micro-batcher, no concurrency, no faust. On the local broker the idle-fetch backoff is
applied. SIGTERM/SIGINT finish the current fetch, commit and leave.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from pipeline.bench.sut import BARE_READY_MARK
from pipeline.features.fastfeatures import fast_features
from pipeline.inference.fraudscore import Thresholds, decide
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.connection import make_consumer, make_producer
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.producer import BatchSender
from pipeline.settings import Settings, load_settings
from schemas import Transaction, validate_record

__all__ = ["main", "run"]

log = logging.getLogger("bare_loop")

MAX_RECORDS_PER_FETCH = 4096  # the lane's Lane.max_records_per_fetch, for a like-for-like fetch
Out = list[tuple[bytes | None, bytes]]


class _Scorer:
    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.model = OnnxScorer.load(model_dir, settings.fraud_model_precision,
                                     settings.inference_threads)
        self.model.warm_up()
        self.thresholds = Thresholds.for_model(settings, self.model)

    def results(self, valid: list[dict[str, Any]]) -> Out:
        scores = self.model.predict_fast(fast_features(valid))
        now = time.time()
        return [(txn["card_id"].encode(), orjson.dumps({
            "event_id": txn["event_id"], "card_id": txn["card_id"], "score": score,
            "decision": decision, "model_version": self.model.version,
            "degraded": self.model.uses_history,
            "scored_at": now, "sent_at": txn.get("sent_at"),
        })) for txn, score, decision in zip(valid, scores.tolist(),
                                            decide(scores, self.thresholds), strict=True)]


def _split(records: list[ConsumerRecord[bytes, bytes]]) -> tuple[list[dict[str, Any]], Out]:
    valid: list[dict[str, Any]] = []
    dead: Out = []
    for record in records:
        data, rejection = validate_record(record.value, Transaction)
        if data is not None:
            valid.append(data)
        elif rejection is not None:
            dead.append((record.key, dead_letter(
                record.value, error=rejection.error, reason=rejection.reason, topic=record.topic,
                partition=record.partition, offset=record.offset, lane="bare-loop")))
    return valid, dead


async def _loop(settings: Settings, consumer: AIOKafkaConsumer, sender: BatchSender,
                scorer: _Scorer, stop: asyncio.Event) -> None:
    scores_topic, dlq_topic = settings.topic("fraud.scores"), settings.topic("fraud.requests.dlq")
    while not stop.is_set():
        fetched = await consumer.getmany(timeout_ms=100, max_records=MAX_RECORDS_PER_FETCH)
        if not fetched:
            continue
        valid, dead = _split([r for records in fetched.values() for r in records])
        results = scorer.results(valid) if valid else []
        await asyncio.gather(sender.send(scores_topic, results), sender.send(dlq_topic, dead))
        await consumer.commit()


async def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scorer = _Scorer(settings, await fraud_model_path(settings))
    producer = make_producer(settings)
    consumer = make_consumer(settings, "bare")
    consumer.subscribe([settings.topic("fraud.requests")])
    await producer.start()
    try:
        await consumer.start()
        log.info("%s (group %s)", BARE_READY_MARK, settings.group_id("bare"))
        await _loop(settings, consumer, BatchSender(producer), scorer, stop)
    finally:
        await consumer.stop()
        await producer.stop()
        log.info("bare_loop: stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] %(message)s")
    asyncio.run(run(load_settings()))


if __name__ == "__main__":
    main()
