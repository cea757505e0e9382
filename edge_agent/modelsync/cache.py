"""The local model cache on a host path: verified versions, kept for rollbacks and restarts.

Why it exists: a node must keep serving when the hub and the broker are gone (edge autonomy), and
a rollback must not wait for a download. So every version the hub sends is fetched here, verified
(sha256, and the ed25519 signature when a public key is configured) *before* anything loads it,
and installed with an atomic rename; the active and previous versions of each model are never
pruned; and ``sync-state.json`` remembers the last good version of each model and the applied
desired generation, so a restarted agent serves from the cache without asking anyone.

Layout under ``hub.cache_dir``::

    <model>/<version>/manifest.json   the manifest exactly as the hub served it
    <model>/<version>/<file>          the ONNX file the manifest names
    <model>/<version>/entry.json      digests, size, source URL, last use; written last
    .partial/<sha256>.part            a download in progress (resumable across restarts)
    sync-state.json                   generation + per-model active/previous/status

A version folder appears only complete (built in a temporary folder, then renamed); a folder
without ``entry.json`` is debris from a crash and is removed when found.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from edge_agent.common import settings as common_settings
from edge_agent.config import HubClientSettings
from edge_agent.contract import manifest as manifests
from edge_agent.contract.protocol import (
    DesiredModel,
    is_valid_name,
    is_valid_version,
    signing_payload,
)
from edge_agent.errors import ModelError, ModelRejectedError
from edge_agent.modelsync.fetch import Fetcher, FetchStats

log = structlog.get_logger(__name__)

MANIFEST_NAME = manifests.MANIFEST_NAME
ENTRY_NAME = manifests.CACHE_ENTRY_NAME
STATE_NAME = "sync-state.json"
PARTIAL_DIR = ".partial"
#: Largest manifest accepted (they are a few KB; labels of a 1000-class model ~30 KB).
MAX_MANIFEST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class CacheEntry:
    """One verified version in the cache."""

    name: str
    version: str
    sha256: str
    manifest_sha256: str
    size: int
    path: Path

    @property
    def manifest_path(self) -> Path:
        """The manifest to hand to ``LoadedModel.load``."""
        return self.path / MANIFEST_NAME


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key (PEM); raise ModelError when it is not one."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ModelError(f"public key {path} is not an ed25519 key")
    return key


def verify_signature(
    key: Ed25519PublicKey, signature: str | None, manifest_sha256: str, sha256: str
) -> None:
    """Check the ed25519 signature of a (manifest, artifact) digest pair; raise if it fails."""
    if not signature:
        raise ModelRejectedError("artifact is not signed and a public key is configured", sha256)
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, signing_payload(manifest_sha256, sha256))
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise ModelRejectedError("signature does not verify", sha256) from exc


def _manifest_file_name(manifest: dict[str, Any], name: str, version: str, sha256: str) -> str:
    """The artifact's file name from a manifest, after checking it describes this artifact."""
    fname = manifest.get("file")
    if (not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname
            or fname in (".", "..") or fname in manifests.RESERVED_FILE_NAMES):
        raise ModelRejectedError(f"manifest names an unusable file {fname!r}", sha256)
    if manifest.get("sha256") != sha256:
        raise ModelRejectedError("manifest sha256 differs from the desired sha256", sha256)
    if manifest.get("name") not in (None, name) or str(manifest.get("version", version)) != version:
        raise ModelRejectedError(
            f"manifest is for {manifest.get('name')}:{manifest.get('version')}, "
            f"not {name}:{version}",
            sha256,
        )
    return fname


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


