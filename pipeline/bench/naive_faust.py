"""YARDSTICK (b), not a feature: the fraud model served by a plain faust agent, written the way
a typical faust user would, to put the lane's numbers in context.

Run: ``faust -A pipeline.bench.naive_faust worker -l info --without-web`` with the same
``INFERLANE_*`` environment as the lane (same topic prefix mechanism, model and thresholds).

One agent over ``fraud.requests``: ``stream.take_events(256, within=0.1)`` (faust's ``take`` that
yields the events, so a dead letter can name partition and offset; same buffering code), each
value validated with :func:`schemas.validate_record` (bad ones to the DLQ via
:func:`pipeline.kafka.deadletter.dead_letter`),
:func:`pipeline.features.fastfeatures.fast_features` and one ``predict`` per batch on the event
loop, decisions by :func:`pipeline.inference.fraudscore.decide`, and one ``await topic.send(...)``
per result (the lane's FraudScore JSON). faust defaults everywhere except the broker URL, app id, a
static member id and a 10 s session timeout (this broker needs them) and a data dir under
``INFERLANE_STATE_DIR``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import faust
import orjson

from pipeline.features.fastfeatures import fast_features
from pipeline.inference.fraudscore import Thresholds, decide
from pipeline.inference.model import OnnxScorer
from pipeline.inference.serving import fraud_model_path
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.faustapp import broker_credentials
from pipeline.settings import load_settings
from schemas import Transaction, validate_record

__all__ = ["app", "score_transactions"]

settings = load_settings()
settings.state_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
app = faust.App(
    settings.app_id,
    broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")],
    broker_credentials=broker_credentials(settings),  # TLS/SASL as the lanes have it
    broker_session_timeout=10.0,
    datadir=str(settings.state_dir / "naive-faust"),
)

requests_topic = app.topic(settings.topic("fraud.requests"), key_type=bytes, value_type=bytes,
                           value_serializer="raw")
scores_topic = app.topic(settings.topic("fraud.scores"), key_type=bytes, value_type=bytes,
                         value_serializer="raw")
dlq_topic = app.topic(settings.topic("fraud.requests.dlq"), key_type=bytes, value_type=bytes,
                      value_serializer="raw")

scorer = OnnxScorer.load(asyncio.run(fraud_model_path(settings)), settings.fraud_model_precision,
                         settings.inference_threads)
scorer.warm_up()
thresholds = Thresholds.for_model(settings, scorer)


async def _dead_letter(event: faust.EventT[Any], error: str, reason: str) -> None:
    message = event.message
    letter = dead_letter(event.value, error=error, reason=reason, topic=message.topic,
                         partition=message.partition, offset=message.offset, lane="naive-faust")
    await dlq_topic.send(key=event.key, value=letter)


@app.agent(requests_topic)
async def score_transactions(stream: faust.StreamT[bytes]) -> None:
    """Validate, featurize, score and decide each batch; send one result at a time."""
    # StreamT (what agents are typed with) does not declare take_events; the Stream does.
    async for events in cast(faust.Stream[bytes], stream).take_events(256, within=0.1):
        valid: list[dict[str, Any]] = []
        for event in events:
            data, rejection = validate_record(event.value, Transaction)
            if data is not None:
                valid.append(data)
            elif rejection is not None:
                await _dead_letter(event, rejection.error, rejection.reason)
        if not valid:
            continue
        scores = scorer.predict_fast(fast_features(valid))
        decisions = decide(scores, thresholds)
        now = time.time()
        for txn, score, decision in zip(valid, scores.tolist(), decisions, strict=True):
            await scores_topic.send(key=txn["card_id"].encode(), value=orjson.dumps({
                "event_id": txn["event_id"], "card_id": txn["card_id"], "score": score,
                "decision": decision, "model_version": scorer.version,
                "degraded": scorer.uses_history,
                "scored_at": now, "sent_at": txn.get("sent_at"),
            }))
