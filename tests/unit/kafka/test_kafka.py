"""Unit tests for pipeline.kafka.connection's connection arguments: TLS and SASL reach every Kafka
client (the aiokafka factories, the admin client, faust's own connection), and the source has no
client built around them. No broker: clients are built, not started (or started as a no-op).
"""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from pipeline.dev.loadgen import snapshot_end_offsets
from pipeline.errors import TopicError
from pipeline.kafka import topics
from pipeline.kafka.connection import (
    client_kwargs,
    make_consumer,
    make_producer,
    security_kwargs,
    ssl_context,
    start_reader,
)
from pipeline.kafka.faustapp import broker_credentials, create_app
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "sasl-Pa55-do-not-print"  # noqa: S105 - a fake secret, checked for leaks
KEY_PASSWORD = "key-Pa55-do-not-print"  # noqa: S105


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a client certificate and its key (also encrypted), made by openssl."""
    d = tmp_path_factory.mktemp("tls")
    for name, cn in (("ca", "inferlane-test-ca"), ("client", "inferlane-test-client")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", f"/CN={cn}", "-keyout", str(d / f"{name}.key"),
                        "-out", str(d / f"{name}.pem")], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "client.key"), "-aes256",
                    "-passout", f"pass:{KEY_PASSWORD}", "-out", str(d / "client-enc.key")],
                   check=True, capture_output=True)
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key",
            "enc_key": d / "client-enc.key"}


def sasl_ssl(tls: dict[str, Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "svc-inferlane", "kafka_sasl_password": PASSWORD,
        "kafka_ssl_cafile": str(tls["ca"]), "app_id": "sec", "worker_id": "w9"}
    values.update(overrides)
    return load_settings(**values)


def test_plaintext_adds_only_the_protocol() -> None:
    kwargs = client_kwargs(load_settings(kafka_bootstrap="b1:9092,b2:9092", app_id="a",
                                         worker_id="w"))
    assert kwargs == {"bootstrap_servers": "b1:9092,b2:9092", "client_id": "a-w",
                      "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_arguments(tls: dict[str, Path]) -> None:
    settings = sasl_ssl(tls)
    kwargs = client_kwargs(settings, client_id="x")
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc-inferlane"
    assert kwargs["sasl_plain_password"] == PASSWORD
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True
    subjects = [dict(item[0] for item in cert["subject"]) for cert in context.get_ca_certs()]
    assert subjects == [{"commonName": "inferlane-test-ca"}], "only the configured CA is trusted"


def test_sasl_plaintext_has_no_tls_and_ssl_has_no_sasl(tls: dict[str, Path]) -> None:
    plain = security_kwargs(load_settings(kafka_security_protocol="SASL_PLAINTEXT",
                                          kafka_sasl_username="u", kafka_sasl_password="p"))  # noqa: S106
    assert plain == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                     "sasl_plain_username": "u", "sasl_plain_password": "p"}
    tls_only = security_kwargs(load_settings(kafka_security_protocol="SSL",
                                             kafka_ssl_cafile=str(tls["ca"])))
    assert set(tls_only) == {"security_protocol", "ssl_context"}
    assert tls_only["security_protocol"] == "SSL"


def test_ssl_context_is_built_once_per_configuration(tls: dict[str, Path]) -> None:
    first = client_kwargs(sasl_ssl(tls))["ssl_context"]
    assert client_kwargs(sasl_ssl(tls), client_id="other")["ssl_context"] is first
    assert ssl_context(sasl_ssl(tls)) is first
    other = ssl_context(sasl_ssl(tls, kafka_ssl_certfile=str(tls["cert"]),
                                 kafka_ssl_keyfile=str(tls["key"])))
    assert other is not first


def test_mutual_tls_with_an_encrypted_key(tls: dict[str, Path]) -> None:
    settings = sasl_ssl(tls, kafka_ssl_certfile=str(tls["cert"]),
                        kafka_ssl_keyfile=str(tls["enc_key"]),
                        kafka_ssl_keyfile_password=KEY_PASSWORD)
    assert isinstance(ssl_context(settings), ssl.SSLContext)
    wrong = sasl_ssl(tls, kafka_ssl_certfile=str(tls["cert"]),
                     kafka_ssl_keyfile=str(tls["enc_key"]),
                     kafka_ssl_keyfile_password="not-the-password")  # noqa: S106
    with pytest.raises(ssl.SSLError):
        ssl_context(wrong)


def _assert_secured(client: Any, settings: Settings) -> None:
    """aiokafka keeps the connection arguments on its AIOKafkaClient (the producer's is
    ``client``, the consumer's and admin's ``_client``)."""
    inner = getattr(client, "_client", None) or client.client
    assert inner._security_protocol == "SASL_SSL"
    assert inner._sasl_mechanism == "SCRAM-SHA-512"
    assert inner._sasl_plain_username == "svc-inferlane"
    assert inner._sasl_plain_password == PASSWORD
    assert inner._ssl_context is ssl_context(settings)


async def test_every_factory_builds_secured_clients(
    tls: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sasl_ssl(tls)
    built: list[Any] = []

    async def no_start(self: Any) -> None:
        built.append(self)

    monkeypatch.setattr(AIOKafkaConsumer, "start", no_start)

    async def no_partitions(consumer: Any, topic: str) -> set[int]:
        return set()

    monkeypatch.setattr("pipeline.dev.loadgen.topic_partitions", no_partitions)

    async def no_topics(self: Any) -> set[str]:
        return set()

    monkeypatch.setattr(AIOKafkaConsumer, "topics", no_topics)
    producer = make_producer(settings, client_id="p")
    consumer = make_consumer(settings, "fraud")
    reader = await start_reader(settings, "reader")  # the clients' reply consumers use this
    assert await snapshot_end_offsets(settings, "t") == {}  # builds its own consumer
    for client in (producer, consumer, reader, *built):
        _assert_secured(client, settings)
    assert len(built) == 2


async def test_the_admin_client_is_secured(
    tls: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sasl_ssl(tls)
    admins: list[AIOKafkaAdminClient] = []

    async def refuse(self: AIOKafkaAdminClient) -> None:
        admins.append(self)
        raise OSError("no broker in unit tests")

    monkeypatch.setattr(AIOKafkaAdminClient, "start", refuse)
    with pytest.raises(TopicError):
        await topics.ensure_topics(settings)
    assert len(admins) == 1
    _assert_secured(admins[0], settings)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_gets_the_same_security(protocol: str, tls: dict[str, Path],
                                      tmp_path: Path) -> None:
    values: dict[str, Any] = {"kafka_security_protocol": protocol}
    if "SSL" in protocol:
        values["kafka_ssl_cafile"] = str(tls["ca"])
    if protocol.startswith("SASL"):
        values.update(kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="u",
                      kafka_sasl_password=PASSWORD)
    settings = load_settings(**values)
    app = create_app(settings, datadir=tmp_path / "faust")
    # faust's consumer, producer and admin clients all take their auth from this function.
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert {k: v for k, v in auth.items() if v is not None} == security_kwargs(settings)
    assert PASSWORD not in repr(app.conf.broker_credentials)


def test_broker_credentials_none_for_plaintext() -> None:
    assert broker_credentials(load_settings()) is None


# Each exception builds a client deliberately without client_kwargs; the reason is the value.
_NOT_FROM_CLIENT_KWARGS = {
    "pipeline/dev/kafkanode.py": "the local stack's own probe, warm-up and admin calls: "
                                 "plaintext, or a secure stack's admin user",
    "pipeline/bench/naive_faust.py": "benchmark baseline against the local stack only",
}
_CLIENT_CALL = re.compile(r"\b(AIOKafkaConsumer|AIOKafkaProducer|AIOKafkaAdminClient|"
                          r"AIOKafkaClient|faust\.App)\(\s*(.{0,40})", re.S)


def test_no_kafka_client_is_built_around_client_kwargs() -> None:
    """Every aiokafka client in the library and agents is built from client_kwargs (directly
    or through make_producer/make_consumer/start_reader), and faust only in create_app."""
    offenders = []
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("agents/**/*.py")]):
        rel = path.relative_to(REPO).as_posix()
        for match in _CLIENT_CALL.finditer(path.read_text()):
            kind, args = match.groups()
            ok = (args.startswith("**client_kwargs(") or args.startswith("**kwargs)")
                  and rel == "pipeline/kafka/connection.py") or (kind == "faust.App"
                                                       and rel == "pipeline/kafka/faustapp.py")
            if not ok and rel not in _NOT_FROM_CLIENT_KWARGS:
                offenders.append(f"{rel}: {kind}({args[:30]}")
    assert offenders == []
