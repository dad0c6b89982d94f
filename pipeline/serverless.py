"""The fraud lane as an AWS-Lambda-style function: ``pipeline.serverless.handler``.

``handler(event, context)`` takes one batch from an **Amazon MSK / self-managed Kafka** event
source mapping (``eventSource: "aws:kafka"``, records grouped under ``"<topic>-<partition>"``
with base64 keys and values) or an **SQS** one (``Records[]`` with ``messageId`` and ``body``),
and does what the fraud lane does with a fetched batch, through the same functions:
:func:`schemas.validate_record`, :func:`pipeline.inference.fraudscore.score_default_history` (there
is no slow-path history table in a function, so every score uses default history and carries
``degraded: true`` for a history model, exactly as the lane does without a history view),
:func:`pipeline.kafka.deadletter.dead_letter`, and :class:`pipeline.kafka.producer.BatchSender` to
produce the FraudScores to ``fraud.scores`` and the dead letters to ``fraud.requests.dlq``.

Semantics of the answer (the partial batch response, ``ReportBatchItemFailures``):

* bad input (unreadable base64, not JSON, schema violations) is data: a dead letter with the
  reason, and the record counts as processed;
* a record whose output was not acknowledged (producer cannot connect, a send fails or times
  out, the model raises) is a failure: ``{"batchItemFailures": [{"itemIdentifier": ...}]}``
  with the SQS ``messageId``, or for Kafka ``{"topic-partition": "<t>-<p>", "offset": <o>}``.

The process-wide state (settings, the loaded and warmed model, one event loop, the producer)
lives in one :class:`FunctionRuntime`, built on first use (:func:`runtime`) or at import when
running in Lambda (its init phase); later invocations reuse it. The producer is started lazily
and dropped after a failure, so the next invocation reconnects.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.inference.fraudscore import Thresholds, score_default_history
from pipeline.inference.model import ORT_ERRORS, OnnxScorer
from pipeline.inference.serving import model_path_now
from pipeline.kafka.connection import make_producer
from pipeline.kafka.deadletter import dead_letter
from pipeline.kafka.producer import BatchSender
from pipeline.metrics import MODEL_COLD_START
from pipeline.settings import Settings, load_settings
from schemas import Rejection, Transaction, validate_record

__all__ = ["EventRecord", "FunctionRuntime", "Invocation", "Sender", "handler", "parse_event",
           "reset_runtime", "runtime"]

log = logging.getLogger(__name__)

LANE = "fraud"
_MARGIN_S = 0.5
"""Time kept back from the invocation's remaining time to build and return the answer."""

