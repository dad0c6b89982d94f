"""A throwaway certificate authority for the local stack's TLS listener.

:func:`make_ca` writes a self-signed CA (``ca.pem``) and :func:`make_server_cert` a broker
certificate it signs for ``127.0.0.1``/``localhost`` (``<name>.pem``: the PKCS#8 key followed
by the certificate, the PEM keystore Kafka reads with ``ssl.keystore.type=PEM``). The keys are
made here, live only under the stack's directory and are never used outside it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CertificateAuthority", "make_ca", "make_server_cert"]

_VALID = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertificateAuthority:
    cert_path: Path
    """The CA certificate (PEM): what clients trust (``INFERLANE_KAFKA_SSL_CAFILE``)."""
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inferlane local stack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name,
             key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    """A certificate of ``key`` for ``subject`` by ``issuer``: a random serial, valid from five
    minutes ago (clock skew) for :data:`_VALID`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALID))


def make_ca(directory: Path, common_name: str = "inferlane local CA") -> CertificateAuthority:
    """A new self-signed CA, its certificate written to ``directory/ca.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(common_name), _name(common_name), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(path, key, cert)


def make_server_cert(ca: CertificateAuthority, directory: Path, name: str = "broker",
                     hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Path:
    """A server certificate for ``hosts`` signed by ``ca``, written with its key to
    ``directory/<name>.pem`` (key first, readable by the owner only); returns the path."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (_builder(_name(name), ca.cert.subject, key)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.touch(mode=0o600)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))
    return path
