"""Kafka client construction in one place: every producer, consumer and admin client of the
pipeline gets its connection settings (bootstrap, client id, TLS and SASL) from here, and
faust's own connection gets the same security from :func:`security_kwargs` (see
pipeline/kafka/faustapp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from pipeline.kafka.partitioner import producer_partitioner
from pipeline.settings import Settings

T = TypeVar("T")

__all__ = ["PRODUCER_STATE_LOST", "KafkaAccessError", "ProducerHandle", "ProducerRetired",
           "client_kwargs", "connection_problem", "explained_start", "make_admin",
           "make_consumer", "make_producer", "security_kwargs", "ssl_context", "start_reader",
           "topic_partitions"]


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
        # Keyed records go where every other producer of the pipeline puts them (the
        # co-partitioned history depends on it): murmur2 unless INFERLANE_PARTITIONER says.
        "partitioner": producer_partitioner(settings.partitioner),
    }
    kwargs.update(overrides)
    producer = _Producer(**kwargs)
    producer.inferlane_settings = settings
    return producer


def make_admin(settings: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (topic creation and checks)."""
    admin = _Admin(**{**client_kwargs(settings), **overrides})
    admin.inferlane_settings = settings
    return admin


class KafkaAccessError(KafkaConnectionError):  # type: ignore[misc]
    """A client could reach no bootstrap address; the message says why, in the words of the
    settings to check (from :func:`connection_problem`), and never holds a secret."""


async def connection_problem(settings: Settings, timeout_s: float = 10.0) -> str:
    """Connect to each bootstrap address of ``settings`` as every client of the pipeline does
    (TLS, SASL handshake and authentication included); "" as soon as one works, else why each
    one failed, naming the settings to check.

    aiokafka logs the reason of a failed bootstrap and raises only ``Unable to bootstrap from
    [...]``; this tells a refused password from an untrusted certificate or a closed port.
    """
    problems = []
    kwargs = security_kwargs(settings)
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(
                host.strip("[]"), int(port), client_id=f"{settings.app_id}-connection-check",
                request_timeout_ms=int(timeout_s * 1000), **kwargs), timeout_s)
        except (OSError, KafkaError, asyncio.TimeoutError, ValueError) as exc:
            problems.append(_explain(settings, address.strip(), exc, timeout_s))
            continue
        conn.close()
        return ""
    return "; ".join(dict.fromkeys(problems))


def _explain(settings: Settings, address: str, exc: BaseException, timeout_s: float) -> str:
    """One failed connection in words: what happened and which settings decide it."""
    protocol = f"INFERLANE_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}"
    if isinstance(exc, SaslAuthenticationFailed):
        return (f"Kafka at {address} refused the SASL/{settings.kafka_sasl_mechanism} login of "
                f"user {settings.kafka_sasl_username!r}: check INFERLANE_KAFKA_SASL_USERNAME and "
                f"INFERLANE_KAFKA_SASL_PASSWORD (the broker says: {_broker_says(exc)})")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (f"Kafka at {address} does not enable INFERLANE_KAFKA_SASL_MECHANISM="
                f"{settings.kafka_sasl_mechanism} on this listener ({_broker_says(exc)})")
    if isinstance(exc, ssl.SSLCertVerificationError):
        cafile = settings.kafka_ssl_cafile or "unset, so the system CAs"
        return (f"the TLS certificate of Kafka at {address} is not trusted "
                f"({exc.verify_message}): INFERLANE_KAFKA_SSL_CAFILE ({cafile}) must hold the "
                f"CA that signed the brokers' certificates")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS with Kafka at {address} failed ({exc.reason or exc}); {protocol}: does "
                f"this listener speak TLS?")
    if isinstance(exc, asyncio.TimeoutError):
        return (f"Kafka at {address} did not answer within {timeout_s:g}s; check "
                f"INFERLANE_KAFKA_BOOTSTRAP and {protocol} (a TLS client on a plaintext "
                f"listener waits like this)")
    if isinstance(exc, OSError):
        return (f"cannot connect to Kafka at {address} (INFERLANE_KAFKA_BOOTSTRAP): "
                f"{exc.strerror or exc}")
    if isinstance(exc, KafkaConnectionError):
        return (f"Kafka at {address} closed the connection ({exc}); does {protocol} match "
                f"this listener?")
    return f"Kafka at {address}: {type(exc).__name__}: {exc}"