ItemId = str | dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One record of an event-source batch, whatever the source."""

    item_id: ItemId
    """Its ``itemIdentifier`` in a partial batch response."""
    topic: str
    """Kafka: the topic; SQS: the queue ARN (for the dead letter)."""
    partition: int
    """Kafka: the partition; SQS: -1."""
    offset: int
    """Kafka: the offset; SQS: -1."""
    key: bytes | None
    """Kafka: the record key; SQS: the ``messageId`` (the dead letter's key)."""
    value: bytes | None
    problem: Rejection | None = None
    """Set when the envelope itself cannot be read (e.g. a value that is not base64)."""


def _b64(text: object, what: str) -> tuple[bytes | None, Rejection | None]:
    if text is None:
        return None, None
    if not isinstance(text, str):
        return None, Rejection("invalid_encoding", f"{what}: expected a base64 string")
    try:
        return base64.b64decode(text, validate=True), None
    except (binascii.Error, ValueError) as exc:
        return text.encode(), Rejection("invalid_encoding", f"{what}: not valid base64 ({exc})")


def _kafka_records(event: Mapping[str, Any]) -> list[EventRecord]:
    out: list[EventRecord] = []
    for group, records in event["records"].items():
        for r in records:
            key, key_problem = _b64(r.get("key"), "key")
            value, problem = _b64(r.get("value"), "value")
            out.append(EventRecord(
                item_id={"topic-partition": group, "offset": r["offset"]},
                topic=r["topic"], partition=int(r["partition"]), offset=int(r["offset"]),
                key=None if key_problem else key, value=value, problem=problem or key_problem))
    return out


def _sqs_records(event: Mapping[str, Any]) -> list[EventRecord]:
    out: list[EventRecord] = []
    for r in event["Records"]:
        if r.get("eventSource") != "aws:sqs":
            raise ValueError(f"unsupported record source {r.get('eventSource')!r}")
        body = r.get("body")
        out.append(EventRecord(
            item_id=r["messageId"], topic=r.get("eventSourceARN", "sqs"), partition=-1,
            offset=-1, key=r["messageId"].encode(),
            value=body.encode() if isinstance(body, str) else None))
    return out


def parse_event(event: Mapping[str, Any]) -> tuple[str, list[EventRecord]]:
    """The source (``aws:kafka`` / ``aws:sqs``) and the records of a Lambda batch event.

    Raises ValueError for an event of another shape (the invocation fails as a whole).
    """
    if event.get("eventSource") in ("aws:kafka", "SelfManagedKafka") and "records" in event:
        return "aws:kafka", _kafka_records(event)
    if isinstance(event.get("Records"), list):
        return "aws:sqs", _sqs_records(event)
    raise ValueError("not an MSK/Kafka or SQS batch event: expected 'records' with "
                     "eventSource 'aws:kafka', or 'Records' from 'aws:sqs'")


class Sender(Protocol):
    """Where results go (a :class:`~pipeline.kafka.producer.BatchSender` in production)."""

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None: ...


@dataclass
class Invocation:
    """What one invocation did (logged as one JSON line)."""

    source: str
    records: int = 0
    scored: int = 0
    dead_lettered: int = 0
    failed: int = 0
    cold_start: bool = False
    """True for the first invocation of the process (it paid the model load)."""
    duration_ms: float = 0.0


@dataclass
class FunctionRuntime:
    """Process-wide state of the function: the warmed model, one event loop, the producer."""

    settings: Settings
    scorer: OnnxScorer
    thresholds: Thresholds
    cold_start_s: float
    """Model load + sha256 check + warm-up, measured once per process."""
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    sender: Sender | None = None
    producer: AIOKafkaProducer | None = None
    invocations: int = 0

    @classmethod
    def create(cls, settings: Settings | None = None) -> FunctionRuntime:
        """Load, verify and warm the fraud model the settings select (registry or folder)."""
        settings = settings if settings is not None else load_settings()
        started = time.monotonic()
        scorer = OnnxScorer.load(model_path_now(settings, LANE), settings.fraud_model_precision,
                                 settings.inference_threads)
        scorer.warm_up()
        cold_start_s = time.monotonic() - started
        card = scorer.card
        MODEL_COLD_START.labels("serverless", card.name, card.version).set(cold_start_s)
        log.info("serverless: fraud model %s (%s) loaded and warmed in %.3fs", scorer.version,
                 scorer.precision, cold_start_s)
        return cls(settings, scorer, Thresholds.for_model(settings, scorer), cold_start_s)

    def invoke(self, event: Mapping[str, Any], context: object = None) -> dict[str, Any]:
        """Handle one batch event on the runtime's loop; the partial batch response."""
        return self.loop.run_until_complete(self.handle(event, context))

    async def handle(self, event: Mapping[str, Any], context: object = None) -> dict[str, Any]:
        began = time.monotonic()
        source, records = parse_event(event)
        stats = Invocation(source, records=len(records), cold_start=self.invocations == 0)
        self.invocations += 1
        valid: list[dict[str, Any]] = []
        sources: list[EventRecord] = []
        dead: list[tuple[EventRecord, Rejection]] = []
        for record in records:
            data, rejection = None, record.problem
            if rejection is None:
                data, rejection = validate_record(record.value, Transaction)
            if data is not None:
                valid.append(data)
                sources.append(record)
            elif rejection is not None:
                dead.append((record, rejection))
        failed = await self._deliver(valid, sources, dead, self._budget_s(context))
        stats.scored = len(valid) - sum(1 for r in sources if id(r) in failed)
        stats.dead_lettered = len(dead) - sum(1 for r, _ in dead if id(r) in failed)
        stats.failed = len(failed)
        stats.duration_ms = (time.monotonic() - began) * 1000.0
        log.info("serverless: %s", orjson.dumps({**asdict(stats),
                                                 "cold_start_s": self.cold_start_s}).decode())
        return {"batchItemFailures": [{"itemIdentifier": r.item_id} for r in records
                                      if id(r) in failed]}

    async def _deliver(self, valid: list[dict[str, Any]], sources: list[EventRecord],
                       dead: list[tuple[EventRecord, Rejection]], budget_s: float,
                       ) -> set[int]:
        """Score and produce; the ids of the records whose output was not acknowledged."""
        letters = [(r.key, dead_letter(r.value, error=rej.error, reason=rej.reason,
                                       topic=r.topic, partition=r.partition, offset=r.offset,
                                       lane=LANE)) for r, rej in dead]
        bad = [r for r, _ in dead]
        try:
            scored = score_default_history(self.scorer, self.thresholds, valid, time.time())
        except ORT_ERRORS as exc:  # retried by the event source, then its on-failure target
            log.error("serverless: the model failed on the batch: %r", exc)
            return {id(r) for r in sources}
        scores = [(f["card_id"].encode(), orjson.dumps(f)) for f in scored]
        s = self.settings
        groups = [(s.topic("fraud.scores"), scores, sources),
                  (s.topic("fraud.requests.dlq"), letters, bad)]
        return await self._send(groups, budget_s)

    async def _send(self, groups: list[tuple[str, list[tuple[bytes | None, bytes]],
                                             list[EventRecord]]], budget_s: float) -> set[int]:
        deadline = time.monotonic() + budget_s
        try:
            sender = await asyncio.wait_for(self._sender(), budget_s)
        except Exception as exc:  # noqa: BLE001 - any connect error or timeout
            log.error("serverless: cannot connect to Kafka: %r", exc)
            await self._drop_producer()
            return {id(r) for _, _, records in groups for r in records}
        tasks = [asyncio.ensure_future(sender.send(topic, out)) for topic, out, _ in groups]
        done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failed: set[int] = set()
        for task, (topic, _, records) in zip(tasks, groups, strict=True):
            if task in done and task.exception() is None:
                continue
            reason = "timed out" if task in pending else repr(task.exception())
            log.error("serverless: producing %d records to %s failed: %s", len(records), topic,
                      reason)
            failed.update(id(r) for r in records)
        if failed:
            await self._drop_producer()  # unknown state: the next invocation reconnects
        return failed

    async def _sender(self) -> Sender:
        if self.sender is None:
            producer = make_producer(self.settings)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self.producer, self.sender = producer, BatchSender(producer, lane="serverless")
        return self.sender

    async def _drop_producer(self) -> None:
        producer, self.producer, self.sender = self.producer, None, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5.0)
            except Exception as exc:  # noqa: BLE001 - closing a broken producer: log, go on
                log.warning("serverless: closing the producer failed: %r", exc)

    def _budget_s(self, context: object) -> float:
        """The send timeout, capped by what the invocation has left (Lambda context)."""
        budget_s = self.settings.serverless_send_timeout_ms / 1000.0
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        if callable(remaining):
            budget_s = min(budget_s, max(remaining() / 1000.0 - _MARGIN_S, 0.0))
        return budget_s

    def close(self) -> None:
        """Stop the producer and close the loop (tests; Lambda just freezes the process)."""
        if not self.loop.is_closed():
            self.loop.run_until_complete(self._drop_producer())
            self.loop.close()


_RUNTIME: FunctionRuntime | None = None


def runtime() -> FunctionRuntime:
    """The process's runtime, created (model loaded and warmed) on first use."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = FunctionRuntime.create()
    return _RUNTIME


def reset_runtime() -> None:
    """Drop the runtime (tests: the next call re-reads the settings and reloads the model)."""
    global _RUNTIME
    current, _RUNTIME = _RUNTIME, None
    if current is not None:
        current.close()


def handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """AWS Lambda entry point (``pipeline.serverless.handler``) for MSK/Kafka or SQS batches."""
    return runtime().invoke(event, context)


if "AWS_LAMBDA_FUNCTION_NAME" in os.environ:  # pragma: no cover - Lambda's init phase
    # Loading here uses the init phase (full CPU, not billed against the first invocation's
    # timeout) instead of the first invocation.
    runtime()
