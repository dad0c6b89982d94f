"""Kafka client construction in one place: every producer, consumer and admin client of the
pipeline gets its connection settings (bootstrap, client id, TLS and SASL) from here, and
faust's own connection gets the same security from :func:`security_kwargs` (see pipeline/app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)
from aiokafka.helpers import create_ssl_context

from pipeline.settings import Settings

T = TypeVar("T")

__all__ = ["PRODUCER_STATE_LOST", "ProducerHandle", "ProducerRetired", "apply_idle_fetch_backoff",
           "client_kwargs", "make_consumer", "make_producer", "security_kwargs", "ssl_context",
           "start_reader"]


def client_kwargs(settings: Settings, *, client_id: str | None = None) -> dict[str, Any]:
    """Connection arguments shared by every aiokafka client: bootstrap, client id, security."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id or f"{settings.app_id}-{settings.worker_id}",
        **security_kwargs(settings),
    }


def security_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka's security arguments for ``settings`` (only ``security_protocol`` when
    PLAINTEXT). The password is read out of its SecretStr here and nowhere else."""
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # noqa: S101 - Settings validated it
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kwargs


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the Kafka clients: the configured CA (else the system CAs), the
    client certificate for mutual TLS if any; hostname checks always on. Built once per
    distinct set of files, so every client of a process shares one context."""
    password = settings.kafka_ssl_keyfile_password
    return _ssl_context(settings.kafka_ssl_cafile, settings.kafka_ssl_certfile,
                        settings.kafka_ssl_keyfile,
                        None if password is None else password.get_secret_value())