def _broker_says(exc: BaseException) -> str:
    """The broker's own words of a refusal, without aiokafka's class-name prefix."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("[Error") and ": " in text else text


async def explained_start(settings: Settings, start: Awaitable[None]) -> None:
    """``await start`` (a Kafka client's start); a failed bootstrap raises
    :class:`KafkaAccessError` saying why (:func:`connection_problem`) instead."""
    try:
        await start
    except KafkaConnectionError as exc:
        if isinstance(exc, KafkaAccessError) or "Unable to bootstrap" not in str(exc):
            raise
        problem = await connection_problem(settings)
        if not problem:
            raise
        raise KafkaAccessError(problem) from exc


class _ExplainedStart:
    """A client whose failed bootstrap raises :class:`KafkaAccessError` with the reason."""

    inferlane_settings: Settings

    async def start(self) -> None:
        await explained_start(self.inferlane_settings, super().start())  # type: ignore[misc]


class _Producer(_ExplainedStart, AIOKafkaProducer):  # type: ignore[misc]
    pass


class _Consumer(_ExplainedStart, AIOKafkaConsumer):  # type: ignore[misc]
    pass


class _Admin(_ExplainedStart, AIOKafkaAdminClient):  # type: ignore[misc]
    pass


log = logging.getLogger(__name__)

_SASL_BYTES = re.compile(r"""sasl_auth_bytes=b(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


class RedactSaslBytes(logging.Filter):
    """Blank the SASL authentication bytes out of aiokafka's debug log of each request.

    aiokafka logs every request at DEBUG, and a ``SaslAuthenticateRequest`` carries the
    credentials: with SASL/PLAIN, ``user\\x00user\\x00password`` in clear (measured with
    aiokafka 0.14.0 against Kafka 4.4.0). Installed on the ``aiokafka.conn`` logger when this
    module is imported, so DEBUG logging never writes a password anywhere.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "sasl_auth_bytes=" in message:
            record.msg, record.args = _SASL_BYTES.sub("sasl_auth_bytes=<redacted>", message), ()
        return True


logging.getLogger("aiokafka.conn").addFilter(RedactSaslBytes())

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
    """A group consumer for ``lane`` with manual commits.

    Dynamic membership by default: a member that dies is expired after the session timeout and
    its partitions move to the others. With ``static_membership`` the member id is
    ``<worker_id>-<lane>`` (``group.instance.id``): a worker restarted within the session timeout
    gets its partitions back without a rebalance.
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "group_id": settings.group_id(lane),
        "group_instance_id": (f"{settings.worker_id}-{lane}" if settings.static_membership
                              else None),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(settings.session_timeout_ms // 5, 100),
        "fetch_max_wait_ms": 50,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        # Records of an open or aborted transaction stay invisible (the exactly-once lanes'
        # results); without transactions on a topic this reads exactly what read_uncommitted
        # does, up to the high watermark.
        "isolation_level": "read_committed",
    }
    kwargs.update(overrides)
    consumer = _Consumer(**kwargs)
    consumer.inferlane_settings = settings
    return consumer


async def start_reader(settings: Settings, client_id: str, **overrides: Any) -> AIOKafkaConsumer:
    """A started consumer without a group (the caller assigns and seeks), no auto-commit,
    ``read_committed`` (it sees results of exactly-once lanes once, when committed)."""
    kwargs: dict[str, Any] = {**client_kwargs(settings, client_id=client_id),
                              "enable_auto_commit": False, "fetch_max_wait_ms": 50,
                              "max_partition_fetch_bytes": 4 * 1024 * 1024,
                              "isolation_level": "read_committed"}
    kwargs.update(overrides)
    consumer = _Consumer(**kwargs)
    consumer.inferlane_settings = settings
    await consumer.start()
    return consumer


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partition ids of ``topic`` (empty when it does not exist), fresh from the broker.

    ``consumer.partitions_for_topic`` only reads the client's cached metadata, which holds the
    topics the consumer subscribed to or was assigned; ``consumer.topics()`` fetches all topics
    but returns them without filling that cache (aiokafka 0.14). So a reader that has not used
    ``topic`` yet would see no partitions at all and read nothing.
    """
    known = consumer.partitions_for_topic(topic)
    if known:
        return set(known)
    cluster = await consumer._client.fetch_all_metadata()
    found = set(cluster.partitions_for_topic(topic) or ())
    if not found and await _describe_denied(consumer, topic):
        settings = getattr(consumer, "inferlane_settings", None)
        name = settings.kafka_sasl_username if settings is not None else None
        user = f"user {name!r}" if name else "this client's principal"
        # (The broker answers so whether the topic exists or not, so as not to tell.)
        raise TopicAuthorizationFailedError(
            f"topic {topic}: {user} may not read or describe it: grant the ACLs of its role "
            f"(`inferlane acls`, docs/security.md)")
    return found


async def _describe_denied(consumer: AIOKafkaConsumer, topic: str) -> bool:
    """Whether the broker refuses this client the metadata of ``topic`` (an authorizer without
    an ACL for it). A metadata request for all topics silently leaves such a topic out; only
    one that names it gets the error, and aiokafka's consumer would retry it about every
    millisecond without raising (measured against Kafka 4.4.0)."""
    client = consumer._client
    request = MetadataRequest([topic], allow_auto_topic_creation=False)
    response = await client.send(client.get_random_node(), request)
    return any(entry[1] == topic and entry[0] == TopicAuthorizationFailedError.errno
               for entry in response.topics)
