"""Kafka client construction in one place: every producer, consumer and admin client of the
pipeline gets its connection settings (bootstrap, client id, later security) from here.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.settings import Settings

__all__ = ["client_kwargs", "make_consumer", "make_producer"]


def client_kwargs(settings: Settings, *, client_id: str | None = None) -> dict[str, Any]:
    """Connection arguments shared by every aiokafka client."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": client_id or f"{settings.app_id}-{settings.worker_id}",
    }


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
