"""The faust app factory: one configured :class:`faust.App` per worker process.

faust owns the worker lifecycle (signals, logging, ``faust -A agents worker``), its web server
and, in later lanes, tables. Settings that matter on every broker are tuned here once:

* static group membership only when ``INFERLANE_STATIC_MEMBERSHIP`` is on
  (``consumer_group_instance_id`` = ``<worker_id>-faust``); dynamic members by default;
* a short session timeout (faust's default of 60 s leaves a dead worker's partitions idle a
  minute before the broker expires it);
* the Kafka security settings (TLS, SASL) as faust ``broker_credentials``, the same ones
  :func:`pipeline.kafka.connection.client_kwargs` gives every aiokafka client of the lanes;
* a consumer that puts back a fetch faust would discard (see :func:`put_back`): without it a
  table's recovery after a rebalance could wait forever for changelog records it had dropped.

The real-time lanes do not use faust streams (see :mod:`pipeline.kafka.lane` and docs/design.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaFaustConsumer
from faust.transport.drivers.aiokafka import Producer as AIOKafkaFaustProducer

from pipeline.errors import EXIT_LANE_CRASHED
from pipeline.kafka.connection import explained_start, ssl_context
from pipeline.kafka.lane import Lane
from pipeline.kafka.supervisor import LaneSupervisor, lane_states
from pipeline.metrics import CONTENT_TYPE_LATEST, render
from pipeline.settings import Settings

__all__ = ["attach_lane", "broker_credentials", "create_app", "put_back"]

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, datadir: Path | None = None) -> faust.App:
    """Build the faust app for ``settings`` (no lanes attached; see :mod:`agents`)."""
    workdir = datadir or settings.state_dir / "faust" / settings.worker_id
    workdir.parent.mkdir(parents=True, exist_ok=True)
    brokers = [f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")]
    session_timeout_s = settings.session_timeout_ms / 1000.0
    app = faust.App(
        settings.app_id,
        broker=brokers,
        broker_credentials=broker_credentials(settings),
        consumer_group_instance_id=(f"{settings.worker_id}-faust"
                                    if settings.static_membership else None),
        broker_session_timeout=session_timeout_s,
        broker_heartbeat_interval=max(session_timeout_s / 5, 0.5),
        broker_request_timeout=max(session_timeout_s * 3, 40.0),
        broker_commit_interval=settings.commit_interval_ms / 1000.0,
        topic_partitions=settings.realtime_partitions,
        # faust creates only its own small internal topics (the pipeline's come from
        # pipeline/kafka/topics.py, replicated from the cluster's size when unset).
        topic_replication_factor=settings.replication_factor or 1,
        web_port=settings.web_port,
        web_enabled=settings.web_enabled,
        datadir=str(workdir),
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
    )
    # The transport is built lazily and is reachable from import-time code; its consumer is not
    # created yet, so every consumer of this app is ours.
    app.transport.Consumer = _Consumer  # type: ignore[misc]  # an instance attribute on purpose
    app.transport.Producer = _explaining_producer(settings)  # type: ignore[misc]
    app.page("/metrics")(_metrics)
    app.page("/health")(_health)
    return app


def attach_lane(app: faust.App, settings: Settings, name: str, factory: Callable[[], Lane], *,
                realtime: bool) -> LaneSupervisor:
    """Run the lane ``factory`` builds in ``app``'s worker under a :class:`LaneSupervisor`:
    a real-time lane's crash ends the worker, another lane is restarted in-process."""

    async def end_worker(lane: str, exc: BaseException) -> None:
        log.critical("worker exits (code %d): real-time lane %s crashed: %s: %s; its "
                     "unfinished work is not committed, a restarted worker redoes it",
                     EXIT_LANE_CRASHED, lane, type(exc).__name__, exc)
        # mode stops every service gracefully (lanes commit what they finished), then raises
        # the crash reason: SystemExit gives the process its exit code.
        await app.crash(SystemExit(EXIT_LANE_CRASHED))

    supervisor = LaneSupervisor(name, factory, realtime=realtime, on_fatal=end_worker)
    app.service(cast(type[LaneSupervisor], supervisor))  # faust also accepts an instance
    return supervisor


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """faust's form of the Kafka security settings (None for PLAINTEXT); faust hands them to
    its consumer, producer and admin clients (tables, agents, topic creation)."""
    protocol = settings.kafka_security_protocol
    context = ssl_context(settings) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # noqa: S101 - Settings validated it
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context, mechanism=settings.kafka_sasl_mechanism)
    return None


