"""The model registry: immutable, verified model versions that nodes download by sha256.

An ML engineer pushes (name, version, manifest, ONNX file[, signature]); the registry accepts
it only when the file loads in onnxruntime and matches its manifest, the digests agree, the
signature (if required or given) verifies, and the (name, version) is new or an exact repeat.
Accepted versions never change. Deleting one is refused while any node is assigned it, which
the rollout side answers through the ``is_assigned`` callable the composition root
(``hub/server/app.py``) builds the registry with (default: never assigned).

Layering: ``artifacts`` keeps bytes by digest, ``metadata`` keeps rows, ``validation`` checks
uploads, ``signing`` checks signatures; this module orders those steps and owns the invariants
that span them (a row always points at an existing blob; a blob without rows is removed).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.contract import quantization
from edge_agent.contract.protocol import is_valid_name, is_valid_version
from hub.config import ConfigError, HubSettings
from hub.errors import ArtifactRejected, Conflict, InvalidRequest, NotFound
from hub.registry import signing
from hub.registry.artifacts import ArtifactStore, StagedArtifact
from hub.registry.metadata import MetadataStore, ModelVersion, SqlMetadataStore
from hub.registry.validation import ManifestMismatch, check_onnx, parse_manifest

__all__ = [
    "AssignedCheck",
    "ModelVersion",
    "Registry",
    "SignatureRejected",
    "artifact_path",
    "check_ref",
    "manifest_path",
    "parse_quantization",
    "version_path",
]

log = structlog.get_logger(__name__)

#: ``is_assigned(name, version)``: truthy when some node is assigned that version; a
#: sequence of node names makes the refusal message say which. May be sync or async.
AssignedCheck = Callable[[str, str], Awaitable[bool | Sequence[str]] | bool | Sequence[str]]

MAX_NOTES_CHARS = 4096
#: With replicas, leftovers younger than this stay at start-up (an upload may be under way).
SHARED_SWEEP_AGE_S = 3600.0
MAX_PUSHED_BY_CHARS = 128


class SignatureRejected(ArtifactRejected, code="signature_rejected"):
    """Unsigned where a signature is required, or a signature no trusted key made."""


def _never_assigned(name: str, version: str) -> bool:
    return False


def check_ref(name: str, version: str) -> None:
    """Raise InvalidRequest unless name and version follow the protocol's strict patterns."""
    if not is_valid_name(name):
        raise InvalidRequest(
            "invalid model name: lowercase letters, digits and '-', 1-63 characters"
        )
    if not is_valid_version(version):
        raise InvalidRequest(
            "invalid version: letters, digits, '.', '_' and '-', 1-63 characters, no '..'"
        )


def parse_quantization(text: str | None) -> dict[str, Any] | None:
    """The quantisation report as stored (None when absent); InvalidRequest naming the first
    wrong field when it is not a ``QuantizationReport``."""
    if text is None or not text.strip():
        return None
    if len(text.encode()) > quantization.MAX_REPORT_BYTES:
        raise InvalidRequest(f"quantization report over {quantization.MAX_REPORT_BYTES} bytes")
    try:
        report = quantization.QuantizationReport.model_validate_json(text)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(report)"
        raise InvalidRequest(f"quantization report: {where}: {err['msg']}") from exc
    return report.model_dump(mode="json")


def version_path(name: str, version: str) -> str:
    """The API path of a version (name and version are pattern-checked, so no quoting)."""
    return f"/v1/models/{name}/versions/{version}"


def artifact_path(name: str, version: str) -> str:
    """The API path agents download the ONNX file from."""
    return version_path(name, version) + "/artifact"


def manifest_path(name: str, version: str) -> str:
    """The API path of the manifest bytes the signature covers."""
    return version_path(name, version) + "/manifest"


