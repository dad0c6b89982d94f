"""Why a Kafka client could not connect, in the words of the settings to check
(pipeline.kafka.connection.connection_problem); the broker-side refusals (a wrong SCRAM password,
another CA) are tested against the secure stack in tests/integration/test_acls.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from pipeline.kafka.connection import KafkaAccessError, connection_problem, make_producer
from pipeline.settings import load_settings


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts connections and never answers."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


async def test_a_closed_port_names_the_bootstrap_setting() -> None:
    port = _closed_port()
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{port}")
    problem = await connection_problem(settings)
    assert problem.startswith(f"cannot connect to Kafka at 127.0.0.1:{port} "
                              "(INFERLANE_KAFKA_BOOTSTRAP): ")
    producer = make_producer(settings)
    with pytest.raises(KafkaAccessError, match="INFERLANE_KAFKA_BOOTSTRAP"):
        await producer.start()
    await producer.stop()


async def test_every_address_is_tried_and_each_reason_given_once(silent_port: int) -> None:
    closed = _closed_port()
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{closed},127.0.0.1:{closed}")
    assert (await connection_problem(settings)).count("cannot connect") == 1
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{closed},127.0.0.1:{silent_port}")
    problem = await connection_problem(settings, timeout_s=0.5)
    assert f"cannot connect to Kafka at 127.0.0.1:{closed}" in problem
    assert f"Kafka at 127.0.0.1:{silent_port} did not answer within 0.5s" in problem
    assert "INFERLANE_KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in problem
