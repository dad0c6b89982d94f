"""Request/reply over Kafka for applications: :class:`FraudClient` and :class:`RecoClient`.

A client produces a request to the lane's request topic and awaits the lane's answer, matched by
the request's id (``event_id`` / ``request_id``)::

    async with FraudClient(settings) as fraud:
        outcome = await fraud.score(txn, timeout_ms=50)
        if isinstance(outcome, FraudScore): ...      # the pipeline's answer
        elif isinstance(outcome, TimedOut): ...      # not back within the deadline
        else: ...                                    # Rejected: invalid, or dead-lettered

How replies are found: each client instance runs **one** reply consumer (no consumer group)
assigned to every partition of the result topic and of the request topic's dead-letter topic,
positioned at their end before the first request is sent. Each record read resolves the waiting
call with that id, if any; records of other clients are skipped. There is no per-call consumer,
so thousands of calls may be in flight at once. A call that reaches its deadline returns a typed
:class:`TimedOut` and removes its entry at once, so sustained timeouts leak nothing (a late reply
is then skipped like any other). What is *not* guaranteed: a timed-out request may still be
scored later (it was produced); partitions added to the result topic after start are not read;
every instance reads the whole result topic, so the reply consumer costs one parse per result of
the lane (about 1-2 µs each; a service tier in front of a very busy lane should shard it).

``send()`` is fire-and-forget: it returns once the broker acknowledged the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.kafka.connection import (
    PRODUCER_STATE_LOST,
    ProducerHandle,
    make_producer,
    start_reader,
    topic_partitions,
)
from pipeline.settings import Settings
from schemas import FraudScore, RecoRequest, RecoResult, Transaction
from schemas.validation import validate_record

__all__ = ["FraudClient", "RecoClient", "Rejected", "ReplyClient", "TimedOut"]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class TimedOut:
    """No answer within the deadline. ``sent`` says whether the broker had acknowledged the
    request by then (if it had, the pipeline may still answer later)."""

    id: str
    timeout_ms: float
    sent: bool


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request is invalid: refused by the client before sending (``by="client"``), or
    dead-lettered by the lane (``by="pipeline"``). ``error`` is the DLQ class (``schema``,
    ``invalid_json``, ``unknown_user``, ...), ``reason`` the sentence naming the problem."""

    id: str
    error: str
    reason: str
    by: str


