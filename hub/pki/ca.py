"""A small certificate authority for the fleet: who is who on MQTT and on the hub's HTTPS.

Every node gets its own client certificate whose subject common name is the node's name, so the
broker can use the certificate as the user name and its pattern ACLs can confine a node to its
own topics (DESIGN.md, trust model). The role (``agent``, ``consumer``, ``hub``, ``server``) is
the subject's organizational unit, and the extended key usage says whether the key may act as a
TLS client or a TLS server. The name must fit the role: an agent's is a node name, a hub's or a
consumer's never is one (``hub:edge-hub``, ``consumer:dashboard``), so only a node's own
certificate can ever match the broker's node patterns (``edge_agent.contract.acl``).

Keys are ECDSA P-256: small certificates and cheap handshakes on ARM boxes, supported by
Mosquitto, OpenSSL and every MQTT client library. The CA key is written with mode 0600 and never
leaves the hub's data volume; ``sign_csr`` takes only a public key from a requester and puts the
name the *hub* decided into the certificate, whatever the request asked for.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.contract import acl, protocol
from hub.errors import HubError

#: What a certificate may be used for; the role is the subject's OU.
ROLES = ("agent", "consumer", "hub", "server")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
#: What ``save`` writes for one party, named as a ``kubernetes.io/tls`` Secret names them, so
#: ``kubectl create secret generic NAME --from-file=DIR`` gives the usual keys.
OUT_CERT = "tls.crt"
OUT_KEY = "tls.key"
OUT_CA = "ca.crt"
#: Slack for clocks that are a little behind the hub's (edge boxes without NTP for a while).
BACKDATE = dt.timedelta(minutes=5)


class PkiError(HubError, code="pki_error", http_status=400):
    """A CA that cannot be created or loaded, or a request it refuses; the message says why."""


@dataclass(frozen=True)
class Issued:
    """A signed certificate, with its private key when the CA generated the key."""

    cert_pem: bytes
    key_pem: bytes | None
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from the start (no readable window)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_sans(dns_names: tuple[str, ...], ip_addresses: tuple[str, ...]) -> None:
    for d in dns_names:
        labels = d.removeprefix("*.").split(".")
        if len(d) > 253 or not all(
                0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and lb.isascii()
                and not lb.startswith("-") and not lb.endswith("-") for lb in labels):
            raise PkiError(f"{d!r} is not a DNS name")
    for a in ip_addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError as exc:
            raise PkiError(f"{a!r} is not an IP address") from exc


def _check_name(name: str, role: str) -> None:
    """An agent's name is a node name; a hub's or consumer's never is (``acl.is_service_name``).

    The broker takes the common name as the user name and gives every user the node patterns
    (``%u``): a consumer certificate named ``box-1`` would publish as node box-1. A server
    certificate is exempt: its key usage is TLS server only, so no broker or hub accepts it
    from a client.
    """
    if role == "agent" and not protocol.is_valid_node(name):
        raise PkiError(f"{name!r} is not a node name (lowercase letters, digits, '-' and '.'): "
                       "an agent certificate names the node it speaks for")
    if role in ("hub", "consumer") and not acl.is_service_name(name):
        why = ("could be a node name, and would get that node's topics on the broker"
               if protocol.is_valid_node(name) else "cannot be a user in the broker's ACL "
               "(printable, no spaces, / + #)")
        raise PkiError(f"{name!r} {why}: name a {role} certificate {role}:NAME")


def save(folder: Path, issued: Issued, ca_pem: bytes, *, overwrite: bool = False) -> list[Path]:
    """Write ``tls.crt``, ``tls.key`` (mode 0600) and ``ca.crt`` into ``folder``.

    Refuses (PkiError, nothing written) when any of them exists and ``overwrite`` is false.
    """
    if issued.key_pem is None:
        raise PkiError("nothing to save: the certificate was issued for someone else's key")
    files = [(folder / OUT_CERT, issued.cert_pem, 0o644), (folder / OUT_KEY, issued.key_pem, 0o600),
             (folder / OUT_CA, ca_pem, 0o644)]
    if not overwrite:
        taken = [str(p) for p, _, _ in files if p.exists()]
        if taken:
            raise PkiError(f"{', '.join(taken)} exists; pass --force to overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    for path, data, mode in files:
        _write(path, data, mode)
    return [p for p, _, _ in files]


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A PEM certificate request whose signature matches its ECDSA P-256 key (the requester
    holds the key); PkiError says what is wrong otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate request: {str(exc)[:200]}") from exc
    if not csr.is_signature_valid:
        raise PkiError("the request's signature does not match its key")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise PkiError("the request's key must be ECDSA P-256")
    return csr


def identity(cert_pem: bytes) -> tuple[str, str]:
    """The (name, role) a certificate was issued for."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn or not ou:
        raise PkiError("certificate has no common name or role")
    return str(cn[0].value), str(ou[0].value)