class ModelCache:
    """Verified model versions on disk plus the persisted sync state.

    Disk and hashing work runs in worker threads (``asyncio.to_thread``); the sync methods are
    for startup (before the loop serves) and for those threads.
    """

    def __init__(self, settings: HubClientSettings, *, fetcher: Fetcher | None = None,
                 exposed_files: common_settings.SecretFilePolicy = "refuse") -> None:
        self.settings = settings
        self.root = Path(settings.cache_dir)
        self._fetcher = fetcher
        #: What to do with a token or key file other users can read (``secret_files``).
        self._exposed_files = exposed_files
        self._key: Ed25519PublicKey | None = (
            load_public_key(settings.public_key_file) if settings.public_key_file else None
        )

    # ------------------------------------------------------------------------------ lookup

    def entry_dir(self, name: str, version: str) -> Path:
        """Folder of one version (names and versions are validated, so no path escapes)."""
        if not is_valid_name(name) or not is_valid_version(version):
            raise ModelError(f"invalid model name or version {name!r}:{version!r}")
        return self.root / name / version

    def get(self, name: str, version: str, sha256: str | None = None) -> CacheEntry | None:
        """The cached entry of ``name:version`` (with digest ``sha256`` if given), or None."""
        d = self.entry_dir(name, version)
        try:
            meta = json.loads((d / ENTRY_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if sha256 is not None and meta.get("sha256") != sha256:
            return None
        fname = meta.get("file", "")
        if not (d / MANIFEST_NAME).is_file() or not fname or not (d / fname).is_file():
            return None
        return CacheEntry(
            name=name,
            version=version,
            sha256=str(meta["sha256"]),
            manifest_sha256=str(meta.get("manifest_sha256", "")),
            size=int(meta.get("size", 0)),
            path=d,
        )

    def entries(self) -> list[CacheEntry]:
        """Every complete entry in the cache."""
        out: list[CacheEntry] = []
        if not self.root.is_dir():
            return out
        for mdir in sorted(self.root.iterdir()):
            if not mdir.is_dir() or not is_valid_name(mdir.name):
                continue
            for vdir in sorted(mdir.iterdir()):
                if vdir.is_dir() and is_valid_version(vdir.name):
                    e = self.get(mdir.name, vdir.name)
                    if e is not None:
                        out.append(e)
        return out

    def remove(self, name: str, version: str) -> bool:
        """Delete one version (a refused artifact must not take cache space); True if it was."""
        d = self.entry_dir(name, version)
        if not d.exists():
            return False
        # rename first so a crash in rmtree leaves debris that prune removes, never a half entry
        tmp = d.parent / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
        os.replace(d, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        return True

    def touch(self, entry: CacheEntry) -> None:
        """Mark an entry as just used (pruning removes the least recently used first)."""
        p = entry.path / ENTRY_NAME
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
            meta["last_used"] = time.time()
            _write_json_atomic(p, meta)
        except (OSError, ValueError) as exc:
            log.warning("model_cache_touch_failed", name=entry.name, version=entry.version,
                        error=str(exc))

    # ------------------------------------------------------------------------------- fetch

    def _fetcher_for(self) -> Fetcher:
        if self._fetcher is not None:
            return self._fetcher
        s = self.settings
        token = None
        if s.token_file is not None:
            try:
                token = common_settings.read_secret(s.token_file, self._exposed_files) or None
            except OSError as exc:
                raise ModelError(f"cannot read hub.token_file {s.token_file}: "
                                 f"{exc.strerror or exc}") from exc
        return Fetcher(s, token=token, exposed_files=self._exposed_files)

    async def fetch(
        self,
        name: str,
        desired: DesiredModel,
        *,
        protect: set[tuple[str, str]] | None = None,
        stats: FetchStats | None = None,
    ) -> CacheEntry:
        """Return the verified cache entry for ``desired``, downloading it if needed.

        Order: manifest (checked to describe this artifact), signature (when a key is
        configured; checked before the artifact is downloaded), artifact (sha256 computed while
        streaming), install by atomic rename, prune. Raises ModelRejectedError for an artifact
        that is wrong, ModelError for one that cannot be had, TemporaryError when retries ran out.
        """
        version, sha = desired.version, desired.sha256
        d = self.entry_dir(name, version)
        hit = await asyncio.to_thread(self.get, name, version, sha)
        if hit is not None:
            if self._key is not None:
                verify_signature(self._key, desired.signature, hit.manifest_sha256, sha)
            log.info("model_cache_hit", name=name, version=version)
            return hit
        fetcher = self._fetcher_for()
        manifest_bytes = await fetcher.fetch_bytes(desired.manifest_url, MAX_MANIFEST_BYTES)
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise ModelRejectedError("manifest is not JSON", sha) from exc
        if not isinstance(manifest, dict):
            raise ModelRejectedError("manifest is not a JSON object", sha)
        fname = _manifest_file_name(manifest, name, version, sha)
        if self._key is not None:
            verify_signature(self._key, desired.signature, manifest_sha, sha)
        part = self.root / PARTIAL_DIR / f"{sha}.part"
        t0 = time.monotonic()
        got = await fetcher.fetch_file(desired.url, part, stats)
        if got != sha:
            await asyncio.to_thread(part.unlink, True)
            raise ModelRejectedError(f"sha256 mismatch: got {got[:12]}, want {sha[:12]}", sha)
        meta = {
            "name": name, "version": version, "sha256": sha, "manifest_sha256": manifest_sha,
            "file": fname, "url": desired.url,
        }
        entry = await asyncio.to_thread(self._install, d, meta, manifest_bytes, part)
        log.info("model_fetched", name=name, version=version, bytes=entry.size,
                 seconds=round(time.monotonic() - t0, 3))
        await asyncio.to_thread(self.prune, (protect or set()) | {(name, version)})
        return entry

    def _install(
        self, d: Path, meta: dict[str, Any], manifest_bytes: bytes, part: Path
    ) -> CacheEntry:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.parent / f".{meta['version']}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            with (tmp / MANIFEST_NAME).open("wb") as fh:
                fh.write(manifest_bytes)
                fh.flush()
                os.fsync(fh.fileno())
            with part.open("rb+") as fh:
                os.fsync(fh.fileno())
            size = part.stat().st_size
            os.replace(part, tmp / meta["file"])
            now = time.time()
            meta = {**meta, "size": size, "fetched_at": now, "last_used": now}
            _write_json_atomic(tmp / ENTRY_NAME, meta)
            if d.exists():
                # same version with another digest (re-pushed on the hub): the new one wins
                shutil.rmtree(d)
            os.replace(tmp, d)
            _fsync_dir(d.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CacheEntry(meta["name"], meta["version"], meta["sha256"], meta["manifest_sha256"],
                          size, d)

    # ------------------------------------------------------------------------------- prune

    def protected(self) -> set[tuple[str, str]]:
        """Versions pruning must keep: each model's active and ``keep_previous`` previous."""
        out: set[tuple[str, str]] = set()
        for name, rec in self.load_state().get("models", {}).items():
            if rec.get("active"):
                out.add((name, rec["active"]))
            for v in rec.get("previous", [])[: self.settings.keep_previous]:
                out.add((name, v))
        return out

    def prune(self, protect: set[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """Remove debris, then least recently used versions until the budget holds."""
        removed: list[tuple[str, str]] = []
        if not self.root.is_dir():
            return removed
        keep = self.protected() | (protect or set())
        self._remove_debris()
        sized, total = self._candidates(keep)
        # partial downloads go first (cheapest to lose), then the least recently used versions
        sized.sort(key=lambda t: (t[2] is not None, t[0]))
        for _, path, key, size in sized:
            if total <= self.settings.cache_max_bytes:
                break
            if key is None:
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(key)
            total -= size
            log.info("model_cache_pruned", path=str(path), bytes=size)
        if total > self.settings.cache_max_bytes:
            log.warning("model_cache_over_budget", bytes=total,
                        budget=self.settings.cache_max_bytes, protected=len(keep))
        return removed

    def _remove_debris(self) -> None:
        # temporary folders of an interrupted install, and folders without entry.json
        for mdir in self.root.iterdir():
            if not (mdir.is_dir() and is_valid_name(mdir.name)):
                continue
            for sub in mdir.iterdir():
                tmp = sub.name.startswith(".") and sub.name.endswith(".tmp")
                if tmp or (sub.is_dir() and not (sub / ENTRY_NAME).is_file()):
                    shutil.rmtree(sub, ignore_errors=True)

    def _candidates(
        self, keep: set[tuple[str, str]]
    ) -> tuple[list[tuple[float, Path, tuple[str, str] | None, int]], int]:
        """(last use, path, key or None for a partial download, bytes) of what may go; total."""
        sized: list[tuple[float, Path, tuple[str, str] | None, int]] = []
        total = 0
        partial = self.root / PARTIAL_DIR
        if partial.is_dir():
            for p in partial.iterdir():
                st = p.stat()
                total += st.st_size
                sized.append((st.st_mtime, p, None, st.st_size))
        for e in self.entries():
            size = _dir_size(e.path)
            total += size
            try:
                meta = json.loads((e.path / ENTRY_NAME).read_text(encoding="utf-8"))
                used = float(meta.get("last_used", 0.0))
            except (OSError, ValueError):
                used = 0.0
            if (e.name, e.version) not in keep:
                sized.append((used, e.path, (e.name, e.version), size))
        return sized, total

    # ------------------------------------------------------------------------ sync state

    def load_state(self) -> dict[str, Any]:
        """The persisted sync state (``{}`` when none or unreadable, which is logged)."""
        p = self.root / STATE_NAME
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("model_sync_state_unreadable", path=str(p), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        """Persist the sync state atomically (a crash leaves the old or the new file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.root / STATE_NAME, state)

    def last_good(self, name: str) -> CacheEntry | None:
        """The cached version of ``name`` that was last active, if it is still in the cache."""
        rec = self.load_state().get("models", {}).get(name) or {}
        version, sha = rec.get("active"), rec.get("active_sha256")
        if not version or rec.get("active_source") != "hub":
            return None
        try:
            return self.get(name, version, sha)
        except ModelError:
            return None
