"""Helpers for the hub's tests: a hub on a real loopback port (in-process or as an
``edge-hub serve`` subprocess), upload requests, and a snapshot of what the hub stored."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hub.config import HubSettings, load_settings
from hub.server.app import build_app
from tests.support.broker import free_port, wait_port

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class InProcessHub:
    url: str
    settings: HubSettings
    app: web.Application

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.data_dir


def hub_settings(data_dir: Path, **api: Any) -> HubSettings:
    """Settings for a test hub: token set, port 0, data under ``data_dir``."""
    api_cfg = {"token": TOKEN, "port": 0, **api}
    return load_settings(None, storage={"data_dir": str(data_dir)}, api=api_cfg)


@contextlib.asynccontextmanager
async def running_hub(settings: HubSettings, **components: Any) -> AsyncIterator[InProcessHub]:
    """The hub's app served on 127.0.0.1 on a free port, in this event loop."""
    app = build_app(settings, **components)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield InProcessHub(f"http://127.0.0.1:{port}", settings, app)
    finally:
        await runner.cleanup()


def upload_form(
    artifact: bytes | Path, manifest: bytes | Path, **fields: str
) -> aiohttp.MultipartWriter:
    """The multipart body of a push."""
    form = aiohttp.MultipartWriter("form-data")
    mbytes = manifest.read_bytes() if isinstance(manifest, Path) else manifest
    part = form.append(mbytes, {"Content-Type": "application/json"})
    part.set_content_disposition("form-data", name="manifest")
    for k, v in fields.items():
        form.append(v).set_content_disposition("form-data", name=k)
    abytes = artifact.read_bytes() if isinstance(artifact, Path) else artifact
    apart = form.append(io.BytesIO(abytes), {"Content-Type": "application/octet-stream"})
    apart.set_content_disposition("form-data", name="artifact", filename="model.onnx")
    return form


def stored_files(data_dir: Path) -> set[str]:
    """Every artifact and temporary file under the data folder (not the database)."""
    out: set[str] = set()
    for sub in ("artifacts", "tmp"):
        d = data_dir / sub
        if d.exists():
            out |= {str(p.relative_to(data_dir)) for p in d.rglob("*") if p.is_file()}
    return out


class HubProcess:
    """``edge-hub serve`` as a child process on a free port."""

    def __init__(self, data_dir: Path, token_file: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"hub-{self.port}.log"
        self.argv = [
            sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--data-dir", str(data_dir),
            "--token-file", str(token_file), *extra,
        ]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HubProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                wait_port(self.port, timeout=0.2)
                return self
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("hub did not start:\n" + self.log_text()) from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def hub_process(tmp_path: Path, *extra: str) -> Iterator[HubProcess]:
    """A running ``edge-hub serve`` with token ``TOKEN``, stopped afterwards."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    hub = HubProcess(tmp_path / "data", token_file, *extra).start()
    try:
        yield hub
    finally:
        rc = hub.stop()
        assert rc == 0, f"hub exited with {rc}:\n{hub.log_text()[-3000:]}"