@functools.lru_cache(maxsize=4)
def _ssl_context(cafile: Path | None, certfile: Path | None, keyfile: Path | None,
                 password: str | None) -> ssl.SSLContext:
    context: ssl.SSLContext = create_ssl_context(cafile=cafile, certfile=certfile,
                                                 keyfile=keyfile, password=password)
    return context


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer for results: ``acks=all`` and idempotence (no loss, no retry duplicates),
    1 ms linger so concurrent sends share a request."""
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "acks": "all",
        "linger_ms": 1,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
        "enable_idempotence": True,
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


log = logging.getLogger(__name__)

#: Errors after which an idempotent producer cannot go on: the broker no longer knows its
#: producer id or sequence numbers (producer state expired, or lost: the local broker forgets
#: it on restart). Only a new producer (a new producer id) can send again.
PRODUCER_STATE_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                       InvalidProducerIdMapping)


class ProducerRetired(KafkaError):  # type: ignore[misc]
    """The producer was replaced while this send waited for its acknowledgement: the send's
    fate is unknown (a stopped producer's pending batches may never complete), so send again."""


class ProducerHandle:
    """A component's current producer, replaced by a new one when the broker lost its state.

    Senders take :meth:`current` for every send, await acknowledgements through :meth:`acked`
    (which gives up with :class:`ProducerRetired` once that producer is replaced) and call
    :meth:`renew` with the producer that failed with one of :data:`PRODUCER_STATE_LOST`;
    concurrent callers renew it only once. What was not acknowledged must be sent again by
    the caller (at-least-once).
    """

    def __init__(self, factory: Callable[[], AIOKafkaProducer]) -> None:
        self._factory = factory
        self.producer = factory()
        self._retired = asyncio.Event()
        self._lock = asyncio.Lock()
        self.renewals = 0

    def current(self) -> tuple[AIOKafkaProducer, asyncio.Event]:
        """The producer to send with, and the event set when it is replaced."""
        return self.producer, self._retired

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def renew(self, failed: AIOKafkaProducer, reason: BaseException) -> None:
        async with self._lock:
            if self.producer is not failed:
                return  # another send renewed it meanwhile
            log.warning("producer lost its broker state (%r): starting a new one", reason)
            fresh = self._factory()
            await fresh.start()
            self.producer = fresh
            retired, self._retired = self._retired, asyncio.Event()
            retired.set()
            self.renewals += 1
        with contextlib.suppress(Exception):  # its pending batches are failing anyway
            await asyncio.wait_for(failed.stop(), 5.0)

    async def send_renewing(
            self, attempt: Callable[[AIOKafkaProducer, asyncio.Event], Awaitable[T]]) -> T:
        """Run ``attempt`` with the current producer; once more with a new one when it failed
        because the broker lost this producer's state (the producer is renewed first) or
        because the producer was replaced meanwhile (:class:`ProducerRetired`). Some records
        may then be written twice (at-least-once); other failures are the caller's."""
        producer, retired = self.current()
        try:
            return await attempt(producer, retired)
        except KafkaError as exc:
            if isinstance(exc, PRODUCER_STATE_LOST):
                await self.renew(producer, exc)
            elif self.producer is producer:
                raise  # a failure of a producer still in use
            # Renewed by this send or a concurrent one (whose old producer then failed this).
            return await attempt(*self.current())

    @staticmethod
    async def acked(retired: asyncio.Event, ack: Awaitable[T]) -> T:
        """``await ack``, unless the producer it was sent with is replaced first: then raise
        :class:`ProducerRetired` (the old producer may never settle it)."""
        pending = asyncio.ensure_future(ack)
        if retired.is_set() and not pending.done():
            pending.add_done_callback(_retrieve)
            raise ProducerRetired("the producer was replaced before this send was acknowledged")
        waiter = asyncio.ensure_future(retired.wait())
        try:
            await asyncio.wait({pending, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if pending.done():
            return pending.result()
        pending.add_done_callback(_retrieve)
        raise ProducerRetired("the producer was replaced before this send was acknowledged")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no 'exception was never retrieved')."""
    if not future.cancelled():
        future.exception()


def make_consumer(settings: Settings, lane: str, **overrides: Any) -> AIOKafkaConsumer:
    """A group consumer for ``lane`` with static membership and manual commits.

    Static membership (``group_instance_id`` = ``<worker_id>-<lane>``) lets a restarted worker get
    its partitions back at once instead of waiting for the session timeout; on the local broker a
    dead dynamic member would otherwise wedge the group.
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "group_id": settings.group_id(lane),
        "group_instance_id": f"{settings.worker_id}-{lane}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(settings.session_timeout_ms // 5, 100),
        "fetch_max_wait_ms": 50,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "isolation_level": "read_uncommitted",
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(**kwargs)


def apply_idle_fetch_backoff(consumer: AIOKafkaConsumer, backoff_ms: float) -> None:
    """Make an empty fetch wait ``backoff_ms`` before the next one (client-side long-poll).

    For brokers that answer an empty fetch at once instead of holding it for
    ``fetch_max_wait_ms`` (the local noida-db broker): aiokafka's fetcher would re-send fetches
    back to back and spin a core while idle. This wraps the fetcher of a *started* consumer so
    that a fetch that brought no new data is followed by a short sleep; records that do arrive
    are never dropped or delayed by more than ``backoff_ms``. It relies on aiokafka's private
    ``Fetcher._proc_fetch_request`` (aiokafka is pinned to a tested minor version).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    original = getattr(fetcher, "_proc_fetch_request", None)
    if fetcher is None or original is None:
        raise RuntimeError("apply_idle_fetch_backoff needs a started aiokafka consumer")
    if getattr(original, "_inferlane_backoff", False):
        return
    delay_s = backoff_ms / 1000.0

    async def fetch_with_backoff(*args: Any, **kwargs: Any) -> Any:
        has_new_data = await original(*args, **kwargs)
        if not has_new_data:
            try:
                await asyncio.sleep(delay_s)
            except asyncio.CancelledError:
                # Same contract as aiokafka's own fetch task: on close() or unassignment it is
                # cancelled and must end quietly (close() awaits it without suppressing).
                return False
        return has_new_data

    fetch_with_backoff._inferlane_backoff = True  # type: ignore[attr-defined]
    fetcher._proc_fetch_request = fetch_with_backoff


async def start_reader(settings: Settings, client_id: str, *, idle_sleep_ms: float | None = None,
                       **overrides: Any) -> AIOKafkaConsumer:
    """A started consumer without a group (the caller assigns and seeks), no auto-commit.

    On the local broker an empty fetch is followed by ``idle_sleep_ms`` (default
    ``INFERLANE_IDLE_FETCH_SLEEP_MS``; pass ``background_idle_fetch_sleep_ms`` for readers off
    the latency path), so an idle reader does not spin a core and the broker with it.
    """
    kwargs: dict[str, Any] = {**client_kwargs(settings, client_id=client_id),
                              "enable_auto_commit": False, "fetch_max_wait_ms": 50,
                              "max_partition_fetch_bytes": 4 * 1024 * 1024}
    kwargs.update(overrides)
    consumer = AIOKafkaConsumer(**kwargs)
    await consumer.start()
    sleep_ms = settings.idle_fetch_sleep_ms if idle_sleep_ms is None else idle_sleep_ms
    if settings.is_local_broker and sleep_ms:
        apply_idle_fetch_backoff(consumer, sleep_ms)
    return consumer
