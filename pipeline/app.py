"""The faust app factory: one configured :class:`faust.App` per worker process.

faust owns the worker lifecycle (signals, logging, ``faust -A agents worker``), its web server
and, in later lanes, tables. Settings that matter on every broker are tuned here once:

* static group membership (``consumer_group_instance_id`` from ``INFERLANE_WORKER_ID``): a worker
  restarted with the same id gets its partitions back at once;
* a short session timeout (the default 60 s makes group joins slow on some brokers);
* the Kafka security settings (TLS, SASL) as faust ``broker_credentials``, the same ones
  :func:`pipeline.kafka.client_kwargs` gives every aiokafka client of the lanes.

The real-time lanes do not use faust streams (see :mod:`pipeline.lane` and docs/design.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import faust
from mode import Service

from pipeline.kafka import apply_idle_fetch_backoff, ssl_context
from pipeline.metrics import CONTENT_TYPE_LATEST, render
from pipeline.settings import Settings

__all__ = ["broker_credentials", "create_app"]

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
        consumer_group_instance_id=f"{settings.worker_id}-faust",
        broker_session_timeout=session_timeout_s,
        broker_heartbeat_interval=max(session_timeout_s / 5, 0.5),
        broker_request_timeout=max(session_timeout_s * 3, 40.0),
        broker_commit_interval=settings.commit_interval_ms / 1000.0,
        topic_partitions=settings.realtime_partitions,
        topic_replication_factor=settings.replication_factor,
        web_port=settings.web_port,
        web_enabled=settings.web_enabled,
        datadir=str(workdir),
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
    )
    app.page("/metrics")(_metrics)
    if settings.is_local_broker and settings.idle_fetch_sleep_ms:
        # faust's consumer only carries internal and (later) table topics, off the hot path:
        # a longer backoff costs no lane latency and saves a busy-polling core.
        backoff_ms = max(settings.idle_fetch_sleep_ms, 20.0)
        app.service(cast(type[Service], _IdleFetchBackoff(app, backoff_ms)))
    return app


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


async def _metrics(web: Any, request: Any) -> Any:
    """``GET /metrics`` on the worker's web port: the process's Prometheus metrics."""
    # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 anyway.
    return web.bytes(render(), content_type=CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4")


class _IdleFetchBackoff(Service):  # type: ignore[misc]
    """Local broker only: give faust's own consumer the idle-fetch backoff of the lanes.

    faust runs its aiokafka consumer in a thread with a hard-coded ``fetch_max_wait_ms=1500``;
    a broker without fetch long-poll answers at once, and that thread would spin a core even
    when the worker is idle (measured: 87% CPU). Started after faust's consumer.
    """

    def __init__(self, app: faust.App, backoff_ms: float) -> None:
        super().__init__()
        self._app = app
        self._backoff_ms = backoff_ms

    async def on_start(self) -> None:
        thread = getattr(self._app.consumer, "_thread", None)
        consumer = getattr(thread, "_consumer", None)
        if consumer is None:
            log.warning("faust consumer not found; idle fetch backoff not applied")
            return
        apply_idle_fetch_backoff(consumer, self._backoff_ms)