class Registry:
    """Model versions: metadata rows plus content-addressed artifacts on ``storage.data_dir``.

    Construct with the settings; the first call opens the database and sweeps leftovers
    (or call ``open()`` at start-up to fail early). ``aclose()`` releases the database.
    """

    def __init__(
        self,
        settings: HubSettings,
        *,
        metadata: MetadataStore | None = None,
        artifacts: ArtifactStore | None = None,
        is_assigned: AssignedCheck | None = None,
    ) -> None:
        data_dir = settings.storage.data_dir
        self.settings = settings
        self.artifacts = artifacts or ArtifactStore(data_dir)
        self.metadata: MetadataStore = metadata or SqlMetadataStore.from_settings(
            settings.storage, settings.secret_files)
        self._is_assigned: AssignedCheck = is_assigned or _never_assigned
        self.max_upload_bytes = settings.api.max_upload_bytes
        self._public_keys: list[Ed25519PublicKey] = []
        self._opened = False
        self._open_lock = asyncio.Lock()
        # adopt+insert and delete+unlink must not interleave, or a blob shared by two versions
        # could be unlinked between another push's adopt and its insert
        self._commit_lock = asyncio.Lock()
        # onnxruntime loads are memory-hungry: validate one upload at a time
        self._validate_sem = asyncio.Semaphore(1)

    # ------------------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Create folders and schema, load trusted keys, remove orphans of a crash."""
        async with self._open_lock:
            if self._opened:
                return
            sig = self.settings.signing
            if sig.require_signed and not sig.public_key_files:
                raise ConfigError([(
                    "signing.public_key_files",
                    "require_signed needs at least one public key",
                    [],
                )])
            self._public_keys = await asyncio.to_thread(
                lambda: [signing.load_public_key(p) for p in sig.public_key_files]
            )
            await asyncio.to_thread(self.artifacts.ensure_dirs)
            await self.metadata.open()
            referenced = await self.metadata.all_shas()
            # replicas share the folder: leave what another one may be writing right now
            shared = self.settings.storage.database_url is not None
            await asyncio.to_thread(self.artifacts.sweep_sync, referenced,
                                    min_age_s=SHARED_SWEEP_AGE_S if shared else 0.0)
            self._opened = True
            log.info(
                "registry_opened",
                data_dir=str(self.settings.storage.data_dir),
                versions_sha256=len(referenced),
                trusted_keys=len(self._public_keys),
                require_signed=sig.require_signed,
            )

    async def aclose(self) -> None:
        """Close the metadata store."""
        await self.metadata.close()
        self._opened = False

    # ------------------------------------------------------------------------------ reads

    async def get(self, name: str, version: str) -> ModelVersion:
        """The version, or raise NotFound (InvalidRequest for a malformed name or version)."""
        check_ref(name, version)
        await self.open()
        v = await self.metadata.get(name, version)
        if v is None:
            raise NotFound(f"model {name} version {version} not found")
        return v

    async def list(self, name: str | None = None) -> list[ModelVersion]:
        """All versions, or those of one model, by name then age."""
        if name is not None and not is_valid_name(name):
            raise InvalidRequest("invalid model name")
        await self.open()
        return await self.metadata.list(name)

    def blob_path(self, v: ModelVersion) -> Path:
        """Where the version's ONNX file lies on disk."""
        return self.artifacts.path(v.sha256)

    # ----------------------------------------------------------------------------- writes

    async def stage(self) -> StagedArtifact:
        """A temporary file for an incoming artifact, limited to ``api.max_upload_bytes``."""
        await self.open()
        return self.artifacts.stage(self.max_upload_bytes)

    async def push(
        self,
        name: str,
        version: str,
        *,
        manifest_bytes: bytes,
        staged: StagedArtifact,
        signature: str | None = None,
        pushed_by: str = "",
        notes: str = "",
        quantization: str | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Validate and store a finished upload; return (version, created).

        ``quantization`` is the JSON of an INT8 version's report (``edge-hub models
        quantize``), checked against ``contract.quantization.QuantizationReport``.

        ``created`` is False for an exact repeat of an existing version (same bytes and
        manifest), which is answered idempotently. Any refusal raises a HubError and leaves
        nothing behind: the staged file is always removed or moved into place.
        """
        try:
            return await self._push(
                name=name, version=version, manifest_bytes=manifest_bytes, staged=staged,
                signature=signature, pushed_by=pushed_by, notes=notes,
                quantization=parse_quantization(quantization),
            )
        finally:
            await staged.discard()  # no-op once adopted (the file was moved)

    async def _push(
        self,
        *,
        name: str,
        version: str,
        manifest_bytes: bytes,
        staged: StagedArtifact,
        signature: str | None,
        pushed_by: str,
        notes: str,
        quantization: dict[str, Any] | None,
    ) -> tuple[ModelVersion, bool]:
        check_ref(name, version)
        if len(notes) > MAX_NOTES_CHARS:
            raise InvalidRequest(f"notes longer than {MAX_NOTES_CHARS} characters")
        if len(pushed_by) > MAX_PUSHED_BY_CHARS or not pushed_by.isprintable():
            raise InvalidRequest(f"pushed_by: printable, at most {MAX_PUSHED_BY_CHARS} chars")
        if staged.sha256 is None:
            await staged.finish()
        assert staged.sha256 is not None
        sha, size = staged.sha256, staged.size
        await self.open()
        facts = parse_manifest(manifest_bytes)
        if (facts.name, facts.version) != (name, version):
            raise ManifestMismatch(
                f"the manifest describes {facts.name} {facts.version}, the upload is for "
                f"{name} {version}"
            )
        if facts.sha256 != sha:
            raise ManifestMismatch(
                f"the manifest's sha256 {facts.sha256[:12]}… is not the uploaded file's "
                f"{sha[:12]}…"
            )
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        existing = await self.metadata.get(name, version)
        if existing is not None:
            return self._repeat_or_conflict(existing, sha, manifest_sha), False
        self._check_signature(signature, manifest_sha, sha)
        async with self._validate_sem:
            await asyncio.to_thread(check_onnx, staged.path, facts.data)
        row = ModelVersion(
            name=name, version=version, task=facts.task, sha256=sha, size=size,
            manifest_sha256=manifest_sha, manifest_bytes=manifest_bytes,
            signature=signature.strip() if signature else None, created_at=time.time(),
            pushed_by=pushed_by, notes=notes, quantization=quantization,
        )
        async with self._commit_lock:
            new_blob = await asyncio.to_thread(self.artifacts.adopt_sync, staged)
            stored, inserted = await self.metadata.insert(row)
            if not inserted:  # lost a race with a concurrent push of the same version
                if new_blob and not await self.metadata.sha_in_use(sha):
                    await asyncio.to_thread(self.artifacts.remove_sync, sha)
                return self._repeat_or_conflict(stored, sha, manifest_sha), False
        log.info(
            "model_version_pushed", model=name, version=version, sha256=sha, size=size,
            signed=row.signature is not None, pushed_by=pushed_by,
        )
        return stored, True

    @staticmethod
    def _repeat_or_conflict(existing: ModelVersion, sha: str, manifest_sha: str) -> ModelVersion:
        if existing.sha256 == sha and existing.manifest_sha256 == manifest_sha:
            return existing
        what = "model bytes" if existing.sha256 != sha else "manifest"
        raise Conflict(
            f"model {existing.name} version {existing.version} already exists with other "
            f"{what}; versions are immutable, push a new version"
        )

    def _check_signature(self, signature: str | None, manifest_sha: str, sha: str) -> None:
        if signature is not None:
            signing.decode_signature(signature)  # InvalidRequest when malformed
        if not self._public_keys:
            if signature is not None:
                log.info("signature_not_verified", reason="no trusted keys configured")
            return
        if signature is None:
            if self.settings.signing.require_signed:
                raise SignatureRejected("this hub requires signed uploads (use --sign KEY)")
            return
        if not signing.verify(self._public_keys, signature, manifest_sha, sha):
            raise SignatureRejected("the signature does not verify with any trusted key")

    async def delete(self, name: str, version: str) -> ModelVersion:
        """Remove a version (and its blob when no other version shares it).

        Refused with Conflict while ``is_assigned`` says a node is assigned it.
        """
        v = await self.get(name, version)
        assigned = self._is_assigned(name, version)
        if inspect.isawaitable(assigned):
            assigned = await assigned
        if assigned:
            nodes = ""
            if isinstance(assigned, Sequence) and not isinstance(assigned, str):
                nodes = ": " + ", ".join(str(n) for n in list(assigned)[:10])
            raise Conflict(
                f"model {name} version {version} is assigned to nodes{nodes}; "
                "roll them to another version first"
            )
        async with self._commit_lock:
            if not await self.metadata.delete(name, version):
                raise NotFound(f"model {name} version {version} not found")
            if not await self.metadata.sha_in_use(v.sha256):
                await asyncio.to_thread(self.artifacts.remove_sync, v.sha256)
        log.info("model_version_deleted", model=name, version=version, sha256=v.sha256)
        return v
