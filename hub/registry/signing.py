"""Ed25519 signatures over model artifacts, so a node can prove who released a model.

A signature covers ``protocol.signing_payload(manifest_sha256, artifact_sha256)``: the digests
of the exact manifest bytes and model bytes the hub serves. Changing one byte of either changes
a digest and breaks the signature. The release engineer signs with a private key that never
reaches the hub (``edge-hub models push --sign KEY``); the hub (``signing.public_key_files``,
``signing.require_signed``) and the agents hold only public keys.

Signatures travel as standard base64 of the 64 raw signature bytes. Keys are PEM files:
PKCS#8 for private keys, SubjectPublicKeyInfo for public keys (``edge-hub keygen`` writes both).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.contract.protocol import signing_payload
from hub.errors import HubError, InvalidRequest

#: Length of a raw ed25519 signature.
SIGNATURE_BYTES = 64


class SigningKeyError(HubError, code="bad_key", exit_code=2):
    """A key file that cannot be read or is not an ed25519 key."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A new key pair as (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM ed25519 private key."""
    key = _read_pem(path, "private key", "an unencrypted PEM private key",
                    lambda pem: serialization.load_pem_private_key(pem, password=None))
    if isinstance(key, Ed25519PrivateKey):
        return key
    raise SigningKeyError(f"{path} is not an ed25519 key")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM ed25519 public key."""
    key = _read_pem(path, "public key", "a PEM public key", serialization.load_pem_public_key)
    if isinstance(key, Ed25519PublicKey):
        return key
    raise SigningKeyError(f"{path} is not an ed25519 key")


def _read_pem(path: Path, what: str, form: str, parse: Callable[[bytes], object]) -> object:
    """The key ``parse`` finds in the file ``path``; SigningKeyError naming the file when it
    cannot be read or is not ``form``."""
    try:
        return parse(path.read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not {form}") from exc


def sign(key: Ed25519PrivateKey, manifest_sha256: str, artifact_sha256: str) -> str:
    """The base64 signature over the two digests."""
    raw = key.sign(signing_payload(manifest_sha256, artifact_sha256))
    return base64.b64encode(raw).decode("ascii")


def decode_signature(signature: str) -> bytes:
    """The raw signature bytes; raise InvalidRequest when it is not 64 bytes of base64."""
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("signature is not valid base64") from exc
    if len(raw) != SIGNATURE_BYTES:
        raise InvalidRequest(f"signature must be {SIGNATURE_BYTES} bytes, got {len(raw)}")
    return raw


def verify(
    keys: Iterable[Ed25519PublicKey], signature: str, manifest_sha256: str, artifact_sha256: str
) -> bool:
    """True when any of ``keys`` produced ``signature`` over the two digests."""
    raw = decode_signature(signature)
    payload = signing_payload(manifest_sha256, artifact_sha256)
    for key in keys:
        try:
            key.verify(raw, payload)
        except InvalidSignature:
            continue
        return True
    return False
