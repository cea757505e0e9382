"""The node's key and certificate on disk, and what a certificate there is good for.

Why a module of its own: the files are the one thing the keeper, the MQTT link (which loads
them into its TLS context) and a restarted agent share, so how they are written decides what a
crash can leave behind. Each request uses a new P-256 key (a key never outlives the
certificate it was made for). The key is written with mode 0600 from the start, both files go
through a temporary name and a rename, key first; a crash between the two renames leaves a
certificate that does not match its key, which ``Held.load`` reports as unusable, so the next
start asks for a new one instead of failing to connect.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (what the hub's CA signs)."""
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: ec.EllipticCurvePrivateKey, node: str) -> str:
    """A certificate request for ``key``; its subject is a hint only (the hub decides)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node[:64])])
    req = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return req.public_bytes(serialization.Encoding.PEM).decode()


def common_name(cert: x509.Certificate) -> str:
    """The subject's common name ('' when there is none)."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else ""


@dataclass(frozen=True)
class Held:
    """A certificate this node holds: its window of validity, serial and name."""

    node: str
    serial: int
    not_before: float
    not_after: float

    @classmethod
    def of(cls, cert: x509.Certificate) -> Held:
        return cls(common_name(cert), cert.serial_number,
                   cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> Held | None:
        """The certificate on disk when it can be used with the key beside it, else None
        (missing, unreadable, or not the key's certificate). Blocking."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        except (OSError, ValueError, TypeError):
            return None
        if key.public_key() != cert.public_key():
            return None
        return cls.of(cert)

    def due(self, fraction: float) -> float:
        """When ``fraction`` of the life has passed (a UNIX time)."""
        return self.not_before + fraction * (self.not_after - self.not_before)

    def expires_in(self, now: float) -> float:
        return self.not_after - now


def check_grant(cert_pem: bytes, key: ec.EllipticCurvePrivateKey, node: str,
                now: float) -> Held:
    """The hub's answer as a certificate this node can use; ValueError says why not."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.public_key() != key.public_key():
        raise ValueError("the certificate is not for the key this node sent")
    held = Held.of(cert)
    if held.node != node:
        raise ValueError(f"the certificate is for {held.node!r}, not this node ({node!r})")
    if held.not_after <= now:
        raise ValueError("the certificate has already expired")
    return held


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a temporary name beside ``path`` with ``mode`` from the start."""
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)  # an existing temp file keeps its old mode through O_CREAT
    return tmp


def store(cert_file: Path, key_file: Path, cert_pem: bytes,
          key: ec.EllipticCurvePrivateKey) -> None:
    """Put the key (0600) and its certificate in place, key first. Blocking."""
    for folder in {cert_file.parent, key_file.parent}:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_tmp = _write(key_file, key_pem, 0o600)
    cert_tmp = _write(cert_file, cert_pem, 0o644)
    key_tmp.replace(key_file)
    cert_tmp.replace(cert_file)


def utc(ts: float) -> str:
    """A UNIX time for a log line."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
