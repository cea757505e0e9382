"""Content-addressed artifact store on the hub's data folder (a PersistentVolume in K3s).

Model files are kept once per sha256 under ``<data_dir>/artifacts/sha256/<2 hex>/<64 hex>``,
so two versions with the same bytes share one file and a file's name proves nothing about a
version: only its digest does. Uploads are written to ``<data_dir>/tmp/`` while they arrive,
hashed on the fly, and only renamed into place (``os.replace``, atomic on one filesystem) once
the registry accepted them; a rejected upload is deleted and leaves nothing behind.

Every filesystem call here is blocking and runs in a worker thread (``asyncio.to_thread``):
the event loop only hands over buffers of at most ``FLUSH_BYTES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import BinaryIO

import structlog

from edge_agent.contract.protocol import SHA256_PATTERN
from hub.errors import HubError, TooLarge

log = structlog.get_logger(__name__)

#: Bytes gathered in memory before one write+hash call in a worker thread. 1 MiB keeps the
#: per-upload memory small while making thread hops rare (100 per 100 MB).
FLUSH_BYTES = 1024 * 1024
#: Bytes read per worker-thread call when streaming an artifact out.
READ_CHUNK = 256 * 1024

_SHA_RE = re.compile(SHA256_PATTERN)


class StorageFullError(HubError, code="insufficient_storage", http_status=507):
    """The data folder ran out of space while an upload was written."""


class StagedArtifact:
    """An upload being written to a temporary file, hashed as it arrives.

    Use ``await write(chunk)`` for each piece, then ``await finish()`` for (sha256, size);
    ``await discard()`` removes the file (safe to call at any point, more than once).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self.sha256: str | None = None
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._file: BinaryIO | None = None
        self._closed = False

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raise TooLarge past ``max_bytes`` (the caller then discards)."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLarge(f"artifact exceeds the upload limit of {self.max_bytes} bytes")
        self._buf += chunk
        if len(self._buf) >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        await asyncio.to_thread(self._write_sync, data)

    def _write_sync(self, data: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "xb")  # noqa: SIM115 - closed in finish/discard
        self._hash.update(data)  # hashlib releases the GIL on large buffers
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise StorageFullError("the hub's data folder is full") from exc
            raise

    async def finish(self) -> tuple[str, int]:
        """Flush, fsync and close the file; return (sha256, size)."""
        await self._flush()
        await asyncio.to_thread(self._finish_sync)
        self.sha256 = self._hash.hexdigest()
        return self.sha256, self.size

    def _finish_sync(self) -> None:
        if self._file is None:  # an empty upload still gets a (empty) file
            self._file = open(self.path, "xb")  # noqa: SIM115
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._closed = True

    async def discard(self) -> None:
        """Close and delete the temporary file."""
        await asyncio.to_thread(self.discard_sync)

    def discard_sync(self) -> None:
        """``discard`` for a caller already in a worker thread (blocking)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ArtifactStore:
    """Model files by sha256 under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "artifacts" / "sha256"
        self.tmp = root / "tmp"

    def ensure_dirs(self) -> None:
        """Create the folders (blocking; call from a thread or at start-up)."""
        for d in (self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)

    def path(self, sha256: str) -> Path:
        """Where the file with this digest lives (whether or not it exists)."""
        if not _SHA_RE.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.blobs / sha256[:2] / sha256

    def stage(self, max_bytes: int) -> StagedArtifact:
        """A new temporary file for an upload of at most ``max_bytes``."""
        return StagedArtifact(self.tmp / f"upload-{uuid.uuid4().hex}.part", max_bytes)

    def adopt_sync(self, staged: StagedArtifact) -> bool:
        """Move a finished upload into place; True when the blob is new (blocking).

        When a blob with the same digest already exists the bytes are identical by
        construction, so the staged copy is simply dropped.
        """
        assert staged.sha256 is not None, "finish() the upload first"
        dest = self.path(staged.sha256)
        if dest.exists():
            staged.discard_sync()
            return False
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        os.replace(staged.path, dest)
        os.chmod(dest, 0o440)
        # make the rename durable before the metadata row that points at it is committed
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def remove_sync(self, sha256: str) -> None:
        """Delete a blob (blocking). Missing blobs are not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def sweep_sync(self, referenced: Iterable[str], *, min_age_s: float = 0.0) -> int:
        """Delete blobs no metadata row references and leftover temporary uploads (blocking).

        Run at start-up, before requests are served: a crash between writing a blob and
        committing its row, or in the middle of an upload, leaves such files behind. Files
        younger than ``min_age_s`` stay: with replicas sharing the folder, another replica may
        be in the middle of that upload.
        """
        keep = set(referenced)
        removed = 0
        cutoff = time.time() - min_age_s

        def old(p: Path) -> bool:
            try:
                return min_age_s <= 0 or p.stat().st_mtime < cutoff
            except FileNotFoundError:
                return False

        tmp = list(self.tmp.iterdir()) if self.tmp.is_dir() else []
        blobs = [p for sub in (self.blobs.iterdir() if self.blobs.is_dir() else ())
                 if sub.is_dir() for p in sub.iterdir() if p.name not in keep]
        for p in tmp + blobs:
            if old(p):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
        if removed:
            log.info("storage_swept", removed=removed)
        return removed

    async def open_blob(self, sha256: str) -> BinaryIO:
        """Open a blob for reading (in a thread). Raises FileNotFoundError when it is gone.

        Open it before sending response headers; a blob deleted afterwards stays readable
        through the open handle (POSIX), so a download in flight is never cut by a delete.
        """
        f: BinaryIO = await asyncio.to_thread(open, self.path(sha256), "rb")
        return f


async def read_range(f: BinaryIO, start: int, length: int) -> AsyncGenerator[bytes, None]:
    """Yield ``length`` bytes of an open file from ``start`` in 256 KiB worker-thread reads.

    The caller owns (and closes) the file.
    """
    await asyncio.to_thread(f.seek, start)
    left = length
    while left > 0:
        chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, left))
        if not chunk:
            raise OSError("artifact shorter than its recorded size")
        left -= len(chunk)
        yield chunk
