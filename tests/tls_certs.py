"""Test certificates for 127.0.0.1 (cryptography, a dev dependency): a CA, leaves it signs, self-signed ones."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Issued:
    key: Any  # the private key object, to sign further certificates with
    cert: Path  # PEM
    key_file: Path  # PEM, PKCS#8, unencrypted


def certificate(tmp: Path, name: str, subject: str = "127.0.0.1", *, ca: bool = False,
                issuer: Issued | None = None, issuer_name: str | None = None) -> Issued:
    """``tmp/name.pem`` and ``tmp/name.key`` for ``subject``: self-signed unless ``issuer`` (whose subject is
    ``issuer_name``) signs it; a leaf (``ca`` False) carries the SAN IP 127.0.0.1 so https clients accept it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(key, cert_path, key_path)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed server certificate for 127.0.0.1."""
    issued = certificate(tmp, "cert")
    return issued.cert, issued.key_file
