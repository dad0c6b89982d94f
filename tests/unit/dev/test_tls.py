"""The local stack's throwaway CA: a certificate it signs passes a real TLS handshake with the
pipeline's own client context (hostname check on), and a client trusting another CA is refused."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from pipeline.dev.tls import make_ca, make_server_cert
from pipeline.kafka.connection import _ssl_context


async def _handshake(server_pem: Path, client: ssl.SSLContext, host: str) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_pem)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=client,
                                                       server_hostname=host)
        assert await reader.read(2) == b"ok"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_stack_ca_signs_a_broker_certificate_the_clients_accept(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "tls")
    broker = make_server_cert(ca, tmp_path / "tls")
    assert broker.stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    text = broker.read_text()
    assert text.index("BEGIN PRIVATE KEY") < text.index("BEGIN CERTIFICATE")  # Kafka's PEM order
    for host in ("127.0.0.1", "localhost"):
        await _handshake(broker, _ssl_context(ca.cert_path, None, None, None), host)


async def test_a_client_trusting_another_ca_is_refused(tmp_path: Path) -> None:
    broker = make_server_cert(make_ca(tmp_path / "a"), tmp_path / "a")
    other = make_ca(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await _handshake(broker, _ssl_context(other.cert_path, None, None, None), "127.0.0.1")


async def test_a_name_the_certificate_does_not_hold_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    broker = make_server_cert(ca, tmp_path, hosts=("localhost",))
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        await _handshake(broker, _ssl_context(ca.cert_path, None, None, None), "127.0.0.1")
