"""Loopback ports and a self-signed certificate for the testbed servers.

Must not talk to anything beyond 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from contextlib import ExitStack
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
#: Validity of the test certificate, in days.
CERT_DAYS = 2


def free_ports(count: int) -> tuple[int, ...]:
    """Return ``count`` distinct free TCP ports on 127.0.0.1.

    Binds port 0 ``count`` times at once, reads the ports back, then closes
    the sockets. Another process may take a port before the caller binds it:
    callers retry with new ports on EADDRINUSE.

    Returns:
        The ports, distinct, in no particular order.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return tuple(ports)


def make_self_signed_cert(cert_path: Path, key_path: Path) -> None:
    """Write a self-signed P-256 certificate for ``localhost`` and ``127.0.0.1``.

    Clients trust it with ``ssl.create_default_context(cafile=cert_path)``; it
    verifies for both names (subjectAltName DNS and IP, RFC 5280 §4.2.1.6).

    Args:
        cert_path: where the PEM certificate goes.
        key_path: where the unencrypted PKCS#8 PEM private key goes (mode 0600).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address(LOOPBACK))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(alt_names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
