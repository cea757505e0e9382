"""The hub's CA (``hub.pki.ca``): what it writes, what it signs, and what it refuses."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.pki import ca


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "whoever") -> bytes:
    req = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return req.public_bytes(serialization.Encoding.PEM)


def _life(cert: x509.Certificate) -> dt.timedelta:
    return cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def authority(tmp_path: Path) -> ca.CertificateAuthority:
    return ca.CertificateAuthority.init(tmp_path / "ca")


def test_init_writes_the_key_private_and_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    a = ca.CertificateAuthority.init(folder, name="site CA", days=30)
    assert _mode(folder / ca.CA_KEY) == 0o600
    assert _mode(folder / ca.CA_CERT) == 0o644
    assert _mode(folder) == 0o700
    assert a.cert.subject.rfc4514_string() == "CN=site CA"
    assert a.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert dt.timedelta(days=29) < _life(a.cert) <= dt.timedelta(days=30)
    key_before = (folder / ca.CA_KEY).read_bytes()
    with pytest.raises(ca.PkiError, match="already exists"):
        ca.CertificateAuthority.init(folder)
    assert (folder / ca.CA_KEY).read_bytes() == key_before


def test_load_gives_the_same_ca_and_explains_what_is_missing(
        tmp_path: Path, authority: ca.CertificateAuthority) -> None:
    again = ca.CertificateAuthority.load(authority.folder)
    assert again.cert_pem == authority.cert_pem
    with pytest.raises(ca.PkiError, match="edge-hub pki init"):
        ca.CertificateAuthority.load(tmp_path / "nothing")
    (authority.folder / ca.CA_KEY).chmod(0o644)
    with pytest.raises(ca.PkiError, match="readable by others"):
        ca.CertificateAuthority.load(authority.folder)
    (authority.folder / ca.CA_KEY).chmod(0o600)
    (authority.folder / ca.CA_KEY).write_bytes(b"not a key")
    with pytest.raises(ca.PkiError, match="cannot be read"):
        ca.CertificateAuthority.load(authority.folder)


def test_issue_names_the_party_and_its_role_and_signs_with_the_ca(
        authority: ca.CertificateAuthority) -> None:
    issued = authority.issue("cam-box-1", "agent", days=10)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(authority.cert)
    assert ca.identity(issued.cert_pem) == ("cam-box-1", "agent")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert dt.timedelta(days=9) < _life(cert) <= dt.timedelta(days=10)
    assert issued.key_pem is not None
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert key.public_key() == cert.public_key()
    assert issued.serial == cert.serial_number


def test_a_server_certificate_serves_tls_for_its_names(authority: ca.CertificateAuthority) -> None:
    issued = authority.issue("mosquitto", "server", dns_names=("mqtt.site.local",),
                             ip_addresses=("10.0.0.5",))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.site.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "n", "role": "admin"}, "unknown role"),
    ({"name": "", "role": "agent"}, "cannot be a certificate name"),
    ({"name": "a/b", "role": "agent"}, "cannot be a certificate name"),
    ({"name": "x" * 65, "role": "agent"}, "cannot be a certificate name"),
    ({"name": "n", "role": "agent", "days": 0}, "days"),
    # the name fits the role: a node name for an agent, never one for a hub or a consumer
    ({"name": "Box_1", "role": "agent"}, "not a node name"),
    ({"name": "consumer:x", "role": "agent"}, "not a node name"),
    ({"name": "dash", "role": "consumer"}, "could be a node name"),
    ({"name": "box-1", "role": "hub"}, "could be a node name"),
    ({"name": "consumer: x", "role": "consumer"}, "cannot be a user in the broker's ACL"),
    ({"name": "n", "role": "server", "dns_names": ("bad name",)}, "not a DNS name"),
    ({"name": "n", "role": "server", "ip_addresses": ("10.0.0.300",)}, "not an IP address"),
])
def test_issue_refuses_what_cannot_be_a_certificate(
        authority: ca.CertificateAuthority, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ca.PkiError, match=match):
        authority.issue(**kwargs)  # type: ignore[arg-type]


def test_sign_csr_puts_the_hub_chosen_name_on_the_requesters_key(
        authority: ca.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.sign_csr(_csr(key, cn="other-node"), "node-x", "agent", ttl_s=3600)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(authority.cert)
    assert ca.identity(issued.cert_pem) == ("node-x", "agent")  # the CSR's CN is ignored
    assert cert.public_key() == key.public_key()
    assert issued.key_pem is None
    assert dt.timedelta(minutes=59) < _life(cert) <= dt.timedelta(hours=1)


def test_sign_csr_signs_only_a_node_name_for_an_agent(authority: ca.CertificateAuthority) -> None:
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    for name in ("hub:edge-hub", "Node_X", "-x"):
        with pytest.raises(ca.PkiError, match="not a node name"):
            authority.sign_csr(csr, name, "agent", ttl_s=60)
    with pytest.raises(ca.PkiError, match="could be a node name"):
        authority.sign_csr(csr, "node-x", "consumer", ttl_s=60)
    assert ca.identity(authority.sign_csr(csr, "consumer:x", "consumer", ttl_s=60).cert_pem) \
        == ("consumer:x", "consumer")


def test_sign_csr_refuses_requests_it_cannot_trust(authority: ca.CertificateAuthority) -> None:
    with pytest.raises(ca.PkiError, match="not a PEM certificate request"):
        authority.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", "n", "agent", ttl_s=60)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ca.PkiError, match="P-256"):
        authority.sign_csr(_csr(rsa_key), "n", "agent", ttl_s=60)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ca.PkiError, match="P-256"):
        authority.sign_csr(_csr(p384), "n", "agent", ttl_s=60)
    # a request whose signature does not match its key: someone else's public key
    good = x509.load_pem_x509_csr(_csr(ec.generate_private_key(ec.SECP256R1())))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.PkiError):
        authority.sign_csr(forged, "n", "agent", ttl_s=60)
    with pytest.raises(ca.PkiError, match="ttl_s"):
        authority.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "n", "agent", ttl_s=0)


def test_nothing_outlives_the_ca(tmp_path: Path) -> None:
    short = ca.CertificateAuthority.init(tmp_path / "short", days=1)
    with pytest.raises(ca.PkiError, match="rotate the CA"):
        short.issue("n", "agent", days=2)
    assert ca.identity(short.issue("n", "agent", days=0.5).cert_pem) == ("n", "agent")


def test_identity_needs_a_name_and_a_role(authority: ca.CertificateAuthority) -> None:
    with pytest.raises(ca.PkiError, match="no common name or role"):
        ca.identity(authority.cert_pem)  # the CA has no role


def test_save_writes_a_tls_secret_layout_and_never_overwrites_silently(
        tmp_path: Path, authority: ca.CertificateAuthority) -> None:
    out = tmp_path / "out"
    issued = authority.issue("consumer:one", "consumer")
    paths = ca.save(out, issued, authority.cert_pem)
    assert [p.name for p in paths] == ["tls.crt", "tls.key", "ca.crt"]
    assert _mode(out / "tls.key") == 0o600
    assert (out / "ca.crt").read_bytes() == authority.cert_pem
    other = authority.issue("consumer:two", "consumer")
    with pytest.raises(ca.PkiError, match="--force"):
        ca.save(out, other, authority.cert_pem)
    assert ca.identity((out / "tls.crt").read_bytes())[0] == "consumer:one"
    ca.save(out, other, authority.cert_pem, overwrite=True)
    assert ca.identity((out / "tls.crt").read_bytes())[0] == "consumer:two"
    with pytest.raises(ca.PkiError, match="nothing to save"):
        ca.save(out, authority.sign_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "n",
                                        "agent", ttl_s=60), authority.cert_pem, overwrite=True)
