"""Certificates for tests, issued by the hub's own CA (``hub.pki.ca``), written as PEM files.

``TestPki`` holds one CA in a temporary folder and writes a certificate and key per name on
request, so a test can give a node, a consumer, the hub and the servers their own identities
exactly as ``edge-hub pki issue`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hub.pki import ca


@dataclass(frozen=True)
class Identity:
    """The files one party needs: its certificate and key, and the CA to verify others."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class TestPki:
    """A CA in ``folder``; ``identity(name, role)`` issues (once) and returns the files."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.authority = ca.CertificateAuthority.init(folder / "ca")
        self.ca_file = folder / "ca" / ca.CA_CERT

    def identity(self, name: str, role: str, *, days: float = 30,
                 dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = ()) -> Identity:
        """Issue a certificate for ``name`` in ``role`` (servers: pass their SANs)."""
        d = self.folder / "issued" / role / name
        cert, key = d / "cert.pem", d / "key.pem"
        if not cert.exists():
            d.mkdir(parents=True, exist_ok=True)
            issued = self.authority.issue(name, role, days=days, dns_names=dns_names,
                                          ip_addresses=ip_addresses)
            assert issued.key_pem is not None
            key.write_bytes(issued.key_pem)
            key.chmod(0o600)
            cert.write_bytes(issued.cert_pem)
        return Identity(cert, key, self.ca_file)

    def server(self, name: str = "localhost") -> Identity:
        """A server certificate valid for ``localhost`` and 127.0.0.1 (broker, hub)."""
        return self.identity(name, "server", dns_names=("localhost",),
                             ip_addresses=("127.0.0.1",))