async def _health(web: Any, request: Any) -> Any:
    """``GET /health``: 200 when every lane of the worker runs, 503 naming the lanes that are
    restarting (with their last error and next attempt)."""
    states = lane_states()
    ready = all(state.up for state in states)
    body = {"ready": ready, "lanes": {s.lane: asdict(s) for s in states}}
    return web.json(body, status=200 if ready else 503)


async def _metrics(web: Any, request: Any) -> Any:
    """``GET /metrics`` on the worker's web port: the process's Prometheus metrics."""
    # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 anyway.
    return web.bytes(render(), content_type=CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4")


def put_back(consumer: AIOKafkaConsumer,
             records: Mapping[TopicPartition, Sequence[ConsumerRecord[Any, Any]]]) -> int:
    """Rewind ``consumer`` to the first of ``records`` in each partition, so that the records
    returned by a fetch that will not be processed are fetched again. Returns how many records
    were put back. A partition no longer assigned is skipped (whoever owns it now reads it
    from its own position). Must run on the consumer's event loop, right after the fetch: with
    no await in between, no other seek can come between the fetch and the rewind.
    """
    put = 0
    for tp, batch in records.items():
        if not batch:
            continue
        try:
            consumer.seek(tp, batch[0].offset)
        except IllegalStateError:
            continue
        put += len(batch)
    return put


class _ConsumerThread(AIOKafkaConsumerThread):  # type: ignore[misc]
    """faust's aiokafka consumer thread, with a fetch returning while the consumer's flow is
    stopped put back instead of handed to faust.

    faust (0.15.3) passes its live set of active partitions to a fetch that waits up to a
    second in this thread. A rebalance can run meanwhile: the flow stops, table recovery seeks
    the changelog partitions to replay them, adds them to that same set, and only then resumes
    the flow. The waiting fetch can return the changelog records in between; faust's
    ``Consumer.getmany`` drops any fetch that finds the flow stopped and seeks back only the
    stream partitions, so the changelog position is already past the records that recovery
    waits for, and recovery waits forever (the table's partitions are never processed again).
    Seen in 1 of ~10 runs of ``test_history_survives_a_rebalance``; faust's own guard for it
    (``Consumer.wait_for_stopped_flow``) is never called and its flag is never cleared.
    """

    async def _fetch_records(self, consumer: AIOKafkaConsumer, active_partitions: Any,
                             timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                               max_records=max_records)
        if records and not self.consumer.flow_active:
            put = put_back(consumer, records)
            log.info("faust consumer: a fetch returned while the flow was stopped (rebalance); "
                     "%d records in %d partitions put back", put, len(records))
            return {}
        return records


def _explaining_producer(settings: Settings) -> type[AIOKafkaFaustProducer]:
    """faust's aiokafka producer, whose failed bootstrap says why in the settings' words
    (:func:`~pipeline.kafka.connection.explained_start`): it is the first Kafka client a
    worker starts, so a refused password or an untrusted certificate ends the worker there."""

    class Producer(AIOKafkaFaustProducer):  # type: ignore[misc]
        async def on_start(self) -> None:
            await explained_start(settings, super().on_start())

    return Producer


class _Consumer(AIOKafkaFaustConsumer):  # type: ignore[misc]
    """faust's aiokafka consumer with :class:`_ConsumerThread`."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)