class CertificateAuthority:
    """The CA in a folder (``ca.crt`` world-readable, ``ca.key`` 0600)."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 folder: Path) -> None:
        self.cert = cert
        self._key = key
        self.folder = folder

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate every party verifies the others against."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def init(cls, folder: Path, *, name: str = "edge-hub CA",
             days: int = 3650) -> CertificateAuthority:
        """Create a new CA in ``folder``; refuses to overwrite an existing one."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (folder / CA_KEY).exists() or (folder / CA_CERT).exists():
            raise PkiError(f"a CA already exists in {folder} (remove it first to start over)")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write(folder / CA_KEY, _key_pem(key), 0o600)
        _write(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(cert, key, folder)

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        """The CA created earlier in ``folder``."""
        try:
            if (folder / CA_KEY).stat().st_mode & 0o007:
                raise PkiError(f"{folder / CA_KEY} is readable by others: chmod 600 it "
                               "(the CA key signs every identity of the fleet)")
            cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
        except FileNotFoundError as exc:
            raise PkiError(f"no CA in {folder}: run `edge-hub pki init` first") from exc
        except PermissionError as exc:
            raise PkiError(f"the CA in {folder} cannot be read: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:
            raise PkiError(f"the CA in {folder} cannot be read: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"the CA key in {folder} is not an EC key")
        return cls(cert, key, folder)

    def issue(self, name: str, role: str, *, days: float = 365, dns_names: tuple[str, ...] = (),
              ip_addresses: tuple[str, ...] = ()) -> Issued:
        """A new key and a certificate for ``name`` in ``role`` (the key is returned, not kept)."""
        if not 0 < days <= 3650:
            raise PkiError(f"days must be in (0, 3650], got {days}")
        _check_sans(dns_names, ip_addresses)
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._sign(key.public_key(), name, role, dt.timedelta(days=days),
                            dns_names=dns_names, ip_addresses=ip_addresses)
        return Issued(issued.cert_pem, _key_pem(key), issued.serial, issued.not_after)

    def sign_csr(self, csr_pem: bytes, name: str, role: str, *, ttl_s: float) -> Issued:
        """A certificate for the CSR's public key, for ``name`` and ``role`` as the caller decided.

        The CSR's own subject and extensions are ignored: a requester proves possession of the
        key (the CSR's signature), the hub decides who it is.
        """
        return self.sign_request(load_csr(csr_pem), name, role, ttl_s=ttl_s)

    def sign_request(self, csr: x509.CertificateSigningRequest, name: str, role: str, *,
                     ttl_s: float) -> Issued:
        """``sign_csr`` for a request ``load_csr`` already checked."""
        if ttl_s <= 0:
            raise PkiError(f"ttl_s must be positive, got {ttl_s}")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise PkiError("the request's key must be ECDSA P-256 (check it with load_csr)")
        return self._sign(pub, name, role, dt.timedelta(seconds=ttl_s))

    def _sign(self, pub: ec.EllipticCurvePublicKey, name: str, role: str, life: dt.timedelta, *,
              dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()) -> Issued:
        if role not in ROLES:
            raise PkiError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        if not name or len(name) > 64 or any(c in name for c in "+#/\0"):
            raise PkiError(f"{name!r} cannot be a certificate name (1-64 characters, no + # /)")
        _check_name(name, role)
        now = _now()
        if now + life > self.cert.not_valid_after_utc:
            raise PkiError(f"the CA expires at {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                           "UTC, before this certificate would: rotate the CA (docs/security.md)")
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + life)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), None, cert.serial_number,
                      cert.not_valid_after_utc)