class _ReplyRouter:
    """The one reply consumer of a client: reads result and DLQ topics, resolves futures."""

    def __init__(self, settings: Settings, result_topic: str, dlq_topic: str, id_field: str,
                 client_id: str) -> None:
        self._settings = settings
        self._topics = (result_topic, dlq_topic)
        self._result_topic = result_topic
        self._id_field = id_field
        self._client_id = client_id
        self._pending: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.records_read = 0
        self.unmatched = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        consumer = await start_reader(self._settings, self._client_id, fetch_max_wait_ms=20)
        self._consumer = consumer
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve "end" now, so no reply to a later request is skipped
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._task = asyncio.create_task(self._run(), name=f"replies-{self._result_topic}")
        self._task.add_done_callback(self._on_done)

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        tps: list[TopicPartition] = []
        for topic in self._topics:
            partitions = await topic_partitions(consumer, topic)
            if not partitions:
                raise KafkaError(f"topic {topic} does not exist (run `inferlane topics create`)")
            tps.extend(TopicPartition(topic, p) for p in sorted(partitions))
        return tps

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        self._fail_all(KafkaError("client stopped"))

    def register(self, request_id: str) -> asyncio.Future[tuple[str, dict[str, Any]]]:
        if request_id in self._pending:
            raise ValueError(f"{self._id_field} {request_id!r} is already awaiting a reply")
        future: asyncio.Future[tuple[str, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future())
        self._pending[request_id] = future
        return future

    def discard(self, request_id: str) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def _run(self) -> None:
        assert self._consumer is not None  # noqa: S101 - set in start()
        while True:
            fetched = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            for tp, records in fetched.items():
                from_dlq = tp.topic != self._result_topic
                for record in records:
                    self.records_read += 1
                    self._route(record.value, from_dlq)

    def _route(self, raw: bytes | None, from_dlq: bool) -> None:
        try:
            value = orjson.loads(raw or b"null")
            if from_dlq:
                dead = value
                original = dead.get("raw", "")
                if dead.get("raw_encoding") == "base64":
                    original = base64.b64decode(original)
                value = {"__dead__": dead, **orjson.loads(original)}
            request_id = value.get(self._id_field)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return  # a DLQ record whose raw value is not a JSON object cannot be ours
        future = self._pending.pop(request_id, None) if isinstance(request_id, str) else None
        if future is None:
            self.unmatched += 1
            return
        if not future.done():
            future.set_result(("dead" if from_dlq else "result", value))

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("reply consumer of %s failed; pending calls fail", self._result_topic,
                      exc_info=exc)
            self._fail_all(exc)


class ReplyClient(Generic[R]):
    """Produce requests of one lane and await their results (see the module docstring).

    ``start()`` / ``stop()`` (idempotent) or ``async with``. Requests are JSON objects of the
    lane's request shape; the client fills ``sent_at`` when absent.
    """

    request_shape: type[msgspec.Struct]
    result_shape: type[R]
    request_topic: str
    result_topic: str
    id_field: str
    key_field: str

    def __init__(self, settings: Settings, *, default_timeout_ms: float = 1000.0,
                 client_id: str | None = None) -> None:
        self.settings = settings
        self.default_timeout_ms = default_timeout_ms
        self.client_id = (client_id
                          or f"{settings.app_id}-{type(self).__name__}-{uuid.uuid4().hex[:8]}")
        self._producer: ProducerHandle | None = None
        self._router = _ReplyRouter(
            settings, settings.topic(self.result_topic),
            settings.topic(f"{self.request_topic}.dlq"), self.id_field, self.client_id)
        self._topic = settings.topic(self.request_topic)
        self._started = False

    @property
    def pending(self) -> int:
        """Calls awaiting a reply right now (0 when idle: timed-out calls leave nothing)."""
        return self._router.pending

    @property
    def started(self) -> bool:
        return self._started

    async def start(self) -> None:
        if self._started:
            return
        # Renewed when the broker loses its idempotence state (the local broker on restart).
        producer = ProducerHandle(lambda: make_producer(self.settings, client_id=self.client_id))
        await producer.start()
        try:
            await self._router.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self._router.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> ReplyClient[R]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when the broker answers a metadata request within ``timeout_s``."""
        if self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.producer.client.fetch_all_metadata(),
                                   timeout_s)
        except (KafkaError, OSError, asyncio.TimeoutError):
            return False
        return True

    def _prepare(self, request: Mapping[str, Any] | msgspec.Struct) -> tuple[
            dict[str, Any] | None, bytes, Rejected | None]:
        value = (msgspec.to_builtins(request) if isinstance(request, msgspec.Struct)
                 else dict(request))
        if value.get("sent_at") is None:
            value["sent_at"] = time.time()
        raw = orjson.dumps(value)
        checked, rejection = validate_record(raw, self.request_shape)
        if rejection is not None:
            request_id = value.get(self.id_field)
            return None, raw, Rejected(request_id if isinstance(request_id, str) else "",
                                       rejection.error, rejection.reason, "client")
        return checked, raw, None

    async def send(self, request: Mapping[str, Any] | msgspec.Struct) -> Rejected | None:
        """Produce ``request`` without waiting for its result; return once acknowledged.

        Returns the :class:`Rejected` (nothing sent) when the request fails the schema."""
        value, raw, rejection = self._prepare(request)
        if value is None:
            return rejection
        handle = self._handle()

        async def deliver(producer: AIOKafkaProducer, retired: asyncio.Event) -> None:
            await ProducerHandle.acked(retired, await self._send(handle, producer, value, raw))

        await handle.send_renewing(deliver)
        return None

    def _handle(self) -> ProducerHandle:
        if self._producer is None:
            raise KafkaError(f"{type(self).__name__} is not started")
        return self._producer

    async def _send(self, handle: ProducerHandle, producer: AIOKafkaProducer,
                    value: dict[str, Any], raw: bytes) -> asyncio.Future[Any]:
        key = str(value[self.key_field]).encode()
        ack: asyncio.Future[Any] = await producer.send(self._topic, value=raw, key=key)
        ack.add_done_callback(lambda done: _renew_if_state_lost(done, handle, producer))
        return ack

    async def request(self, request: Mapping[str, Any] | msgspec.Struct, *,
                      timeout_ms: float | None = None) -> R | TimedOut | Rejected:
        """Produce ``request`` and await its result, at most ``timeout_ms`` (default: the
        client's ``default_timeout_ms``). Raises :class:`KafkaError` when the broker refused
        the request (not on a slow pipeline: that is :class:`TimedOut`)."""
        timeout_ms = self.default_timeout_ms if timeout_ms is None else timeout_ms
        value, raw, rejection = self._prepare(request)
        if value is None:
            assert rejection is not None  # noqa: S101 - _prepare returns one or the other
            return rejection
        request_id: str = value[self.id_field]
        reply = self._router.register(request_id)
        acks: list[asyncio.Future[Any]] = []

        async def exchange() -> tuple[str, dict[str, Any]]:
            handle = self._handle()
            ack = await self._send(handle, handle.current()[0], value, raw)
            acks.append(ack)
            ack.add_done_callback(lambda done: _fail_on_error(done, reply))
            return await reply

        try:
            kind, answer = await asyncio.wait_for(exchange(), timeout_ms / 1000.0)
        except asyncio.TimeoutError:
            return TimedOut(request_id, timeout_ms, any(_succeeded(ack) for ack in acks))
        finally:
            self._router.discard(request_id)
        if kind == "dead":
            dead = answer["__dead__"]
            return Rejected(request_id, str(dead.get("error", "")), str(dead.get("reason", "")),
                            "pipeline")
        return msgspec.convert(answer, self.result_shape)


def _renew_if_state_lost(ack: asyncio.Future[Any], handle: ProducerHandle,
                         producer: AIOKafkaProducer) -> None:
    """The broker forgot this producer's state: this call fails, the next use a new one."""
    if ack.cancelled():
        return
    exc = ack.exception()
    if isinstance(exc, PRODUCER_STATE_LOST):
        task = asyncio.ensure_future(handle.renew(producer, exc))
        _RENEWALS.add(task)
        task.add_done_callback(_RENEWALS.discard)


_RENEWALS: set[asyncio.Future[None]] = set()
"""Producer renewals in progress (kept referenced until done)."""


def _succeeded(ack: asyncio.Future[Any]) -> bool:
    return ack.done() and not ack.cancelled() and ack.exception() is None


def _fail_on_error(ack: asyncio.Future[Any], reply: asyncio.Future[Any]) -> None:
    """A request the broker refused will never be answered: fail its call now."""
    if ack.cancelled() or reply.done():
        return
    exc = ack.exception()
    if exc is not None:
        reply.set_exception(exc)


class FraudClient(ReplyClient[FraudScore]):
    """Score card transactions with the fraud lane: ``fraud.requests`` → ``fraud.scores``."""

    request_shape = Transaction
    result_shape = FraudScore
    request_topic = "fraud.requests"
    result_topic = "fraud.scores"
    id_field = "event_id"
    key_field = "card_id"

    async def score(self, txn: Mapping[str, Any] | Transaction, *,
                    timeout_ms: float | None = None) -> FraudScore | TimedOut | Rejected:
        """The pipeline's :class:`FraudScore` for ``txn``, or why there is none."""
        return await self.request(txn, timeout_ms=timeout_ms)


class RecoClient(ReplyClient[RecoResult]):
    """Ask the reco lane for a user's top-k: ``reco.requests`` → ``reco.results``."""

    request_shape = RecoRequest
    result_shape = RecoResult
    request_topic = "reco.requests"
    result_topic = "reco.results"
    id_field = "request_id"
    key_field = "user_id"

    async def recommend(self, user_id: str, *, k: int | None = None,
                        candidate_ids: Sequence[str] | None = None,
                        timeout_ms: float | None = None,
                        request_id: str | None = None) -> RecoResult | TimedOut | Rejected:
        """Fresh top-``k`` items for ``user_id`` (optionally ranking only ``candidate_ids``)."""
        request: dict[str, Any] = {"request_id": request_id or uuid.uuid4().hex,
                                   "user_id": user_id}
        if k is not None:
            request["k"] = k
        if candidate_ids is not None:
            request["candidate_ids"] = list(candidate_ids)
        return await self.request(request, timeout_ms=timeout_ms)
